"""Experiment trackers on the metrics stream: each step logged once, across restarts, read back
with each tracker's own reader (TensorBoard event files, MLflow's client on a local store, W&B
offline run files). The W&B and MLflow tests skip when their package is not installed (the
test extra installs both)."""

from __future__ import annotations

import glob
import json
import pickle
import socket
import struct
import time
from pathlib import Path

import pytest

from raygpt.config import load_spec, recorded_spec
from raygpt.errors import RaygptError
from raygpt.storage import Storage
from raygpt.train.metrics import MetricsStream
from raygpt.train.sinks import (
    MlflowSink,
    TensorBoardSink,
    WandbSink,
    end_tracker_runs,
    prepare_trackers,
    tracker_points,
    tracker_sinks,
)

SAMPLES = [{"prompt": "Once", "text": " upon a time"}]


def report(step: int, first: int, **extra):
    """A worker's report at ``step`` covering steps first..step."""
    losses = {str(s): 10.0 - s / 10 for s in range(first, step + 1)}
    return {"step": step, "tokens": step * 64, "loss": sum(losses.values()) / len(losses), "step_losses": losses,
            "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1000.0, "mfu": None, "time": 1_700_000_000.0 + step,
            **extra}


def two_sessions(make_sinks):
    """Session 1 trains steps 1-6 (checkpoints at 3 and 6), loses a worker and resumes from 3 in
    the same stream, then dies at step 8 with only records to step 6 flushed; session 2 starts
    from those records and the checkpoint at 6 and trains to 10. Returns the flushed records."""
    sinks = make_sinks()
    stream = MetricsStream([], sinks)
    stream.add(report(2, 1, resumed_from_step=0))
    stream.add(report(3, 3), checkpoint="checkpoint_00000003")
    stream.add({"step": 3, "checkpoint_stall_s": 0.1})
    stream.add(report(4, 4, val_loss=9.5, samples=SAMPLES))
    stream.event({"event": "worker_failure", "rank": 1, "error": "ActorDiedError"})
    stream.add(report(4, 4, val_loss=9.5, samples=SAMPLES, resumed_from_step=3))  # replayed: not logged again
    stream.add(report(6, 5), checkpoint="checkpoint_00000006")
    stream.add({"step": 6, "checkpoint_stall_s": 0.1})
    flushed = [dict(r) for r in stream.records]
    stream.add(report(8, 7, val_loss=9.2, samples=SAMPLES))  # logged, but the driver dies before it is flushed
    for sink in sinks:
        sink.close()

    sinks = make_sinks()
    stream = MetricsStream(flushed, sinks)
    stream.add(report(8, 7, val_loss=9.2, samples=SAMPLES, resumed_from_step=6))
    stream.add(report(10, 9, val_loss=9.0), checkpoint="checkpoint_00000010")
    stream.add({"step": 10, "checkpoint_stall_s": 0.1})  # the last report: the sinks close themselves
    return stream.records


def expected_losses():
    return {s: pytest.approx(10.0 - s / 10) for s in range(1, 11)}


# ---------------------------------------------------------------------------------------------
# What a tracker logs


def test_tracker_points_log_every_step_loss_and_the_report_scalars_at_its_step():
    points = tracker_points(report(4, 3, val_loss=9.5))
    assert [step for step, _ in points] == [3, 4]
    assert points[0][1] == {"train/loss": pytest.approx(9.7)}
    assert points[1][1] == {"train/loss": pytest.approx(9.6), "train/tokens": 256.0, "train/lr": 1e-3,
                            "train/grad_norm": 0.5, "train/tokens_per_s": 1000.0, "val/loss": 9.5}
    # A step skipped for a non-finite loss has no point; its neighbours keep theirs.
    skipped = tracker_points({"step": 4, "step_losses": {"3": float("nan"), "4": 9.6}, "loss": 9.6,
                              "grad_norm": float("inf"), "skipped_steps": [3]})
    assert skipped == [(4, {"train/loss": pytest.approx(9.6)})]
    # IFT reports have no per-step losses: their loss is the window's.
    assert tracker_points({"step": 50, "loss": 1.5, "val_loss": 1.7, "epoch": 0.5}) == [
        (50, {"train/loss": 1.5, "train/epoch": 0.5, "val/loss": 1.7})]


