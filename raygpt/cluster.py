"""Ray as raygpt uses it: joining a cluster, what tasks inherit, and what a failure says.

Everything that touches Ray beyond its public API is here, each with the reason: Ray Train
logs every report under a logger named after an internal file (``quiet_report_logs``), the
controller's report polling is a setting read from the environment
(``poll_reports_often``), workers put the driver's folder first on their path, where a
``raygpt/`` checkout would shadow the installed package (``package_root``), Ray turns a
loopback node address into the machine's own (``_start_local``), ``ray.init`` retries an
address that does not answer for minutes (``check_reachable``), and why an attempt ended is
read from Ray Train's wrapper of a lost worker's error, Ray's actor table and the raylets'
own health check (``classify_failure``). How an elastic run continues on the nodes that
answer is ``raygpt.train.elastic``.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray

from raygpt.errors import RaygptError, last_line
from raygpt.storage import StoreUnreachableError
from raygpt.storage.retry import StoreUnavailableError

logger = logging.getLogger(__name__)

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


ON_HEAD_NODE = {"node:__internal_head__": 0.001}
"""Resources that place an actor on the head node and reserve nothing anything else needs: the
resource Ray gives its head node by this name (Ray Train places its state actor with the same
request; no public API names it). A sweep's trials, each only the driver of its run, go there:
the head is on demand in raygpt's cluster files, so a spot reclaim never takes a run's driver."""

FAIL_AT_STEP_ENV = "RAYGPT_TEST_FAIL_AT_STEP"
"""Fault injection for tests, kept out of the user's spec: set to k, the last training worker
exits hard at step k, once per run."""

# Settings (never credentials) that say where local copies live, and the tests' fault
# injection. Ray's workers inherit the environment of the node they run on, not the driver's,
# so tasks get these explicitly.
FORWARDED_ENV = ("RAYGPT_HF_DIR", "RAYGPT_BPE_DIR", "RAYGPT_CACHE_DIR", "HF_HOME", "HF_HUB_OFFLINE", "HF_ENDPOINT",
                 "RAYGPT_LOG_LEVEL", FAIL_AT_STEP_ENV)


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


def _failure_chain(error: BaseException):
    """``error``, its causes and the workers' exceptions inside a Ray failure, each once."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        e = pending.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        pending.extend([getattr(e, "cause", None), e.__cause__, getattr(e, "controller_failure", None),
                        getattr(e, "_base_exc", None)])
        pending.extend(getattr(e, "worker_failures", {}).values())


def store_outage(error: BaseException) -> BaseException | None:
    """The store outage that outlasted ``storage.retry_minutes`` inside a Ray failure, or None."""
    return next((e for e in _failure_chain(error) if isinstance(e, (StoreUnavailableError, StoreUnreachableError))),
                None)


def failure_message(error: BaseException, what: str = "training") -> str:
    """The user-facing message inside a Ray failure (Ray Train's ``TrainingFailedError``, a
    task's ``RayTaskError``): a store outage that outlasted the retries, else the first
    RaygptError among the causes and the workers' exceptions, else the last line of the first
    one's error."""
    outage = store_outage(error)
    if outage is not None:
        return (f"{what} stopped: the store did not answer ({last_line(str(outage))}); run the same command again "
                "once it answers: the run resumes from its last checkpoint")
    raygpt_error = next((e for e in _failure_chain(error) if isinstance(e, RaygptError)), None)
    if raygpt_error is not None:
        return str(raygpt_error)
    failures = getattr(error, "worker_failures", None) or {}
    first = next(iter(failures.values()), error)
    return f"{what} failed: {last_line(str(first))[:400]} (see the worker logs)"


FAILURE_KINDS = ("node lost", "worker lost", "worker error")
"""Why a worker failed, the most telling first: a node that goes takes its workers along, and
their peers' collectives fail too."""


def alive_nodes() -> set[str]:
    """The ids of the nodes Ray's node table holds alive."""
    return {node["NodeID"] for node in ray.nodes() if node["Alive"]}


HEALTH_CHECK_TIMEOUT_S = 2.0
"""How long a node's raylet has to answer ``lost_nodes``' health check."""


