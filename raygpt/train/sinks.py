"""Where the run's metrics stream goes: each sink is one backend of ``MetricsStream``.

A sink gets every new report (``write``), the whole record list when the stream flushes (at
each checkpoint and at the end), and events that are not a step's metrics. ``replays``: whether
it wants steps trained again after a restart (a live view does; a sink that keeps history,
such as a tracker, has them already). Adding a backend is one class here.

Experiment trackers (``log.trackers``) are sinks too: ``TensorBoardSink``, ``WandbSink`` and
``MlflowSink``, registered in ``TRACKERS``. Their tracker runs are set up by the driver
(``prepare_trackers``), whose ids go into ``run.json`` so that a resumed run continues the
same tracker run; the sinks themselves run in Ray Train's controller, so they hold only
settings until their first use, when they open their client there. A tracker that fails
says so once and stops; training goes on, and ``metrics.jsonl`` still has every step.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from raygpt.config import LogConfig
from raygpt.errors import RaygptError, last_line
from raygpt.stages import METRICS_FILE
from raygpt.storage import Storage, is_remote, join, without_userinfo

logger = logging.getLogger(__name__)

# metrics.jsonl is rewritten whole (object stores cannot append), so not on every report.
METRICS_WRITE_INTERVAL_S = 30.0


class MetricsSink:
    """A backend of the metrics stream; every method may be left as it is."""

    replays = False

    def write(self, report: dict[str, Any], records: list[dict[str, Any]]) -> None:
        """``report`` as a worker sent it; ``records``, the run so far (the last one holds it)."""

    def event(self, event: dict[str, Any]) -> None:
        """A worker failure, a fatal setup error: something that is not a step's metrics."""

    def flush(self, records: list[dict[str, Any]]) -> None:
        """Make what was written durable; ``records`` is the whole run so far."""

    def close(self) -> None:
        """The run (or this session of it) ended."""


class MetricsFile(MetricsSink):
    """``<run>/metrics.jsonl``: one JSON record per reported step, the run as one uninterrupted
    sequence (a resumed attempt's records replace those after its checkpoint).

    A write that fails (the store out for longer than ``storage.retry_minutes``) is logged and
    left to the next flush, which writes every record again: the run goes on, and what the
    workers' checkpoints carry restores the rest if the session ends first."""

    replays = True

    def __init__(self, run_uri: str, storage: Storage):
        self.uri, self.storage = join(run_uri, METRICS_FILE), storage
        self._last_write = time.monotonic()
        self.unwritten: str | None = None
        """Why the last write failed, or None."""

    def write(self, report: dict[str, Any], records: list[dict[str, Any]]) -> None:
        if time.monotonic() - self._last_write > METRICS_WRITE_INTERVAL_S:
            self.flush(records)

    def flush(self, records: list[dict[str, Any]]) -> None:
        self._last_write = time.monotonic()
        try:
            self.storage.write_text(self.uri, "".join(json.dumps(r) + "\n" for r in records))
        except RaygptError as e:
            if self.unwritten is None:
                logger.warning("%s; the next flush writes every record again", e)
            self.unwritten = str(e)
            return
        if self.unwritten is not None:
            logger.warning("%s: written again after a failed write", self.uri)
        self.unwritten = None


class QueueSink(MetricsSink):
    """Forwards reports and events to a queue (the driver's progress view reads it)."""

    replays = True

    def __init__(self, queue):
        self.queue = queue

    def write(self, report: dict[str, Any], records: list[dict[str, Any]]) -> None:
        self.queue.put(report)

    def event(self, event: dict[str, Any]) -> None:
        self.queue.put(event)


def format_samples(step: int, samples: list[dict[str, str]]) -> str:
    """The samples rank 0 generates at a validation (``log.sample_prompts``) as the driver's
    log and the trackers show them: the prompt, then what the model added."""
    lines = [f"samples at step {step}:"]
    lines += [f"  {s['prompt']!r} -> {s['text']!r}" for s in samples]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Experiment trackers