# ---------------------------------------------------------------------------------------------
# TensorBoard


def read_tensorboard(logdir: Path) -> tuple[dict[str, dict[int, float]], dict[int, str]]:
    """Scalars by tag and step, and the samples text by step, as TensorBoard shows them: with the
    ``tensorboard`` package's EventAccumulator when installed, else by reading the event files'
    records with tensorboardX's protos (applying the same purge of steps a later session redid)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return _read_event_files(logdir)
    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    scalars = {tag: {e.step: e.value for e in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]}
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in accumulator.Tensors("samples/text_summary")} \
        if "samples/text_summary" in accumulator.Tags()["tensors"] else {}
    return scalars, texts


def _read_event_files(logdir: Path) -> tuple[dict[str, dict[int, float]], dict[int, str]]:
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        position = 0
        while position < len(data):
            (length,) = struct.unpack("<Q", data[position:position + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[position + 12:position + 12 + length])
            events.append(event)
            position += 12 + length + 4  # length, its CRC, the record, its CRC
    scalars: dict[str, dict[int, float]] = {}
    texts: dict[int, str] = {}
    for event in events:
        if event.HasField("session_log") and event.session_log.status == event.session_log.START:
            for values in scalars.values():  # purge_step: what an earlier session logged from here on
                for step in [s for s in values if s >= event.step]:
                    del values[step]
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
            elif value.tag.startswith("samples"):
                texts[event.step] = value.tensor.string_val[0].decode()
    return scalars, texts


def test_tensorboard_logs_each_step_once_across_restarts_and_sessions(tmp_path):
    pytest.importorskip("tensorboardX")
    logdir = tmp_path / "tb"
    two_sessions(lambda: [TensorBoardSink(str(logdir), Storage(), final_step=10)])
    scalars, texts = read_tensorboard(logdir)
    assert scalars["train/loss"] == expected_losses()
    assert sorted(scalars["val/loss"]) == [4, 8, 10]
    assert scalars["train/checkpoint_stall_s"] == {3: pytest.approx(0.1), 6: pytest.approx(0.1),
                                                   10: pytest.approx(0.1)}
    assert sorted(texts) == [4, 8] and "Once" in texts[4] and "upon a time" in texts[4]
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 2  # one file per session


def test_tensorboard_to_object_storage_uploads_the_event_files(s3_env, tmp_path):
    pytest.importorskip("tensorboardX")
    uri = f"s3://{s3_env.bucket}/tb-{tmp_path.name}"
    two_sessions(lambda: [TensorBoardSink(uri, Storage(), final_step=10)])
    storage = Storage()
    names = storage.list(uri)
    assert len(names) == 2 and all(n.startswith("events.out.tfevents.") for n in names)
    local = tmp_path / "downloaded"
    for name in names:
        storage.download(f"{uri}/{name}", local / name)
    assert read_tensorboard(local)[0]["train/loss"] == expected_losses()


def test_tracker_sinks_pickle_until_used_and_a_broken_tracker_only_warns(tmp_path, capsys):
    pytest.importorskip("tensorboardX")
    sink = TensorBoardSink(str(tmp_path / "tb"), Storage(), final_step=4)
    sink = pickle.loads(pickle.dumps(sink))  # as Ray ships the callback to the Train controller
    sink.write(report(2, 1), [])
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))

    class Broken(TensorBoardSink):
        def _log(self, step, values, walltime):
            raise ConnectionError("tracker server gone\nsecond line")

    broken = Broken(str(tmp_path / "tb2"), Storage())
    broken.write(report(2, 1), [])
    broken.write(report(4, 3), [])
    broken.close()
    err = capsys.readouterr().err
    assert err.count("the tensorboard tracker stopped (ConnectionError: second line)") == 1
    assert "training goes on" in err


def test_a_tracker_without_its_package_is_one_error_naming_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    spec = load_spec(None, ["log.trackers=[wandb]"])
    with pytest.raises(RaygptError, match=r"log.trackers: wandb needs the wandb package: pip install 'raygpt\[wandb\]'"):
        prepare_trackers(spec.log, "run", "/tmp/tb", {})


# ---------------------------------------------------------------------------------------------
# MLflow: a local file store, read back through MlflowClient


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores otherwise
    return f"file:{tmp_path / 'mlruns'}"


def test_mlflow_logs_each_step_once_and_a_resumed_run_continues_the_same_run(mlflow_store, tmp_path):
    from mlflow.tracking import MlflowClient

    spec = load_spec(None, ["name=tracked", "log.trackers=[mlflow]", f"log.mlflow_tracking_uri={mlflow_store}",
                            "log.project=raygpt-tests", "train.lr=0.002", "log.tags=[variant:wd-0.01, seed:7, baseline]"])
    config = recorded_spec(spec)
    first = prepare_trackers(spec.log, spec.name, str(tmp_path / "tb"), config)
    run_ids = []

    def sinks():
        # Each session prepares its trackers from the previous run.json, as launch does.
        ids = prepare_trackers(spec.log, spec.name, str(tmp_path / "tb"), config, previous=first)
        run_ids.append(ids["mlflow"]["run_id"])
        return tracker_sinks(ids, Storage(), config, final_step=10)

    two_sessions(sinks)
    assert run_ids == [first["mlflow"]["run_id"]] * 2  # one MLflow run for both sessions
    client = MlflowClient(mlflow_store)
    run = client.get_run(first["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert client.get_experiment(run.info.experiment_id).name == "raygpt-tests"
    assert run.data.params["train.lr"] == "0.002" and run.data.params["log.trackers"] == "['mlflow']"
    assert run.data.tags["variant"] == "wd-0.01" and run.data.tags["seed"] == "7" and run.data.tags["baseline"] == ""
    history = client.get_metric_history(run.info.run_id, "train/loss")
    # Steps 7 and 8 were logged by the session that died; the next one trains them again (the
    # stream only knows what metrics.jsonl kept) and asks the run what it has: once each.
    assert sorted(m.step for m in history) == list(range(1, 11))
    assert {m.step: m.value for m in history} == expected_losses()
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/loss")) == [4, 8, 10]
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert samples == ["samples/step_00000004.txt", "samples/step_00000008.txt"]
    assert "upon a time" in Path(client.download_artifacts(run.info.run_id, samples[0], str(tmp_path))).read_text()
    assert "worker_failure" in run.data.tags["raygpt.last_event"]


def test_a_session_that_fails_marks_its_mlflow_run_failed_and_a_resume_runs_it_again(mlflow_store, tmp_path):
    from mlflow.tracking import MlflowClient

    spec = load_spec(None, ["name=tracked", "log.trackers=[mlflow]", f"log.mlflow_tracking_uri={mlflow_store}"])
    config = recorded_spec(spec)
    ids = prepare_trackers(spec.log, spec.name, str(tmp_path / "tb"), config)
    stream = MetricsStream([], tracker_sinks(ids, Storage(), config, final_step=10))
    stream.add(report(2, 1, resumed_from_step=0))
    end_tracker_runs(ids, "failed")  # what the driver does when the run fails for good
    client = MlflowClient(mlflow_store)
    assert client.get_run(ids["mlflow"]["run_id"]).info.status == "FAILED"

    again = prepare_trackers(spec.log, spec.name, str(tmp_path / "tb"), config, previous=ids)
    assert client.get_run(again["mlflow"]["run_id"]).info.status == "RUNNING"
    stream = MetricsStream([], tracker_sinks(again, Storage(), config, final_step=10))
    stream.add(report(10, 3, resumed_from_step=2), checkpoint="checkpoint_00000010")
    stream.add({"step": 10, "checkpoint_stall_s": 0.1})
    assert client.get_run(ids["mlflow"]["run_id"]).info.status == "FINISHED"


def test_an_unreachable_mlflow_server_is_one_error_without_the_password_of_its_url(monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = load_spec(None, ["log.trackers=[mlflow]", f"log.mlflow_tracking_uri=http://u:pw-Mq4@127.0.0.1:{port}"])
    with pytest.raises(RaygptError) as err:
        prepare_trackers(spec.log, "run", "/tmp/tb", recorded_spec(spec))
    assert f"cannot set up a run at http://127.0.0.1:{port} " in str(err.value) and "pw-Mq4" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# W&B offline: the run files read back


def read_wandb_records(run_file: str) -> list:
    """The records of an offline ``run-<id>.wandb`` file (LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(run_file).read_bytes()
    block, position, pending, payloads = 32768, 7, b"", []  # 7: the ":W&B" file header
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a record header is padding
            position += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            position += left
            continue
        payload = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 1:  # full
            payloads.append(payload)
        elif kind == 2:  # first
            pending = payload
        elif kind == 3:  # middle
            pending += payload
        else:  # last
            payloads.append(pending + payload)
    records = []
    for raw in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def read_wandb_history(run_file: str) -> list[dict]:
    """The history rows of an offline run file."""
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for record in read_wandb_records(run_file) if record.WhichOneof("record_type") == "history"]


