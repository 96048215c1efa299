"""``raygpt train`` on bad input: one clear line naming the thing at fault, exit status 2, no
traceback, no secret, and nothing written for the run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from raygpt.cli import main
from raygpt.config import load_spec
from raygpt.data.batches import TrainBatches
from raygpt.data.manifest import load_manifest
from raygpt.model import GPT, PRESETS
from raygpt.storage import Storage
from raygpt.train.components import RngState, TrainerState, choose_precision
from raygpt.train.schedule import WarmupCosine
from raygpt.weights.checkpoint import save_training_checkpoint

pytestmark = pytest.mark.integration

TINY_TRAINING = """\
name: {name}
storage_path: {storage_path}
model:
  preset: tiny
train:
  dataset: {dataset}
  seq_len: 32
  global_batch_tokens: 1024
  micro_batch_size: 8
  num_workers: 2
  max_steps: {max_steps}
  warmup_steps: 2
  val_interval: 0
  max_failures: {max_failures}
"""


def write_spec(tmp_path: Path, name="bad", storage_path=None, dataset="data", max_steps=4, max_failures=0) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(TINY_TRAINING.format(name=name, storage_path=storage_path or str(tmp_path / "runs"),
                                         dataset=dataset, max_steps=max_steps, max_failures=max_failures))
    return str(path)


def train_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(["train", *argv])
    out, err = capsys.readouterr()
    return code, out + err


def assert_one_clear_error(code: int, output: str, *fragments: str, secrets: tuple[str, ...] = ()) -> None:
    assert code == 2, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("raygpt train: error: ")]
    assert len(errors) == 1, output
    for fragment in fragments:
        assert fragment in errors[0], output
    for secret in secrets:
        assert secret not in output


@pytest.fixture(scope="module")
def local_dataset(tmp_path_factory) -> Path:
    """A small local dataset in shards of 2048 tokens (two global batches), for the tests that break it."""
    import random

    from raygpt.data.prepare import prepare

    root = tmp_path_factory.mktemp("dataset")
    rng = random.Random(1)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 6))) for _ in range(200)]
    (root / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(1500)))
    spec = load_spec(None, [f"data.source={root / 'corpus.txt'}", f"data.output={root / 'data'}",
                            "data.txt_documents=paragraphs", "data.tokens=16384", "data.shard_tokens=2048",
                            "data.val_tokens=1024", "data.test_tokens=1024", "data.heldout_permille=100",
                            "data.num_proc=1"])
    prepare(spec, Storage())
    return root / "data"


def broken_copy(local_dataset: Path, tmp_path: Path) -> tuple[Path, dict]:
    copy = tmp_path / "data"
    Storage().download(str(local_dataset), copy)
    return copy, load_manifest(str(copy), Storage())


def test_malformed_yaml(tmp_path, capsys):
    spec = tmp_path / "broken.yaml"
    spec.write_text("name: x\ntrain:\n  lr: [1e-3\n")
    code, output = train_cli(capsys, str(spec))
    assert_one_clear_error(code, output, str(spec), "malformed YAML")


def test_unknown_key(tmp_path, capsys):
    spec = tmp_path / "typo.yaml"
    spec.write_text("name: x\ntrain:\n  learning_rate: 1e-3\n")
    code, output = train_cli(capsys, str(spec))
    assert code == 2 and "Traceback" not in output
    assert f"raygpt train: error: {spec}: invalid run spec:" in output
    assert "train.learning_rate: unknown key" in output


def test_missing_credentials(s3_env, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    code, output = train_cli(capsys, write_spec(tmp_path, storage_path="s3://raygpt-test/runs"))
    assert_one_clear_error(code, output, "s3://raygpt-test/runs", "AWS_ACCESS_KEY_ID", secrets=(s3_env.secret_key,))


def test_wrong_credentials(s3_env, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789")
    code, output = train_cli(capsys, write_spec(tmp_path, storage_path="s3://raygpt-test/runs"))
    assert_one_clear_error(code, output, "s3://raygpt-test/runs", "access denied",
                           secrets=("wrong-secret-0123456789", s3_env.secret_key))


def test_unreachable_endpoint(s3_env, tmp_path, capsys):
    spec = write_spec(tmp_path, storage_path="s3://raygpt-test/runs")
    code, output = train_cli(capsys, spec, "--set", "storage.endpoint_url=http://127.0.0.1:9")
    assert_one_clear_error(code, output, "s3://raygpt-test/runs", "cannot be reached", secrets=(s3_env.secret_key,))


def test_missing_bucket(s3_env, tmp_path, capsys):
    code, output = train_cli(capsys, write_spec(tmp_path, storage_path="s3://no-such-bucket/runs"))
    assert_one_clear_error(code, output, "bucket 'no-such-bucket' does not exist", secrets=(s3_env.secret_key,))


def test_missing_shard(local_dataset, tmp_path, capsys):
    data, manifest = broken_copy(local_dataset, tmp_path)
    victim = manifest["splits"]["train"]["shards"][1]["name"]
    (data / victim).unlink()
    code, output = train_cli(capsys, write_spec(tmp_path, dataset=str(data)))
    assert_one_clear_error(code, output, f"{victim}: shard missing")
    assert not (tmp_path / "runs" / "bad").exists()  # nothing written for the run


def corrupt(path: Path) -> None:
    """Flip bytes in the middle: same size, so only the sha256 can tell."""
    tokens = np.fromfile(path, dtype="<u2")
    tokens[len(tokens) // 2:len(tokens) // 2 + 64] ^= 0x5A5A
    tokens.tofile(path)


def test_a_corrupt_shard_the_run_never_reads_is_refused_before_ray_starts(local_dataset, tmp_path, capsys):
    """A local dataset has every shard hashed before Ray starts: a shard that the run's steps
    never read (here none of its 4) cannot let it finish on corrupt data, and one they read
    cannot fail it minutes in."""
    data, manifest = broken_copy(local_dataset, tmp_path)
    spec = load_spec(write_spec(tmp_path, dataset=str(data)))
    batches = TrainBatches(str(data), Storage(), 32, spec.train.seed, 32)
    read = {int(s) for step in range(spec.train.max_steps) for s in batches.sequence_ids(step)[:, 0]}
    unread = next(s for s in manifest["splits"]["train"]["shards"]
                  if manifest["splits"]["train"]["shards"].index(s) not in read)["name"]
    corrupt(data / unread)
    code, output = train_cli(capsys, write_spec(tmp_path, dataset=str(data)))
    assert_one_clear_error(code, output, f"{unread}: sha256 mismatch (corrupt shard)")
    assert not (tmp_path / "runs" / "bad").exists()  # nothing written for the run


@pytest.fixture
def hashed_at_first_use(monkeypatch):
    """The dataset taken for one beyond ``hashed_before_start`` (in S3, over 1 GiB): its shards
    are hashed by the workers, each before its first use."""
    import raygpt.data.manifest

    monkeypatch.setattr(raygpt.data.manifest, "hashed_before_start", lambda dataset_uri, manifest: False)


def test_corrupt_shard_read_when_training_starts(ray_local, local_dataset, hashed_at_first_use, tmp_path, capsys):
    """Found by the workers' first batch: they agree to stop, so Ray does not retry, and the
    message reaches the driver as it was raised."""
    data, manifest = broken_copy(local_dataset, tmp_path)
    spec = load_spec(write_spec(tmp_path, dataset=str(data)))
    batches = TrainBatches(str(data), Storage(), 32, spec.train.seed, 32)
    first_shard = manifest["splits"]["train"]["shards"][int(batches.sequence_ids(0)[-1, 0])]["name"]
    corrupt(data / first_shard)
    code, output = train_cli(capsys, write_spec(tmp_path, dataset=str(data), max_failures=3))
    assert_one_clear_error(code, output, f"{first_shard}: sha256 mismatch (corrupt shard)")


def test_corrupt_shard_read_mid_run(ray_local, local_dataset, hashed_at_first_use, tmp_path, capsys):
    """Found at a later step: the worker's error, unwrapped from Ray Train's, is the message."""
    data, manifest = broken_copy(local_dataset, tmp_path)
    spec = load_spec(write_spec(tmp_path, dataset=str(data)))
    batches = TrainBatches(str(data), Storage(), 32, spec.train.seed, 32)
    first_shards = {int(s) for s in batches.sequence_ids(0)[:, 0]}
    step = next(s for s in range(1, batches.steps_per_epoch) if set(batches.sequence_ids(s)[:, 0]) - first_shards)
    later = next(int(s) for s in batches.sequence_ids(step)[:, 0] if int(s) not in first_shards)
    later_shard = manifest["splits"]["train"]["shards"][later]["name"]
    corrupt(data / later_shard)
    code, output = train_cli(capsys, write_spec(tmp_path, dataset=str(data), max_steps=step + 1))
    assert_one_clear_error(code, output, f"{later_shard}: sha256 mismatch (corrupt shard)")


def test_checkpoint_of_another_model_shape(local_dataset, tmp_path, capsys):
    """A run named like an earlier one resumes it, so another preset is refused before launch."""
    run = tmp_path / "runs" / "bad"
    model = GPT(PRESETS["tiny"])
    spec = load_spec(None, ["model.preset=tiny"])
    state = TrainerState(WarmupCosine(1e-3, 1, 4), choose_precision("fp32", torch.device("cpu")).scaler, 0, spec, 1)
    save_training_checkpoint(run / "checkpoint_00000004", 0, model=model, optimizer=model.configure_optimizer(
        1e-3, 0.1, (0.9, 0.95), "cpu"), trainer=state, rng=RngState())
    before = sorted(os.listdir(run))
    code, output = train_cli(capsys, write_spec(tmp_path, dataset=str(local_dataset)), "--set", "model.preset=nano")
    assert_one_clear_error(code, output, "checkpoint_00000004 holds transformer.wte.weight of shape (50257, 32) but "
                                         "model.preset 'nano' expects (50257, 128)")
    assert sorted(os.listdir(run)) == before  # no run.json, no Ray Train files
