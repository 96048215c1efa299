"""``python -m raygpt.cli``: the same as the ``raygpt`` command."""

import sys

from raygpt.cli import main

sys.exit(main())
