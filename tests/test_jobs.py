"""Ray jobs: the stage specs' arithmetic, submission ids and token lookup (unit), then a real Ray
head with token authentication and a SeaweedFS store: `raygpt submit` of a tiny training job
that checkpoints into the store, an eval job that reads the checkpoints, re-submission, Ctrl-C
detaching, and a wrong token refused (integration)."""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from raygpt.cli import main
from raygpt.cli.jobs import (
    entrypoint_for,
    find_auth_token,
    next_submission_id,
    resolve_address,
    stage_working_dir,
    submission_id_for,
    verb_for,
)
from raygpt.config import load_spec
from raygpt.errors import RaygptError

# Ray's own job client passes ssl=None to aiohttp, which aiohttp now deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"
SPECS = Path(__file__).resolve().parent / "specs"


# ---------------------------------------------------------------------------------------------
# The stage specs


def test_train_spec_is_chinchilla_optimal_gpt2_small_on_8_gpus():
    from raygpt.model import GPT, config_from_spec

    spec = load_spec(JOBS / "train-gpt2-small-fineweb.yaml")
    params = GPT(config_from_spec(spec.model)).num_params()
    assert 163e6 < params < 163.1e6  # untied, no QKV bias: the book's 163M
    t = spec.train
    assert t.global_batch_tokens == 524_288 and t.num_workers == 8 and t.use_gpu
    per_pass = t.num_workers * t.micro_batch_size * t.seq_len
    assert t.global_batch_tokens % per_pass == 0 and t.global_batch_tokens // per_pass == 4
    # 20 tokens per parameter, to within one step.
    assert abs(t.max_steps * t.global_batch_tokens - 20 * params) < t.global_batch_tokens
    assert t.lr == 6e-4 and t.warmup_steps == 700
    assert 250 <= spec.checkpoint.interval <= 500 and spec.checkpoint.keep == 2


def test_stage_specs_point_at_the_same_storage_and_data():
    from raygpt.sweep.spec import is_sweep_file

    # The cluster's stages; sweeps are checked in test_sweep.py, the laptop spec runs on local paths.
    specs = {p.stem: load_spec(p) for p in JOBS.glob("*.yaml")
             if p.name not in ("quickstart.yaml", "train-tiny-cpu.yaml") and not is_sweep_file(p)}
    assert {"data-fineweb", "train-gpt2-small-fineweb", "eval-test-loss", "ift", "judge", "report"} <= set(specs)
    data_output = specs["data-fineweb"].data.output
    assert specs["train-gpt2-small-fineweb"].train.dataset == data_output == specs["eval-test-loss"].eval.dataset
    run = specs["train-gpt2-small-fineweb"].name
    assert run in specs["eval-test-loss"].eval.models and run in specs["ift"].ift.models
    assert run in specs["report"].report.runs
    storage_paths = {s.storage_path for name, s in specs.items() if not name.startswith("data-")}  # data specs write no runs
    assert len(storage_paths) == 1 and next(iter(storage_paths)).startswith("s3://YOUR-BUCKET/")
    judge = specs["judge"].judge
    assert (judge.model, judge.mode, judge.passes, judge.api_key_env) == ("gpt-4o-mini", "comparative", 3,
                                                                            "OPENAI_API_KEY")


# ---------------------------------------------------------------------------------------------
# Submission ids, entrypoints, addresses, the token


def test_verb_comes_from_the_file_name_or_the_flag():
    assert verb_for(Path("jobs/train-gpt2-small-fineweb.yaml"), None) == "train"
    assert verb_for(Path("jobs/eval-test-loss.yaml"), None) == "eval"
    assert verb_for(Path("jobs/ift.yaml"), None) == "ift"
    assert verb_for(Path("jobs/data-fineweb.yaml"), None) == "data"
    assert verb_for(Path("my-run.yaml"), None) == "train"
    assert verb_for(Path("jobs/ift.yaml"), "judge") == "judge"
    with pytest.raises(RaygptError, match="--verb deploy: expected one of"):
        verb_for(Path("x.yaml"), "deploy")


def test_submission_ids_are_fixed_sanitized_and_suffixed_on_resubmission():
    base = submission_id_for("train", "gpt2 small/fineweb?")
    assert base == "raygpt-train-gpt2-small-fineweb"
    assert next_submission_id(base, []) == base
    previous = [SimpleNamespace(submission_id=i) for i in (base, f"{base}-2")]
    assert next_submission_id(base, previous) == f"{base}-3"


