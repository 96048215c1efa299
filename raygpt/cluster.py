"""Joining Ray: the cluster a job runs in, or a local instance when there is none."""

from __future__ import annotations

import os

import ray


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address``, else ``$RAY_ADDRESS`` (set inside Ray jobs), else start a local instance.

    A plain ``ray.init()`` would join whatever cluster ``ray start`` last recorded in Ray's temp
    folder, even one that is gone; ``address="local"`` always starts a fresh one instead.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0
