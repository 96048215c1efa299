#!/usr/bin/env bash
# The image's entrypoint: runs the given command (`raygpt quickstart`, `raygpt train ...`, or the
# `bash` that Ray's cluster launcher starts the container with) after warning about the one
# container setting that silently ruins multi-GPU training: a small /dev/shm.
set -euo pipefail

# Docker gives containers 64 MiB of /dev/shm. NCCL's intra-node transport, PyTorch's data
# workers and Ray's object store all live there; with too little, NCCL fails with "unhandled
# system error" and Ray falls back to the (slow) disk.
min_shm_kib=$((1024 * 1024))
shm_kib=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print $2}')
if [ -n "${shm_kib:-}" ] && [ "$shm_kib" -lt "$min_shm_kib" ]; then
  echo "raygpt: /dev/shm is $((shm_kib / 1024)) MiB; run the container with --ipc=host (or --shm-size=16g)" >&2
fi

exec "$@"
