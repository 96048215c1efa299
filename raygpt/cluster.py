"""Ray as raygpt uses it: joining a cluster, what tasks inherit, and what a failure says.

Everything that touches Ray beyond its public API is here, each with the reason: Ray Train
logs every report under a logger named after an internal file (``quiet_report_logs``), the
controller's report polling is a setting read from the environment
(``poll_reports_often``), and workers put the driver's folder first on their path, where a
``raygpt/`` checkout would shadow the installed package (``package_root``).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import ray

from raygpt.errors import RaygptError, last_line


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
        _start_local(num_cpus)


def _start_local(num_cpus: int | None) -> None:
    """A fresh local instance with its dashboard on loopback.

    Ray Train's controller is watched through the State API, which the dashboard serves. The
    instance's processes inherit ``RAY_ADDRESS`` pointing at that dashboard, so they query
    their own instance even when other instances run on this machine.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_ADDRESS"] = f"http://127.0.0.1:{port}"  # unset here: connect() came this way
    python_path = os.environ.get("PYTHONPATH")
    root = package_root()
    if root:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, python_path] if python_path else [root])
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, log_to_driver=True)
    finally:
        del os.environ["RAY_ADDRESS"]  # this process is connected; a later connect() starts afresh
        if python_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = python_path


def package_root() -> str | None:
    """The folder holding the ``raygpt`` package this process runs, unless it is a site folder.

    Ray's workers put the driver's current folder first on their ``sys.path``. Right after
    ``git clone .../raygpt && pip install -e raygpt`` that folder holds ``raygpt/``, the checkout,
    with no ``__init__.py``: the workers import it as an empty namespace package ("cannot
    import name '__version__' from 'raygpt' (unknown location)"). An editable install is found
    through an import hook, which Python asks only after every ``sys.path`` entry came up
    empty, and a namespace package does not come up empty. A regular package wins over a
    namespace one wherever it is on the path, so the local instance's processes (and so every
    worker) get this folder on their ``PYTHONPATH``: they import the very package the driver
    runs. A package in site-packages is found that way already (None).
    """
    import site

    import raygpt

    root = Path(raygpt.__file__).resolve().parent.parent
    site_folders = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    return None if root in site_folders else str(root)


# Settings (never credentials) that say where local copies live. Ray's workers inherit the
# environment of the node they run on, not the driver's, so tasks get these explicitly.
FORWARDED_ENV = ("RAYGPT_HF_DIR", "RAYGPT_BPE_DIR", "RAYGPT_CACHE_DIR", "HF_HOME", "HF_HUB_OFFLINE", "HF_ENDPOINT")


def forwarded_env() -> dict[str, str]:
    """The driver's ``FORWARDED_ENV`` settings that are set."""
    return {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}


def task_runtime_env() -> dict:
    """A ``runtime_env`` for Ray tasks carrying ``forwarded_env()`` (Ray merges it with the
    job's own runtime env)."""
    env_vars = forwarded_env()
    return {"env_vars": env_vars} if env_vars else {}


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def failure_message(error: BaseException, what: str = "training") -> str:
    """The user-facing message inside a Ray failure (Ray Train's ``TrainingFailedError``, a
    task's ``RayTaskError``): the first RaygptError among the causes and the workers'
    exceptions, else the last line of the first one's error."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        e = pending.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RaygptError):
            return str(e)
        pending.extend([getattr(e, "cause", None), e.__cause__, getattr(e, "controller_failure", None)])
        pending.extend(getattr(e, "worker_failures", {}).values())
    failures = getattr(error, "worker_failures", None) or {}
    first = next(iter(failures.values()), error)
    return f"{what} failed: {last_line(str(first))[:400]} (see the worker logs)"


def quiet_report_logs() -> None:
    """Ray Train logs every report at INFO under a logger named after its source file, outside
    ``ray.train``, so ``LoggingConfig`` does not reach it; the driver's view shows reports already.
    No public API names that logger."""
    from ray.train.v2._internal.execution import context as ray_train_context

    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)


def poll_reports_often() -> None:
    """Ray Train's controller collects reports every 2 s by default, and a worker's next report
    waits until its previous one is collected: poll more often so reports never stall training.
    The interval is an environment setting only; set before the trainer starts."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
