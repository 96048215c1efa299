"""Ray as raygpt uses it: joining a cluster, what tasks inherit, and what a failure says.

Everything that touches Ray beyond its public API is here, each with the reason: Ray Train
logs every report under a logger named after an internal file (``quiet_report_logs``), the
controller's report polling is a setting read from the environment
(``poll_reports_often``), workers put the driver's folder first on their path, where a
``raygpt/`` checkout would shadow the installed package (``package_root``), Ray turns a
loopback node address into the machine's own (``_start_local``), and ``ray.init`` retries an
address that does not answer for minutes (``check_reachable``).
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path

import ray

from raygpt.errors import RaygptError, last_line

LOOPBACK = "127.0.0.1"
REACH_TIMEOUT_S = 5.0
"""Seconds an address given to ``connect`` has to accept a connection and speak gRPC."""


def address_problem(address: str) -> str | None:
    """Why ``ray.init`` cannot take ``address``, or None: ``local`` (a fresh local instance),
    ``auto`` (the cluster ``ray start`` recorded on this machine), ``host:port`` (a head's GCS,
    port 6379 unless changed) or ``ray://host:port`` (Ray Client, 10001)."""
    if address in ("local", "auto"):
        return None
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    if "://" in rest:
        return (f"{address!r}: not an address raygpt joins as a driver; give host:port (the head's GCS, "
                "e.g. 10.0.0.5:6379), ray://host:10001, auto or local (an http:// dashboard address is for "
                "raygpt submit and raygpt jobs)")
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})", rest)
    if not match or not 0 < int(match.group(2)) < 65536:
        return f"{address!r}: expected host:port (e.g. 10.0.0.5:6379), ray://host:10001, auto or local"
    return None


def _target(address: str) -> tuple[str, int]:
    """(host, port) that ``ray.init(address)`` connects to: Ray reads ``auto`` from its temp
    folder and turns a loopback host into the machine's own address."""
    if address.startswith("ray://"):
        host, _, port = address[len("ray://"):].rpartition(":")
    else:
        from ray._private.services import canonicalize_bootstrap_address

        try:
            resolved = canonicalize_bootstrap_address(address)
        except (ConnectionError, ValueError) as e:
            raise RaygptError(f"{address}: {last_line(str(e))}") from None
        if resolved is None:
            raise RaygptError("--address auto: no Ray cluster is recorded on this machine (`ray start --head` "
                              "records one); give host:port, or leave --address out for a local instance")
        host, _, port = resolved.rpartition(":")
    return host.strip("[]"), int(port)


def check_reachable(address: str, where: str = "--address", timeout_s: float = REACH_TIMEOUT_S) -> None:
    """A RaygptError within seconds when nothing, or nothing that speaks gRPC, answers at
    ``address``: ``ray.init`` would retry for minutes, printing a warning every 5 seconds."""
    import grpc

    host, port = _target(address)
    at = f"{host}:{port}" + ("" if address.endswith(f"{host}:{port}") else " (where Ray resolves it)")
    advice = "start it with `ray start --head`, or leave --address out (and unset RAY_ADDRESS) for a local instance"
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__.replace("Error", " error").lower()
        raise RaygptError(f"{where} {address}: no Ray cluster answers at {at} ({reason}); {advice}") from None
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return  # a plain gRPC handshake would fail against TLS
    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        raise RaygptError(f"{where} {address}: {at} accepts connections but is no Ray head (no gRPC "
                          f"within {timeout_s:g} s): the dashboard's port? Give the GCS port (6379) or "
                          "ray://host:10001") from None
    finally:
        channel.close()


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address``, else ``$RAY_ADDRESS`` (set inside Ray jobs), else start a local instance.

    A plain ``ray.init()`` would join whatever cluster ``ray start`` last recorded in Ray's temp
    folder, even one that is gone; ``address="local"`` always starts a fresh one instead. An
    address is checked first, so a wrong one fails in seconds with one message.
    """
    if ray.is_initialized():
        return
    where = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        problem = address_problem(address)
        if problem:
            raise RaygptError(f"{where}: {problem}")
        check_reachable(address, where)
        ray.init(address=address, log_to_driver=True)
    else:
        _start_local(num_cpus)


def _start_local(num_cpus: int | None) -> None:
    """A fresh local instance, every socket of it on loopback: nothing on this machine's
    network interfaces, and its dashboard reachable from here only.

    Ray Train's controller is watched through the State API, which the dashboard serves. The
    instance's processes inherit ``RAY_ADDRESS`` pointing at that dashboard, so they query
    their own instance even when other instances run on this machine.

    ``_node_ip_address`` alone is not enough: Ray replaces a loopback node address with the
    machine's own unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is 0 (the local-only mode it
    uses on laptops). The processes it starts read the variable from their environment; this
    one read it when Ray was imported, so its copy is set for the start and put back after.
    """
    from ray._private import ray_constants

    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port = s.getsockname()[1]
    os.environ["RAY_ADDRESS"] = f"http://{LOOPBACK}:{port}"  # unset here: connect() came this way
    python_path = os.environ.get("PYTHONPATH")
    root = package_root()
    if root:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, python_path] if python_path else [root])
    local_only = os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    enable_cluster, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host=LOOPBACK,
                 dashboard_port=port, log_to_driver=True, _node_ip_address=LOOPBACK)
    finally:
        del os.environ["RAY_ADDRESS"]  # this process is connected; a later connect() starts afresh
        ray_constants.ENABLE_RAY_CLUSTER = enable_cluster
        for name, value in (("PYTHONPATH", python_path), (ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, local_only)):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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
