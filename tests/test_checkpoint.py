"""Checkpoints: every component round-trips so training continues bitwise; loading models by
run name or folder (local and S3), newest complete checkpoint first, shape errors that name
the tensor."""

from __future__ import annotations

import json
import os

import pytest
import torch

from raygpt.config import load_spec
from raygpt.errors import RaygptError
from raygpt.model import GPT, PRESETS, GPTConfig
from raygpt.storage import Storage, join
from raygpt.train.components import RngState, TrainerState, choose_precision, seed_everything
from raygpt.train.schedule import WarmupCosine
from raygpt.weights.checkpoint import (
    load_state_dict_checked,
    load_training_checkpoint,
    save_model_dir,
    save_training_checkpoint,
)
from raygpt.weights.refs import load_model, model_id

CONFIG = GPTConfig(vocab_size=97, context_length=16, n_layer=2, n_head=2, n_embd=16, dropout=0.1)


class Trainer:
    """Just the components of one rank, and a step whose batch depends on the step alone."""

    def __init__(self, init_seed: int):
        spec = load_spec(None, ["model.preset=tiny"])
        seed_everything(init_seed)
        self.model = GPT(CONFIG)
        self.optimizer = self.model.configure_optimizer(1e-2, 0.1, (0.9, 0.95), "cpu")
        self.schedule = WarmupCosine(1e-2, 2, 6, 0.1)
        self.state = TrainerState(self.schedule, choose_precision("fp32", torch.device("cpu")).scaler, 7, spec, 1)
        self.rng = RngState()
        seed_everything(init_seed + 1)  # dropout stream

    def step(self) -> float:
        data = torch.Generator().manual_seed(1000 + self.state.step)
        x = torch.randint(0, CONFIG.vocab_size, (4, 16), generator=data)
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.lr_at(self.state.step)
        _, loss = self.model(x, x.roll(-1, dims=1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.advance(64)
        return loss.item()

    def components(self) -> dict:
        return dict(model=self.model, optimizer=self.optimizer, trainer=self.state, rng=self.rng)


def test_training_continues_bitwise_from_a_checkpoint(tmp_path):
    uninterrupted = Trainer(init_seed=1)
    expected = [uninterrupted.step() for _ in range(6)]

    first = Trainer(init_seed=1)
    losses = [first.step() for _ in range(3)]
    save_training_checkpoint(tmp_path, 0, **first.components())
    # Another process: other initial weights and RNG streams, all replaced by the checkpoint.
    second = Trainer(init_seed=99)
    found_rng = load_training_checkpoint(tmp_path, 0, **second.components(), expected="the test model", where="t")
    assert found_rng and (second.state.step, second.state.tokens_seen) == (3, 192)
    losses += [second.step() for _ in range(3)]
    assert losses == expected
    assert not load_training_checkpoint(tmp_path, 1, **second.components(), expected="x", where="t")


def test_a_checkpoint_of_another_shape_names_the_tensor():
    nano = GPT(PRESETS["nano"])
    tiny_weights = GPT(PRESETS["tiny"]).state_dict()
    with pytest.raises(RaygptError, match=r"checkpoint run/checkpoint_00000004 holds transformer.wte.weight of shape "
                                          r"\(50257, 32\) but model.preset 'nano' expects \(50257, 128\)"):
        load_state_dict_checked(nano, tiny_weights, where="run/checkpoint_00000004", expected="model.preset 'nano'")
    with_bias = GPT(GPTConfig(**{**CONFIG.__dict__, "qkv_bias": True}))
    with pytest.raises(RaygptError, match=r"lacks transformer.h.0.attn.c_attn.bias, transformer.h.1.attn.c_attn.bias"):
        load_state_dict_checked(with_bias, GPT(CONFIG).state_dict(), where="c", expected="the spec's model")


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def runs_root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs")
    request.getfixturevalue("s3_env")
    return f"s3://raygpt-test/checkpoints-{os.urandom(4).hex()}"


def write_checkpoint(root: str, run: str, trainer: Trainer, local_dir) -> str:
    name = f"checkpoint_{trainer.state.step:08d}"
    save_training_checkpoint(local_dir / name, 0, **trainer.components())
    Storage().upload(local_dir / name, join(root, run, name))
    return join(root, run, name)


def test_load_model_takes_the_newest_complete_checkpoint(runs_root, tmp_path):
    storage = Storage()
    spec = load_spec(None, [f"storage_path={runs_root}"])
    trainer = Trainer(init_seed=3)
    trainer.step()
    trainer.step()
    write_checkpoint(runs_root, "demo", trainer, tmp_path)
    trainer.step()
    newest = write_checkpoint(runs_root, "demo", trainer, tmp_path)
    expected_logits = trainer.model.eval()(torch.arange(16)[None])[0]
    trainer.step()
    cut_off = write_checkpoint(runs_root, "demo", trainer, tmp_path)
    storage.write_bytes(join(cut_off, "model.pt"), b"half an upload")  # a size that trainer_state.json disowns

    for ref in ("demo", join(runs_root, "demo"), newest):
        model, info = load_model(ref, spec, storage)
        assert (info["step"], info["tokens"], info["checkpoint"]) == (3, 192, newest)
        assert info["params"] == model.num_params() and not model.training
        assert torch.equal(model(torch.arange(16)[None])[0], expected_logits)
    assert load_model(newest, spec, storage)[1]["id"] == "demo-checkpoint_00000003"
    with pytest.raises(RaygptError, match=r"model 'nothing-here': no checkpoint found at .*nothing-here"):
        load_model("nothing-here", spec, storage)


def test_model_only_folder_round_trip(tmp_path):
    spec = load_spec(None, [f"storage_path={tmp_path}"])
    model = GPT(CONFIG).eval()
    save_model_dir(model, model.config, tmp_path / "ift" / "finetuned")
    loaded, info = load_model(str(tmp_path / "ift" / "finetuned"), spec, Storage())
    x = torch.arange(16)[None]
    assert torch.equal(loaded(x)[0], model(x)[0]) and loaded.config == CONFIG
    assert (info["id"], info["step"], info["tokens"]) == ("finetuned", None, None)


def test_model_ids_are_short_and_filesystem_safe():
    assert model_id("openai:gpt2-medium") == "openai-gpt2-medium"
    assert model_id("gpt2-small-fineweb") == "gpt2-small-fineweb"
    assert model_id("s3://bucket/runs/small/checkpoint_00001000/") == "small-checkpoint_00001000"


def test_trainer_state_keeps_no_credential_of_any_url():
    # An S3 endpoint takes none (the spec refuses it); the judge's and the data's URLs may.
    spec = load_spec(None, ["judge.base_url=http://user:s3cret-key@127.0.0.1:8000/v1",
                            "ift.data=https://user:s3cret-key@data.example/instructions.json"])
    state = TrainerState(WarmupCosine(1e-3, 1, 4), choose_precision("fp32", torch.device("cpu")).scaler, 0, spec, 1)
    assert state.state_dict()["spec"]["judge"]["base_url"] == "http://127.0.0.1:8000/v1"
    assert "s3cret-key" not in repr(state.state_dict())


GOLDEN = os.path.join(os.path.dirname(__file__), "data", "checkpoint-v0.1.0")


def test_a_checkpoint_written_by_raygpt_0_1_0_still_loads_and_resumes():
    """tests/data/checkpoint-v0.1.0 was written by the flat-module raygpt (before the package
    split): its model computes the same logits, and every component resumes from it."""
    expected = json.load(open(os.path.join(GOLDEN, "expected.json")))
    spec = load_spec(None, ["model.preset=tiny"])
    model, info = load_model(os.path.join(GOLDEN, "checkpoint_00000001"), spec, Storage())
    assert info["step"] == 1 and info["tokens"] == 32
    with torch.no_grad():
        logits, _ = model(torch.tensor(expected["input"]))
    assert float(logits.double().sum()) == pytest.approx(expected["logits_sum"], rel=1e-6)
    assert logits[0, 0, :4].tolist() == pytest.approx(expected["logits_00"], rel=1e-6)

    fresh = GPT(model.config)
    optimizer = fresh.configure_optimizer(1e-3, 0.1, (0.9, 0.95), "cpu")
    state = TrainerState(WarmupCosine(1e-3, 2, 10), choose_precision("fp32", torch.device("cpu")).scaler, 7, spec, 1)
    found_rng = load_training_checkpoint(os.path.join(GOLDEN, "checkpoint_00000001"), 0, model=fresh,
                                         optimizer=optimizer, trainer=state, rng=RngState(),
                                         expected="the golden model", where="golden")
    assert found_rng and state.step == 1 and state.tokens_seen == 32
    assert optimizer.state_dict()["state"][0]["step"] == 1


def flip_bytes(path, offset_from_end: int = 200) -> None:
    """Change bytes inside a file, keeping its size (a size check cannot tell)."""
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_loading_checks_every_file_against_its_recorded_sha256(tmp_path):
    from raygpt.weights.integrity import checkpoint_problem

    trainer = Trainer(init_seed=1)
    trainer.step()
    save_training_checkpoint(tmp_path / "c", 0, **trainer.components())
    state = json.loads((tmp_path / "c" / "trainer_state.json").read_text())
    assert sorted(state["sha256"]) == sorted(state["files"]) == [
        "model.pt", "model_config.json", "optimizer.pt", "rng_rank0.pt"]
    assert checkpoint_problem(tmp_path / "c") is None

    flip_bytes(tmp_path / "c" / "model.pt", offset_from_end=4000)  # inside a tensor's bytes
    fresh = Trainer(init_seed=2)
    with pytest.raises(RaygptError, match=r"checkpoint run/c: model.pt differs from the SHA-256 its "
                                          r"trainer_state.json records \(its bytes changed after the save\)"):
        load_training_checkpoint(tmp_path / "c", 0, **fresh.components(), expected="x", where="run/c")

    save_training_checkpoint(tmp_path / "d", 0, **trainer.components())
    optimizer = tmp_path / "d" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-100])
    with pytest.raises(RaygptError, match=r"optimizer.pt holds \d+ bytes but trainer_state.json records \d+ "
                                          r"\(cut off or truncated\)"):
        load_training_checkpoint(tmp_path / "d", 0, **fresh.components(), expected="x", where="run/d")
    (tmp_path / "d" / "trainer_state.json").unlink()
    assert checkpoint_problem(tmp_path / "d") == ("no trainer_state.json (the save was cut off, or the file was "
                                                  "lost)")


