# raygpt: one image for a laptop with a GPU, rented 8-GPU nodes and the Ray cluster launcher.
#
#   docker build -t raygpt:0.1.0 .
#   docker run --rm --gpus all --ipc=host raygpt:0.1.0 raygpt quickstart
#
# The base image's Ray and Python must be exactly the ones raygpt pins (pyproject.toml:
# ray[default,train]==2.60.0, Python 3.11): a cluster whose nodes and client disagree refuses to
# connect. tests/test_cluster_config.py checks that this tag and pyproject agree. The tag is
# pinned; for byte-for-byte rebuilds pin its digest too (rayproject/ray:2.60.0-py311-cu128@sha256:...,
# from `docker buildx imagetools inspect rayproject/ray:2.60.0-py311-cu128`).
FROM rayproject/ray:2.60.0-py311-cu128

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# PIP_NO_CACHE_DIR keeps pip's download cache out of the layers. RAYGPT_BPE_DIR is where the
# GPT-2 tokenizer files are baked (below): tokenization never touches the network. Token
# authentication stays on for every Ray started in this image (see docs/cluster.md).
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    RAYGPT_BPE_DIR=/opt/raygpt/bpe \
    RAY_AUTH_MODE=token

# The base image's user is `ray` (uid 1000, gid 100 `users`) and owns its Python environment;
# root is needed only to create raygpt's folders. Numeric ids, so that Kubernetes'
# runAsNonRoot can verify the user without reading /etc/passwd.
USER 0
RUN install -d -o 1000 -g 100 /opt/raygpt /opt/raygpt/src /opt/raygpt/bpe /opt/raygpt/docker
USER 1000

# Layers from least to most often changed: torch (GBs, changes with TORCH_SPEC), the
# dependencies (change with pyproject.toml), then raygpt's own code (changes every commit).
COPY --chown=1000:100 docker/install.sh /opt/raygpt/docker/install.sh
# PyPI's Linux torch wheels are the CUDA build; override both for another CUDA or a CPU image.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
# Build arguments reach RUN as environment variables, which install.sh reads.
RUN /opt/raygpt/docker/install.sh torch

COPY --chown=1000:100 pyproject.toml /opt/raygpt/src/pyproject.toml
RUN /opt/raygpt/docker/install.sh deps /opt/raygpt/src

COPY --chown=1000:100 raygpt /opt/raygpt/src/raygpt
RUN /opt/raygpt/docker/install.sh project /opt/raygpt/src \
    && /opt/raygpt/docker/install.sh bpe "${RAYGPT_BPE_DIR}"

COPY --chown=1000:100 docker/entrypoint.sh /opt/raygpt/docker/entrypoint.sh
# The stage specs, so `raygpt train jobs/<stage>.yaml` works from the working directory.
COPY --chown=1000:100 jobs /opt/raygpt/jobs

WORKDIR /opt/raygpt
ENTRYPOINT ["/opt/raygpt/docker/entrypoint.sh"]
CMD ["raygpt", "--help"]