SCALARS = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens": "train/tokens",
    "tokens_per_s": "train/tokens_per_s", "mfu": "train/mfu", "peak_memory_gib": "train/peak_memory_gib",
    "checkpoint_stall_s": "train/checkpoint_stall_s", "epoch": "train/epoch", "val_loss": "val/loss",
}
"""Report keys that trackers log, and their names there (the rest are not metrics: the step,
the device, the number of workers)."""


def tracker_points(report: dict[str, Any]) -> list[tuple[int, dict[str, float]]]:
    """What a tracker logs for one report, as (step, {name: value}) in step order: every step's
    own training loss (``step_losses``), and at the report's step its other scalars."""
    points: dict[int, dict[str, float]] = {}
    per_step = {int(step): loss for step, loss in (report.get("step_losses") or {}).items()}
    for step in sorted(per_step):
        if math.isfinite(per_step[step]):  # a step skipped for a NaN or inf loss has no point
            points[step] = {"train/loss": float(per_step[step])}
    values = points.setdefault(int(report["step"]), {})
    for key, name in SCALARS.items():
        value = report.get(key)
        if key == "loss" and per_step:
            continue  # the window's mean: each step's own loss is logged instead
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            values[name] = float(value)
    return [(step, values) for step, values in sorted(points.items()) if values]


def samples_markdown(samples: list[dict[str, str]]) -> str:
    return "\n\n".join(f"**{s['prompt']}** {s['text']}" for s in samples)


class TrackerSink(MetricsSink):
    """An experiment tracker: opened on first use, in whichever process it then lives in.

    ``final_step``: the last step of this session; after the flush that completes it (its
    checkpoint stall is the last report of a step) the sink closes itself, since Ray Train
    tells a callback nothing when training ends. None: the owner calls ``close``.
    """

    name = "tracker"
    replays = False

    def __init__(self, final_step: int | None = None):
        self.final_step = final_step
        self._opened = self._failed = self._closed = False
        # Steps up to here are in the tracker run already (logged by a session that died before
        # metrics.jsonl caught up) and are not logged again; -1: IFT logs a validation at step 0.
        self._logged_to = -1

    # What each tracker implements.
    def _open(self, first_step: int) -> None:
        """Start or resume the tracker run; ``first_step`` is the first step this session logs.
        May set ``_logged_to`` from what the tracker run holds."""
        raise NotImplementedError

    def _log(self, step: int, values: dict[str, float], walltime: float | None) -> None:
        raise NotImplementedError

    def _log_samples(self, step: int, samples: list[dict[str, str]]) -> None:
        """Training samples of one step (``format_samples`` shows them in the log)."""

    def _log_event(self, text: str) -> None:
        """A worker failure or setup error, as text."""

    def _flush(self) -> None:
        """Make what was logged durable."""

    def _close(self) -> None:
        """End the tracker run."""

    def _guarded(self, action, *args, first_step: int = 1) -> None:
        if self._failed or self._closed:
            return
        try:
            if not self._opened:
                self._open(first_step)
                self._opened = True
            action(*args)
        except Exception as e:  # a tracker must never end a training run: say so once and stop
            self._failed = True
            why = without_userinfo(last_line(str(e)))[:300]  # cleaned before the cut, which could halve a URL
            logger.warning("raygpt: the %s tracker stopped (%s: %s); training goes on and metrics.jsonl keeps "
                           "every step", self.name, type(e).__name__, why)

    def write(self, report: dict[str, Any], records: list[dict[str, Any]]) -> None:
        points = tracker_points(report)
        first = points[0][0] if points else int(report["step"])
        self._guarded(self._write, report, points, first_step=first)

    def _write(self, report: dict[str, Any], points: list[tuple[int, dict[str, float]]]) -> None:
        for step, values in points:
            if step > self._logged_to:
                self._log(step, values, report.get("time"))
        if report.get("samples") and int(report["step"]) > self._logged_to:
            self._log_samples(int(report["step"]), report["samples"])

    def event(self, event: dict[str, Any]) -> None:
        # The attempts table is the progress view's bookkeeping; run.json keeps it.
        if self._opened and event.get("event") != "attempts":
            self._guarded(self._log_event, json.dumps(event, default=str))

    def flush(self, records: list[dict[str, Any]]) -> None:
        if not self._opened:
            return
        self._guarded(self._flush)
        last = records[-1] if records else {}
        if self.final_step is not None and last.get("step") == self.final_step and "checkpoint_stall_s" in last:
            self.close()

    def close(self) -> None:
        if self._opened and not self._closed:
            self._guarded(self._close)
            self._closed = True