def wait_for_wandb_exit(run_files: list[str], ceiling_s: float = 300) -> None:
    """Until every run file holds its run's exit record. ``run.finish()`` returns before W&B's
    service process has written a run's last records to an offline file (it goes on writing
    them, even when the process that logged them is killed right after: tried 6 times under
    a throttled CPU); ``ceiling_s`` only stops a hang."""
    ceiling = time.monotonic() + ceiling_s
    while not all(any(r.WhichOneof("record_type") == "exit" for r in read_wandb_records(f)) for f in run_files):
        assert time.monotonic() < ceiling, f"no exit record in {run_files} after {ceiling_s} s"
        time.sleep(0.1)


def test_wandb_offline_logs_each_step_once_under_one_run_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = load_spec(None, ["name=tracked", "log.trackers=[wandb]", f"log.wandb_dir={tmp_path / 'wandb'}",
                            "log.tags=[variant:wd-0.01, seed:7]"])
    first = prepare_trackers(spec.log, spec.name, str(tmp_path / "tb"), {})
    assert first["wandb"]["tags"] == ["variant:wd-0.01", "seed:7"]
    assert first["wandb"]["mode"] == "offline" and len(first["wandb"]["id"]) == 8
    two_sessions(lambda: tracker_sinks(prepare_trackers(spec.log, spec.name, "", {}, previous=first), Storage(),
                                       {"spec": "x"}, final_step=10))
    run_files = sorted(glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*" / f"run-{first['wandb']['id']}.wandb")))
    assert len(run_files) == 2  # one per session, the same run id: `wandb sync` joins them
    wait_for_wandb_exit(run_files)
    losses = {}
    for run_file in run_files:
        runs = [r.run for r in read_wandb_records(run_file) if r.WhichOneof("record_type") == "run"]
        assert runs and all(list(run.tags) == ["variant:wd-0.01", "seed:7"] for run in runs)
        for row in read_wandb_history(run_file):
            if "train/loss" in row:
                losses.setdefault(row["_step"], []).append(row["train/loss"])
    # 7 and 8 are in both sessions' files (the dead session logged them unflushed, and an
    # offline run cannot ask W&B what it has); W&B ignores a step at or below the one a resumed
    # run already has, so the synced run shows each step once.
    assert sorted(losses) == list(range(1, 11))
    assert all(len(v) == (2 if step in (7, 8) else 1) for step, v in losses.items())


def test_sinks_are_built_from_the_ids_in_run_json():
    ids = {"tensorboard": {"logdir": "/tmp/x"}, "wandb": {"id": "abcd1234"}, "mlflow": {"run_id": "r"}}
    sinks = tracker_sinks(ids, Storage(), {}, final_step=5)
    assert [type(s) for s in sinks] == [TensorBoardSink, WandbSink, MlflowSink]
    assert all(s.final_step == 5 and not s.replays for s in sinks)


# ---------------------------------------------------------------------------------------------
# IFT's losses, and a real training run in two sessions


def test_ift_sends_its_train_and_val_losses_to_the_trackers(tmp_path):
    pytest.importorskip("tensorboardX")
    import torch

    from raygpt.config import IftConfig, RunSpec
    from raygpt.ift import finetune_one, split_instruction_data
    from raygpt.model import GPT, GPTConfig
    from raygpt.weights.checkpoint import save_model_dir

    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, context_length=96, tie_weights=True)
    torch.manual_seed(0)
    save_model_dir(GPT(config), config, tmp_path / "base")
    entries = [{"instruction": "Repeat the word.", "input": w, "output": w} for w in ["apple", "river", "stone"] * 10]
    spec = RunSpec()
    spec.log.trackers = ["tensorboard"]
    spec.ift = IftConfig(epochs=1, lr=0.01, eval_interval=2, max_new_tokens=4, generation_batch_size=2)
    output = tmp_path / "ift"
    summary = finetune_one(str(tmp_path / "base"), spec, Storage(), split_instruction_data(entries),
                           {"source": "generated", "sha256": "0" * 64}, str(output))
    scalars, _ = read_tensorboard(output / "base" / "tensorboard")
    assert sorted(scalars["val/loss"]) == [0, 2, 3] and sorted(scalars["train/loss"]) == [2, 3]
    assert scalars["val/loss"][0] == pytest.approx(summary["initial_val_loss"], rel=1e-5)
    assert min(scalars["val/loss"].values()) == pytest.approx(summary["best_val_loss"], rel=1e-5)