def test_resume_choice_skips_damaged_checkpoints_and_says_why(tmp_path):
    from raygpt.weights.integrity import newest_intact_checkpoint

    root, storage, trainer = str(tmp_path / "runs"), Storage(), Trainer(init_seed=1)
    names = []
    for _ in range(3):
        trainer.step()
        names.append(os.path.basename(write_checkpoint(root, "demo", trainer, tmp_path / "local")))
    run = tmp_path / "runs" / "demo"
    flip_bytes(run / names[2] / "model.pt", offset_from_end=4000)
    (run / names[1] / "trainer_state.json").unlink()
    choice = newest_intact_checkpoint(join(root, "demo"), storage)
    assert choice.name == names[0] and choice.checked == "sha256"
    assert [n for n, _ in choice.skipped] == [names[2], names[1]]
    assert "model.pt differs from the SHA-256" in choice.skipped[0][1] and "no trainer_state.json" in choice.skipped[1][1]

    optimizer = run / names[0] / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    with pytest.raises(RaygptError, match=r"run .*demo: none of its 3 checkpoint\(s\) is intact \(checkpoint_00000003: "
                                          r"model.pt differs .*; checkpoint_00000001: optimizer.pt holds 100 bytes .*\): "
                                          r"put an intact copy back, or start a new run name"):
        newest_intact_checkpoint(join(root, "demo"), storage)