def _summary_writer_class():
    """tensorboardX's SummaryWriter (small, no TensorFlow), else torch's (needs ``tensorboard``)."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter


class TensorBoardSink(TrackerSink):
    """TensorBoard event files in ``logdir`` (a local folder or an ``s3://`` prefix, written
    locally and uploaded at every flush). A resumed session writes a new event file and purges
    what an earlier session logged from its first step on, so TensorBoard shows each step once."""

    name = "tensorboard"

    def __init__(self, logdir: str, storage: Storage, final_step: int | None = None):
        super().__init__(final_step)
        self.logdir, self.storage = logdir, storage

    def _open(self, first_step: int) -> None:
        local = tempfile.mkdtemp(prefix="raygpt-tensorboard-") if is_remote(self.logdir) else self.logdir
        Path(local).mkdir(parents=True, exist_ok=True)
        self._local = local
        # A suffix of its own: two sessions started within one second on one host must not
        # write (or upload) the same file name.
        self._writer = _summary_writer_class()(local, purge_step=first_step if first_step > 1 else None,
                                               flush_secs=30, filename_suffix=f".{secrets.token_hex(4)}")

    def _log(self, step: int, values: dict[str, float], walltime: float | None) -> None:
        for name, value in values.items():
            self._writer.add_scalar(name, value, global_step=step, walltime=walltime)

    def _log_samples(self, step: int, samples: list[dict[str, str]]) -> None:
        self._writer.add_text("samples", samples_markdown(samples), global_step=step)

    def _log_event(self, text: str) -> None:
        self._writer.add_text("events", text)

    def _flush(self) -> None:
        self._writer.flush()
        self._upload()

    def _close(self) -> None:
        self._writer.close()
        self._upload()

    def _upload(self) -> None:
        if is_remote(self.logdir):
            for path in sorted(Path(self._local).iterdir()):
                self.storage.upload(path, join(self.logdir, path.name))


class WandbSink(TrackerSink):
    """A Weights & Biases run (online, or offline files that ``wandb sync`` uploads later),
    resumed by its id. W&B itself ignores a step at or below one a resumed run already has."""

    name = "wandb"

    def __init__(self, ids: dict[str, Any], config: dict[str, Any], final_step: int | None = None):
        super().__init__(final_step)
        self.ids, self.config = ids, config

    def _open(self, first_step: int) -> None:
        import wandb

        Path(self.ids["dir"]).mkdir(parents=True, exist_ok=True)
        # console="off": Ray already collects this process's output; W&B must not wrap it.
        # reinit="create_new": a process that already ran a W&B run (a Ray worker that ran
        # another IFT model) starts a run of its own; otherwise W&B drops what it logs.
        self._run = wandb.init(project=self.ids["project"], entity=self.ids.get("entity"), id=self.ids["id"],
                               name=self.ids["name"], resume="allow", reinit="create_new", mode=self.ids["mode"],
                               dir=self.ids["dir"], config=self.config, tags=self.ids.get("tags") or None,
                               settings=wandb.Settings(console="off", silent=True))

    def _log(self, step: int, values: dict[str, float], walltime: float | None) -> None:
        self._run.log(values, step=step)

    def _log_samples(self, step: int, samples: list[dict[str, str]]) -> None:
        import wandb

        table = wandb.Table(columns=["prompt", "sample"], data=[[s["prompt"], s["text"]] for s in samples])
        self._run.log({"samples": table}, step=step)

    def _log_event(self, text: str) -> None:
        self._run.summary["last_event"] = text

    def _close(self) -> None:
        self._run.finish()


MLFLOW_STATUS = {"interrupted": "KILLED", "failed": "FAILED"}
"""How a session that ended badly reads in MLflow."""


class MlflowSink(TrackerSink):
    """An MLflow run on a tracking server or local store, created by ``prepare_trackers``. A
    resumed session asks the run for its last step first, and logs only the steps after it."""

    name = "mlflow"
    BATCH = 1000  # MLflow's limit of metrics per log_batch call

    def __init__(self, ids: dict[str, Any], final_step: int | None = None):
        super().__init__(final_step)
        self.ids = ids

    def _open(self, first_step: int) -> None:
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(self.ids["tracking_uri"])
        if first_step > 1:  # a resumed run: what did the session before this one log?
            history = self._client.get_metric_history(self.ids["run_id"], "train/loss")
            self._logged_to = max((m.step for m in history), default=-1)

    def _log(self, step: int, values: dict[str, float], walltime: float | None) -> None:
        from mlflow.entities import Metric

        millis = int((walltime or time.time()) * 1000)
        metrics = [Metric(name, value, millis, step) for name, value in values.items()]
        for start in range(0, len(metrics), self.BATCH):
            self._client.log_batch(self.ids["run_id"], metrics=metrics[start:start + self.BATCH])

    def _log_samples(self, step: int, samples: list[dict[str, str]]) -> None:
        self._client.log_text(self.ids["run_id"], format_samples(step, samples), f"samples/step_{step:08d}.txt")

    def _log_event(self, text: str) -> None:
        self._client.set_tag(self.ids["run_id"], "raygpt.last_event", text[:5000])

    def _close(self) -> None:
        self._client.set_terminated(self.ids["run_id"], "FINISHED")


# ---------------------------------------------------------------------------------------------
# Setting tracker runs up (in the driver) and building their sinks


TRACKERS = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "mlflow": MlflowSink}
"""``log.trackers`` names and their sinks."""

TRACKER_PACKAGES = {"tensorboard": ("tensorboardX", "tensorboard"), "wandb": ("wandb",), "mlflow": ("mlflow",)}
"""The packages each tracker needs (any one of them), by ``log.trackers`` name."""


def prepare_trackers(log: LogConfig, name: str, tensorboard_dir: str, config: dict[str, Any],
                     previous: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The tracker runs of a run named ``name``, by tracker: what each sink needs to log to it.

    ``previous`` (from the run's ``run.json``) is reused, so a resumed run continues its
    tracker runs. New ones: TensorBoard's folder (``log.tensorboard_dir``, else
    ``tensorboard_dir``); a fresh W&B id; an MLflow run created here, under the experiment
    ``log.project``, with the spec as its parameters. A missing package is one RaygptError.
    """
    previous = previous or {}
    ids: dict[str, dict[str, Any]] = {}
    for tracker in log.trackers:
        if not any(importlib.util.find_spec(package) for package in TRACKER_PACKAGES[tracker]):
            raise RaygptError(f"log.trackers: {tracker} needs the {TRACKER_PACKAGES[tracker][0]} package: "
                              f"pip install 'raygpt[{tracker}]', or remove {tracker} from log.trackers")
        if tracker == "tensorboard":
            ids[tracker] = previous.get(tracker) or {"logdir": _absolute(log.tensorboard_dir or tensorboard_dir)}
        elif tracker == "wandb":
            ids[tracker] = previous.get(tracker) or _new_wandb_run(log, name)
        elif tracker == "mlflow":
            ids[tracker] = _mlflow_run(log, name, config, previous.get(tracker))
    return ids