@pytest.mark.integration
def test_a_run_in_two_sessions_logs_each_step_once_with_samples_and_adds_up_its_cost(ray_local, tiny_dataset,
                                                                                     tmp_path):
    pytest.importorskip("tensorboardX")
    import contextlib
    import io

    from raygpt.train.launch import train
    from raygpt.train.metrics import read_metrics, step_losses

    def spec(*extra):
        return load_spec(None, [
            "name=tracked", f"storage_path={tmp_path}", "model.preset=tiny", f"train.dataset={tiny_dataset}",
            "train.seq_len=32", "train.global_batch_tokens=1024", "train.micro_batch_size=8", "train.num_workers=2",
            "train.max_steps=6", "train.warmup_steps=2", "train.lr=3e-3", "train.log_interval=2",
            "train.val_interval=3", "train.val_tokens=1024", "checkpoint.interval=3", "train.gpu_hour_usd=2.0",
            "log.trackers=[tensorboard]", "log.sample_prompts=[The, 'Once upon']", "log.sample_tokens=5", *extra])

    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        first = train(spec("train.stop_at_step=3"))
        second = train(spec())
    assert (first["status"], second["status"]) == ("stopped", "finished")
    assert first["trackers"] == second["trackers"] == {"tensorboard": {"logdir": str(tmp_path / "tracked" / "tensorboard")}}

    records = read_metrics(str(tmp_path / "tracked"), Storage())
    losses = step_losses(records)
    scalars, texts = read_tensorboard(tmp_path / "tracked" / "tensorboard")
    assert scalars["train/loss"] == {step: pytest.approx(loss) for step, loss in losses.items()}
    assert sorted(scalars["train/loss"]) == [1, 2, 3, 4, 5, 6]
    assert sorted(scalars["val/loss"]) == [3, 6]

    # Samples at each validation: in metrics.jsonl, the trackers and the log.
    sampled = {r["step"]: r["samples"] for r in records if "samples" in r}
    assert sorted(sampled) == [3, 6] and [s["prompt"] for s in sampled[3]] == ["The", "Once upon"]
    assert all(isinstance(s["text"], str) for s in sampled[6])
    assert sorted(texts) == [3, 6] and "Once upon" in texts[6]
    assert "samples at step 3:" in output.getvalue() and "samples at step 6:" in output.getvalue()

    # Cost: two sessions of two CPU workers, priced per worker-hour.
    cost = json.loads((tmp_path / "tracked" / "run.json").read_text())["cost"]
    assert cost["sessions"] == 2 and cost["gpu_hours"] == 0 and cost["price_source"] == "train.gpu_hour_usd"
    assert cost["worker_hours"] == pytest.approx(2 * cost["wall_clock_s"] / 3600)
    assert cost["usd"] == pytest.approx(2.0 * cost["worker_hours"])
    assert cost["wall_clock_s"] > first["cost"]["wall_clock_s"] > 0