def test_saves_cut_off_mid_upload_are_no_checkpoint_to_resume_from(tmp_path):
    """A run killed during its first save: the folder has its trainer state but not all its
    files. Nothing to resume from, and nothing damaged: the run's records decide."""
    from raygpt.weights.integrity import newest_intact_checkpoint

    root, storage, trainer = str(tmp_path / "runs"), Storage(), Trainer(init_seed=1)
    trainer.step()
    name = os.path.basename(write_checkpoint(root, "demo", trainer, tmp_path / "local"))
    (tmp_path / "runs" / "demo" / name / "model.pt").unlink()
    choice = newest_intact_checkpoint(join(root, "demo"), storage)
    assert choice.uri is None and [(n, p) for n, p in choice.skipped] == [(name, "model.pt is missing")]


def test_a_save_never_reuses_a_folder_the_run_already_holds():
    from raygpt.weights.layout import checkpoint_dir_name, checkpoint_order

    assert checkpoint_dir_name(6) == "checkpoint_00000006"
    assert checkpoint_dir_name(6, taken=["checkpoint_00000006", "checkpoint_00000006.1"]) == "checkpoint_00000006.2"
    assert sorted(["checkpoint_00000006.1", "checkpoint_00000010", "checkpoint_00000006"], key=checkpoint_order) == [
        "checkpoint_00000006", "checkpoint_00000006.1", "checkpoint_00000010"]