def end_tracker_runs(ids: dict[str, dict[str, Any]], status: str) -> None:
    """Mark the tracker runs of a session that failed or was interrupted, from the driver (the
    sinks themselves ran in Ray Train's controller). MLflow gets FAILED or KILLED; a W&B run
    ends with its process's exit code, as W&B records it; TensorBoard has no run status."""
    if status not in MLFLOW_STATUS or "mlflow" not in ids:
        return
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(ids["mlflow"]["tracking_uri"]).set_terminated(ids["mlflow"]["run_id"], MLFLOW_STATUS[status])
    except Exception as e:  # the tracker is unreachable: the run record still says what happened
        logger.warning("raygpt: could not mark the MLflow run %s (%s: %s)", status, type(e).__name__,
                       without_userinfo(last_line(str(e)))[:300])


def tracker_sinks(ids: dict[str, dict[str, Any]], storage: Storage, config: dict[str, Any],
                  final_step: int | None = None) -> list[TrackerSink]:
    """A sink per tracker run of ``prepare_trackers``; nothing is opened until first used."""
    sinks: list[TrackerSink] = []
    for tracker, tracker_ids in ids.items():
        if tracker == "tensorboard":
            sinks.append(TensorBoardSink(tracker_ids["logdir"], storage, final_step))
        elif tracker == "wandb":
            sinks.append(WandbSink(tracker_ids, config, final_step))
        elif tracker == "mlflow":
            sinks.append(MlflowSink(tracker_ids, final_step))
    return sinks