def test_entrypoint_quotes_overrides_and_maps_data_to_prepare():
    import shlex

    entry = entrypoint_for("train", "jobs/t.yaml", ["name=a b", "train.lr=3e-4"])
    assert shlex.split(entry) == ["raygpt", "train", "jobs/t.yaml", "--set", "name=a b", "--set", "train.lr=3e-4"]
    assert entrypoint_for("data", "jobs/d.yaml", []) == "raygpt data prepare jobs/d.yaml"


def test_address_defaults_to_the_forwarded_dashboard(monkeypatch):
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # a GCS address is not the job API
    assert resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265/")
    assert resolve_address(None) == "http://head:8265"
    assert resolve_address("10.0.0.5:8265") == "http://10.0.0.5:8265"


def test_token_lookup_follows_rays_order(monkeypatch, tmp_path):
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert find_auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert find_auth_token().value == "from-home"
    named = tmp_path / "elsewhere"
    named.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(named))
    assert find_auth_token().value == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    token = find_auth_token()
    assert token.value == "from-env" and "from-env" not in token.source and "from-env" not in repr(token)
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    named.write_text("")
    with pytest.raises(RaygptError, match="elsewhere: the Ray auth token file that RAY_AUTH_TOKEN_PATH names is empty"):
        find_auth_token()
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")

    def unreadable(path, *args, **kwargs):  # as a mode-000 file is, except to root
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "read_text", unreadable)
    with pytest.raises(RaygptError, match=r"\.ray/auth_token: cannot read the Ray auth token \(Permission denied\)"):
        find_auth_token()


def test_only_the_spec_is_uploaded_at_its_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    staged, relpath = stage_working_dir(SPECS / "train-tiny.yaml", None, tmp_path)
    assert relpath == "tests/specs/train-tiny.yaml"
    assert [p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()] == [relpath]
    root, relpath = stage_working_dir(SPECS / "train-tiny.yaml", str(SPECS.parent), tmp_path / "unused")
    assert (root, relpath) == (SPECS.parent, "specs/train-tiny.yaml")
    with pytest.raises(RaygptError, match="must be inside --working-dir"):
        stage_working_dir(SPECS / "train-tiny.yaml", str(tmp_path), tmp_path / "unused")


def test_relative_paths_that_would_vanish_with_the_job_are_named():
    from raygpt.cli.jobs import cluster_local_paths

    spec = load_spec(JOBS / "report.yaml")
    assert cluster_local_paths(spec, "report") == ["report.output: report"]
    assert cluster_local_paths(load_spec(JOBS / "train-gpt2-small-fineweb.yaml"), "train") == []
    assert cluster_local_paths(load_spec(None), "train") == ["storage_path: runs", "train.dataset: data/fineweb"]