def lost_nodes(node_ids: set[str]) -> set[str]:
    """Of ``node_ids``, those Ray's node table holds dead, and those whose raylet does not
    answer the gRPC health check the GCS itself sends every 3 s within
    ``HEALTH_CHECK_TIMEOUT_S``: a node killed outright or frozen is dead in the node table
    only after 5 failed checks (15 s), and its workers' peers fail first, in a collective."""
    import grpc

    table = {node["NodeID"]: node for node in ray.nodes()}

    def answers(node_id: str) -> bool:
        node = table.get(node_id)
        if node is None or not node["Alive"]:
            return False
        with grpc.insecure_channel(f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}") as channel:
            try:
                channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=HEALTH_CHECK_TIMEOUT_S)
            except grpc.RpcError:
                return False
        return True

    ids = sorted(node_ids)
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(ids)))) as pool:
        return {node for node, up in zip(ids, pool.map(answers, ids)) if not up}


def crashed_actors(actor_ids: set[str]) -> set[str]:
    """Of ``actor_ids``, those whose process died (it crashed, was killed by a signal or for
    memory, or its node went), by Ray's actor table (``ray._private.state.actors`` reads the
    GCS's table; the public State API needs the dashboard). Actors Ray Train stopped itself
    (``RAY_KILL``) are not among them."""
    from ray._private.state import actors
    from ray.core.generated.common_pb2 import ActorDiedErrorContext

    died = {ActorDiedErrorContext.WORKER_DIED, ActorDiedErrorContext.NODE_DIED}
    crashed = set()
    for actor in actor_ids:
        info = actors(actor_id=actor) or {}
        cause = info.get("DeathCause")
        if info.get("State") != "DEAD" or cause is None:
            continue
        if cause.HasField("oom_context") or (cause.HasField("actor_died_error_context")
                                             and cause.actor_died_error_context.reason in died):
            crashed.add(actor)
    return crashed


def worker_failure_kind(error: BaseException | None, node_lost: bool, process_died: bool) -> str:
    """Why a training worker failed, from Ray's exception types and the state of its node and
    process (``lost_nodes``, ``crashed_actors``):

    - ``node lost``: its node does not answer, or its actor is gone and Ray could not reach
      the node either (``ActorUnavailableError``);
    - ``worker lost``: its process died on a node that answers (out of memory, a signal, a
      crash), by Ray's actor table or its exception (``RayActorError``);
    - ``worker error``: the training code raised (a peer's collective failing included).

    Ray Train reports a worker that no longer answers as ``WorkerHealthCheckFailedError``
    (not public API), whose ``health_check_failure`` is Ray's own exception.
    """
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    cause = error.health_check_failure if isinstance(error, WorkerHealthCheckFailedError) else error
    if node_lost or isinstance(cause, ActorUnavailableError):
        return "node lost"
    if process_died or isinstance(cause, RayActorError):
        return "worker lost"
    return "worker error"


def classify_failure(errors: dict[int, BaseException], nodes: list[str | None],
                     actors: list[str | None]) -> tuple[int, str, set[str]]:
    """Why an attempt ended: (the rank that says it best, its kind, the lost nodes), from
    the workers' ``errors`` by rank and where each rank ran (``nodes``, ``actors``: from the
    attempt's first report; empty when it failed before). A node that goes takes its workers
    along, and their peers' collectives fail first: every rank is looked at, not only the
    ones whose errors came in."""
    lost = lost_nodes({node for node in nodes if node})
    dead = crashed_actors({actor for actor in actors if actor})
    ranks = sorted(set(errors) | set(range(len(nodes))))
    kinds = {rank: worker_failure_kind(errors.get(rank), rank < len(nodes) and nodes[rank] in lost,
                                       rank < len(actors) and actors[rank] in dead) for rank in ranks}
    told = {rank: kind for rank, kind in kinds.items() if rank in errors or kind != "worker error"}
    rank = min(told, key=lambda r: (FAILURE_KINDS.index(told[r]), r))
    return rank, told[rank], lost


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