def _absolute(uri: str) -> str:
    """Local paths made absolute: the sink may run in another process, in another folder."""
    return uri if is_remote(uri) else str(Path(uri).expanduser().absolute())


def _new_wandb_run(log: LogConfig, name: str) -> dict[str, Any]:
    # W&B's own ids are 8 lowercase letters and digits; any such string names a new run.
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return {"id": "".join(secrets.choice(alphabet) for _ in range(8)), "name": name, "project": log.project,
            "entity": log.wandb_entity, "mode": log.wandb_mode or os.environ.get("WANDB_MODE") or "online",
            "dir": _absolute(log.wandb_dir or os.environ.get("WANDB_DIR") or ".raygpt/wandb"), "tags": list(log.tags)}


def _mlflow_run(log: LogConfig, name: str, config: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    import mlflow
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    uri = log.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    # Relative locations made absolute: the sink runs in another process, maybe in another folder.
    if uri.startswith("file:") and not uri.startswith("file:/"):
        uri = "file:" + str(Path(uri[len("file:"):]).absolute())
    elif uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).absolute())
    elif not urlsplit(uri).scheme:  # a bare folder, which MLflow reads as a file store
        uri = str(Path(uri).absolute())
    try:
        client = MlflowClient(uri)
        # run.json keeps the URI without its user:password: the same store all the same.
        if previous and without_userinfo(previous.get("tracking_uri")) == without_userinfo(uri):
            client.update_run(previous["run_id"], status="RUNNING")
            return {**previous, "tracking_uri": uri}
        experiment = client.get_experiment_by_name(log.project)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(log.project)
        tags = {"raygpt.run": name, **{key: value for key, _, value in (tag.partition(":") for tag in log.tags)}}
        run = client.create_run(experiment_id, run_name=name, tags=tags)
        params = [Param(key, str(value)[:500]) for key, value in _flatten(config).items()]
        for start in range(0, len(params), 100):  # MLflow's limit of parameters per call
            client.log_batch(run.info.run_id, params=params[start:start + 100])
    except Exception as e:  # MlflowException, connection and store errors
        raise RaygptError(f"log.trackers: mlflow: cannot set up a run at {without_userinfo(uri)} ({type(e).__name__}: "
                          f"{without_userinfo(last_line(str(e)))[:300]}); set log.mlflow_tracking_uri or "
                          "$MLFLOW_TRACKING_URI") from None
    return {"run_id": run.info.run_id, "experiment_id": experiment_id, "tracking_uri": uri}


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
