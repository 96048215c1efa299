"""An elastic run's restarts after a node loss: on the nodes that answer, without waiting.

Ray Train sizes an elastic run by what Ray Data's autoscaling coordinator (a named actor)
reserves for it, recomputed from Ray's node table every 20 s; and a node killed outright is
dead in that table only once its health checks fail (15 s by default). Until then Ray Train
restarts the run at the old size and waits for workers that cannot start
(``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``, 60 s). Here, through Ray Train's controller
hooks and Ray's own settings: ``SurvivorSizing`` restarts on the workers that fit on the
nodes that answer, and ``shrink_without_waiting`` shortens the wait when the view is stale
anyway. Everything that touches Ray Train beyond its public API is here, with the reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

import ray
from ray.train.v2._internal.execution.callback import ControllerCallback

from raygpt.cluster import alive_nodes
from raygpt.errors import last_line

logger = logging.getLogger(__name__)


ELASTIC_START_TIMEOUT_S = 5.0
"""How long Ray Train waits for an elastic run's workers to start before it asks again what
the cluster holds (its default, 60 s, is for fixed-size runs waiting for a node to come)."""

NODE_DEATH_WAIT_S = 120.0
"""How long a node that stopped answering counts as lost while Ray's node table holds it
alive (a node that answers again after that is used again)."""


class SurvivorSizing(ControllerCallback):
    """An elastic run restarted after a node loss asks for the workers that fit on the nodes
    that answer, and places them there.

    raygpt knows of a lost node before Ray's node table does: its raylet does not answer
    (``raygpt.cluster.classify_failure``). So ``node_lost`` keeps the node out: the resize
    decision Ray Train is about to execute is lowered to the workers that fit on the other
    nodes (a ``ControllerCallback`` hook, Ray Train's developer API; Ray Train runs callbacks
    given in ``RunConfig`` that are not user callbacks as its own), the workers' placement
    group avoids the node (a ``ray.io/node-id`` label selector), and once the node table holds
    the node dead the coordinator is asked to recompute (its own ``recompute=True``), so that
    Ray Train does not size the run by the stale view again (which would restart it at the
    size it has)."""

    def __init__(self, resources_per_worker: dict[str, float], min_workers: int):
        self.resources_per_worker, self.min_workers = resources_per_worker, min_workers
        self.lost: set[str] = set()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # pickled into Ray Train's controller: a lock does not travel
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def node_lost(self, node_ids: set[str]) -> None:
        with self._lock:
            fresh = node_ids - self.lost
            self.lost |= fresh
        if fresh:
            threading.Thread(target=self._watch, args=(fresh,), name="raygpt-lost-nodes", daemon=True).start()

    def _watch(self, nodes: set[str]) -> None:
        deadline = time.monotonic() + NODE_DEATH_WAIT_S
        try:
            while nodes & alive_nodes():
                if time.monotonic() > deadline:  # it answers again: not lost after all
                    with self._lock:
                        self.lost -= nodes & alive_nodes()
                    return
                time.sleep(0.5)
            coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
            ray.get(coordinator.get_reserved_resources.remote("raygpt", recompute=True), timeout=30)
        except Exception as e:  # Ray's internals changed: its own view catches up within 20 s
            logger.warning("could not refresh Ray Train's resource view (%s: %s)", type(e).__name__,
                           last_line(str(e)))

    def workers_that_fit(self) -> int:
        """Workers that fit on the nodes Ray's node table holds alive, the lost ones left out."""
        with self._lock:
            lost = set(self.lost)
        need = {k: v for k, v in self.resources_per_worker.items() if v > 0}
        return sum(int(min(node["Resources"].get(k, 0.0) // v for k, v in need.items()))
                   for node in ray.nodes() if node["Alive"] and node["NodeID"] not in lost)

    def before_controller_execute_resize_decision(self, resize_decision) -> None:
        if not self.lost:
            return
        fit = self.workers_that_fit()
        if self.min_workers <= fit < resize_decision.num_workers:
            logger.warning("restarting on %d worker(s): node(s) %s do not answer", fit, ", ".join(sorted(self.lost)))
            resize_decision.num_workers = fit

    def on_controller_start_worker_group(self, *, scaling_config, num_workers: int) -> dict[str, str] | None:
        with self._lock:
            lost = sorted(self.lost)
        return {"ray.io/node-id": f"!in({', '.join(lost)})"} if lost else None


@contextlib.contextmanager
def shrink_without_waiting(elastic: bool):
    """While an elastic run's trainer starts: after a node goes without notice, Ray Train
    restarts the run at the size its resource view last showed (refreshed every 20 s; a node
    killed outright counts as alive until its health checks fail), waits for workers that
    cannot start until ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (60 s) passes, and only then
    starts the workers that fit. An elastic run waits ``ELASTIC_START_TIMEOUT_S`` instead,
    unless the variable is set. Ray Train hands the variable to its controller when ``fit``
    starts it; it is put back after, so a fixed-size run started later keeps Ray's default."""
    if not elastic or "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S" in os.environ:
        yield
        return
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(ELASTIC_START_TIMEOUT_S)
    try:
        yield
    finally:
        del os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"]