def test_an_edited_trainer_state_is_a_damaged_checkpoint(tmp_path):
    """Changing ``"step": 1`` to 2 in trainer_state.json would resume at step 2 with every other
    file intact: the state's own SHA-256 tells."""
    from raygpt.weights.integrity import checkpoint_problem

    trainer = Trainer(init_seed=1)
    trainer.step()
    save_training_checkpoint(tmp_path / "c", 0, **trainer.components())
    state_file = tmp_path / "c" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "step": 2}, indent=2))
    problem = ("trainer_state.json differs from the SHA-256 it records of itself (edited or changed after the "
               "save)")
    assert checkpoint_problem(tmp_path / "c") == problem
    with pytest.raises(RaygptError, match=r"checkpoint run/c: trainer_state.json differs from the SHA-256"):
        load_training_checkpoint(tmp_path / "c", 0, **Trainer(init_seed=2).components(), expected="x", where="run/c")
    del state["state_sha256"]  # a checkpoint written before the state carried its digest
    state_file.write_text(json.dumps(state))
    assert checkpoint_problem(tmp_path / "c") is None


def tiny_preset_run(root, steps: int) -> list[str]:
    """Checkpoints 1..steps of a run ``demo`` of the tiny preset (GPT-2's vocabulary, so the
    CLI can sample it), each with other weights."""
    spec = load_spec(None, ["model.preset=tiny"])
    model = GPT(PRESETS["tiny"])
    optimizer = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95), "cpu")
    state = TrainerState(WarmupCosine(1e-3, 1, 4), choose_precision("fp32", torch.device("cpu")).scaler, 0, spec, 1)
    names = []
    for step in range(1, steps + 1):
        with torch.no_grad():
            model.transformer.wte.weight.add_(0.01)
        state.advance(32)
        names.append(f"checkpoint_{step:08d}")
        save_training_checkpoint(root / "demo" / names[-1], 0, model=model, optimizer=optimizer, trainer=state,
                                 rng=RngState())
    return names


def test_sample_and_export_read_the_newest_intact_checkpoint(tmp_path, capsys, caplog):
    """16 changed bytes in the newest model.pt: `raygpt sample` and `raygpt export` take the
    checkpoint before it, as a resume would, and say why; with none intact, one message."""
    from raygpt.cli import main

    root = tmp_path / "runs"
    older, newest = tiny_preset_run(root, 2)
    model_file = root / "demo" / newest / "model.pt"
    data = bytearray(model_file.read_bytes())
    data[-4000:-3984] = bytes(b ^ 0xFF for b in data[-4000:-3984])
    model_file.write_bytes(bytes(data))
    spec = load_spec(None, [f"storage_path={root}"])

    model, info = load_model("demo", spec, Storage())
    assert (info["step"], info["checkpoint"]) == (1, str(root / "demo" / older))
    assert f"skipped checkpoint {root / 'demo' / newest}: model.pt differs from the SHA-256" in caplog.text
    settings = ["--set", f"storage_path={root}"]
    assert main(["sample", "demo", *settings, "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    assert "demo: " in capsys.readouterr().err
    assert main(["export", "demo", str(tmp_path / "hf"), *settings]) == 0
    assert "exported demo" in capsys.readouterr().out
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as exported:
        assert exported.metadata()["step"] == "1"

    with pytest.raises(RaygptError, match=rf"checkpoint \S+{newest}: model.pt differs from the SHA-256 .*; put an "
                                          r"intact copy back, or name an intact checkpoint folder of the run"):
        load_model(str(root / "demo" / newest), spec, Storage())  # named directly: refused, not replaced
    (root / "demo" / older / "optimizer.pt").write_bytes(b"cut")
    assert main(["sample", "demo", *settings, "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert "none of its 2 checkpoint(s) is intact" in err and "Traceback" not in err
