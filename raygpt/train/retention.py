"""Ray Train's side of raygpt's checkpoint retention (``raygpt.weights.retention``).

``CheckpointRetention`` runs in Ray Train's controller, which sees each checkpoint once every
rank's files of it are uploaded and registered, and applies ``checkpoint.keep`` then. Ray
Train's own ``num_to_keep`` stays off: it would count damaged checkpoints and delete the one
a resume started from.
"""

from __future__ import annotations

import logging
import os

from ray.train import UserCallback

from raygpt.errors import RaygptError
from raygpt.storage import join
from raygpt.weights.retention import BEYOND_KEEP, Retention

log = logging.getLogger(__name__)


class CheckpointRetention(UserCallback):
    def __init__(self, retention: Retention):
        self.retention = retention

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if checkpoint is None:
            return
        try:
            removed = self.retention.after_save(os.path.basename(checkpoint.path))
        except RaygptError as e:  # the store is out: the next save tries again
            log.warning("raygpt: checkpoint retention skipped this save: %s", e)
            return
        for name, why in removed:  # each save prunes one beyond checkpoint.keep: say so only when asked
            log.log(logging.DEBUG if why.startswith(BEYOND_KEEP) else logging.INFO,
                    "raygpt: removed checkpoint folder %s: %s", join(self.retention.run_uri, name), why)