def test_a_bad_spec_fails_before_anything_is_sent(tmp_path, capsys):
    bad = tmp_path / "train-bad.yaml"
    bad.write_text("name: x\ntrain:\n  lrr: 1\n")
    # Nothing listens on port 9: had submit tried to connect, the error would say so.
    assert main(["submit", str(bad), "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "train.lrr: unknown key (did you mean 'lr'?)" in err and "dashboard" not in err


def test_an_unreachable_cluster_is_one_clear_error(capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t" * 16)
    assert main(["submit", str(SPECS / "train-tiny.yaml"), "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "http://127.0.0.1:9: no Ray dashboard answers there" in err and "Traceback" not in err
    assert "t" * 16 not in err


# ---------------------------------------------------------------------------------------------
# A real Ray head


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Head:
    url: str
    token_file: Path
    temp_dir: Path


def _processes_with_env(marker: bytes) -> list[int]:
    """Pids whose environment holds ``marker``: exactly the processes our head started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _stop_head(pgid: int, marker: bytes) -> None:
    """Stop our head only (never `ray stop`, which would stop every Ray on the machine): its
    process group, then any descendant (job drivers start their own sessions) by its environment."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        for pid in _processes_with_env(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _processes_with_env(marker):
            time.sleep(0.3)
        if not _processes_with_env(marker):
            return


@pytest.fixture(scope="module")
def ray_head(s3_server):
    """``ray start --head`` on 127.0.0.1 with its own token, ports and temp dir, the test
    store's credentials in its environment (as an instance profile would give a real node)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rg-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    token_file = temp_dir / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env, node_manager, object_manager = _free_ports(9)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_API_SERVER_ADDRESS")}
    env.update(s3_server.env())
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file),
               # The job's entrypoint runs with the head's PATH: the raygpt of this environment.
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    log = open(temp_dir / "ray-start.log", "wb")
    starter = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={runtime_env}", f"--node-manager-port={node_manager}",
         f"--object-manager-port={object_manager}", "--num-cpus=4", f"--temp-dir={temp_dir / 'ray'}",
         "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    marker = f"RAY_AUTH_TOKEN_PATH={token_file}".encode()
    head = Head(f"http://127.0.0.1:{dashboard}", token_file, temp_dir)
    try:
        if starter.wait(timeout=180) != 0:
            pytest.fail(f"ray start failed: {(temp_dir / 'ray-start.log').read_text()[-3000:]}")
        _wait_for_job_api(head)
        yield head
    finally:
        log.close()
        _stop_head(starter.pid, marker)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_job_api(head: Head, timeout: float = 90.0) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout
    while True:
        try:
            JobSubmissionClient(head.url, headers={"Authorization": f"Bearer {head.token_file.read_text()}"}).list_jobs()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.fixture
def as_client(ray_head, monkeypatch, s3_env):
    """This process as a user's machine: the head's token where raygpt looks for it."""
    for var in ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(ray_head.token_file))
    return ray_head


def _client(head: Head):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.url, headers={"Authorization": f"Bearer {head.token_file.read_text()}"})


@pytest.fixture(scope="module")
def dataset(s3_server):
    """A tiny stdlib-docstring dataset in the test bucket, made with raygpt's own data prepare."""
    from raygpt.config import DataConfig, RunSpec
    from raygpt.data.prepare import prepare
    from raygpt.storage import Storage

    prefix = f"s3://raygpt-test/jobs-{secrets.token_hex(4)}"
    saved = dict(os.environ)
    os.environ.update(s3_server.env())
    try:
        prepare(RunSpec(data=DataConfig(source="stdlib", output=f"{prefix}/data", tokens=20_000, shard_tokens=8_000,
                                        val_tokens=2_000, test_tokens=2_000, heldout_permille=200)), Storage())
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return prefix


@pytest.mark.integration
def test_a_wrong_token_is_refused(as_client, monkeypatch, capsys):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    wrong = {"Authorization": f"Bearer {secrets.token_hex(32)}"}
    with pytest.raises(AuthenticationError, match="Invalid authentication token"):
        JobSubmissionClient(as_client.url, headers=wrong).submit_job(entrypoint="echo never",
                                                                      submission_id="raygpt-wrong-token")
    assert all(job.submission_id != "raygpt-wrong-token" for job in _client(as_client).list_jobs())

    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    assert main(["submit", str(SPECS / "train-tiny.yaml"), "--address", as_client.url]) == 2
    err = capsys.readouterr().err
    assert "the cluster refused the auth token from $RAY_AUTH_TOKEN" in err and "not-the-token" not in err

    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("HOME", str(as_client.temp_dir / "empty-home"))
    assert main(["jobs", "list", "--address", as_client.url]) == 2
    assert "requires an auth token and none was found" in capsys.readouterr().err


@pytest.mark.integration
def test_doctor_sees_the_cluster_and_its_ray_version(as_client):
    from raygpt.cli.doctor import run_checks

    checks = {c.name: c for c in run_checks(address=as_client.url)}
    assert checks["auth token"].status == "PASS" and str(as_client.token_file) in checks["auth token"].detail
    assert checks["ray cluster"].status == "PASS", checks["ray cluster"].detail


@pytest.mark.integration
def test_submit_trains_into_the_store_then_eval_reads_the_checkpoints(as_client, dataset, capsys):
    from raygpt.storage import Storage

    paths = ["--set", f"storage_path={dataset}/runs", "--set", f"train.dataset={dataset}/data"]
    train_spec = str(SPECS / "train-tiny.yaml")
    assert main(["submit", train_spec, "--address", as_client.url, "--no-follow", *paths]) == 0
    assert "submitted raygpt-train-jobs-tiny to" in capsys.readouterr().out

    # The same spec again while its job runs: followed, not submitted twice.
    assert main(["submit", train_spec, "--address", as_client.url, "--no-follow", *paths]) == 0
    assert "raygpt-train-jobs-tiny is already" in capsys.readouterr().out
    assert [j.submission_id for j in _client(as_client).list_jobs()].count("raygpt-train-jobs-tiny") == 1

    assert main(["jobs", "logs", "raygpt-train-jobs-tiny", "--follow", "--address", as_client.url]) == 0
    followed = capsys.readouterr().out
    assert "raygpt-train-jobs-tiny SUCCEEDED" in followed and "jobs-tiny" in followed

    run = f"{dataset}/runs/jobs-tiny"
    listing = Storage().list(run)
    checkpoints = [name for name in listing if re.fullmatch(r"checkpoint_\d+", name)]
    assert 1 <= len(checkpoints) <= 2, listing  # every 2 of 4 steps, keep 2
    assert "run.json" in listing and "metrics.jsonl" in listing

    # Eval, in its own job, reads the run's latest checkpoint from the store.
    eval_paths = ["--set", f"storage_path={dataset}/runs", "--set", f"eval.dataset={dataset}/data"]
    assert main(["submit", str(SPECS / "eval-tiny.yaml"), "--address", as_client.url, *eval_paths]) == 0
    assert "raygpt-eval-jobs-tiny-eval SUCCEEDED" in capsys.readouterr().out
    results = Storage().read_json(f"{dataset}/runs/eval/test_loss.json")
    (result,) = results["results"]
    assert result["ref"] == "jobs-tiny" and math.isfinite(result["test_loss"]) and result["test_loss"] > 0

    # Status and logs come back through the client too; a spec file names its latest job.
    assert main(["jobs", "status", train_spec, "--address", as_client.url]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    assert main(["jobs", "logs", "raygpt-eval-jobs-tiny-eval", "--address", as_client.url]) == 0
    assert "jobs-tiny" in capsys.readouterr().out

    # The ended run submitted again (the way back after a preemption) is a new job, -2, that
    # finds the finished run's checkpoints rather than starting over.
    assert main(["submit", train_spec, "--address", as_client.url, *paths]) == 0
    again = capsys.readouterr().out
    assert "submitted raygpt-train-jobs-tiny-2" in again and "raygpt-train-jobs-tiny-2 SUCCEEDED" in again
    logged = [json.loads(line) for line in Storage().read_text(f"{run}/metrics.jsonl").splitlines() if line.strip()]
    assert [m["step"] for m in logged if "loss" in m].count(1) == 1, "the resubmitted run trained step 1 again"


@pytest.mark.integration
def test_ctrl_c_detaches_and_the_job_keeps_running_until_stopped(as_client, dataset):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    submit = subprocess.Popen(
        [sys.executable, "-m", "raygpt.cli", "submit", str(SPECS / "train-tiny.yaml"), "--address", as_client.url,
         "--set", "name=jobs-detach", "--set", "train.max_steps=100000", "--set", f"storage_path={dataset}/runs",
         "--set", f"train.dataset={dataset}/data"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        output = ""
        while "submitted raygpt-train-jobs-detach" not in output:
            line = submit.stdout.readline()
            assert line and time.monotonic() < deadline, output
            output += line
        submit.send_signal(signal.SIGINT)
        rest, _ = submit.communicate(timeout=30)
    finally:
        if submit.poll() is None:
            submit.kill()
    assert submit.returncode == 0, output + rest
    assert "detached: raygpt-train-jobs-detach is still running" in rest
    assert "raygpt jobs stop raygpt-train-jobs-detach" in rest
    client = _client(as_client)
    assert str(client.get_job_status("raygpt-train-jobs-detach")) in ("PENDING", "RUNNING")

    assert main(["jobs", "stop", "raygpt-train-jobs-detach", "--address", as_client.url]) == 0
    deadline = time.monotonic() + 60
    while str(client.get_job_status("raygpt-train-jobs-detach")) not in ("STOPPED", "FAILED"):
        assert time.monotonic() < deadline
        time.sleep(1)
    assert str(client.get_job_status("raygpt-train-jobs-detach")) == "STOPPED"


@pytest.mark.integration
def test_submit_runs_a_sweep_with_its_base_spec(as_client, dataset, tmp_path, monkeypatch, capsys):
    """A sweep spec is submitted as ``raygpt sweep``: the base run spec travels beside it, the
    job trains the runs through Ray Tune on the cluster and writes the report to the store."""
    from raygpt.storage import Storage

    (tmp_path / "jobs").mkdir()
    base = (SPECS / "train-tiny.yaml").read_text().replace("num_workers: 2", "num_workers: 1")
    (tmp_path / "jobs" / "base.yaml").write_text(base.replace("global_batch_tokens: 128", "global_batch_tokens: 64"))
    (tmp_path / "jobs" / "sweep-tiny.yaml").write_text(
        "sweep:\n  name: tiny-sweep\n  base: jobs/base.yaml\n  seeds: [1]\n"
        "  variants: {baseline: {}}\n  stages: [train, report]\n")
    monkeypatch.chdir(tmp_path)
    paths = ["--set", f"storage_path={dataset}/runs", "--set", f"train.dataset={dataset}/data"]
    assert main(["submit", "jobs/sweep-tiny.yaml", "--address", as_client.url, *paths]) == 0
    out = capsys.readouterr().out
    assert "submitted raygpt-sweep-tiny-sweep to" in out and "raygpt-sweep-tiny-sweep SUCCEEDED" in out
    report = json.loads(Storage().read_text(f"{dataset}/runs/tiny-sweep/report/sweep.json"))
    assert [(r["run"], r["status"]) for r in report["runs"]] == [("tiny-sweep/baseline@1", "finished")]
