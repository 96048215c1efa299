"""Run specs: typed loading, one error naming every bad key, overrides, and every job spec stays valid."""

from pathlib import Path

import pytest

from raygpt.config import RunSpec, load_spec
from raygpt.errors import RaygptError

JOBS = sorted(Path(__file__).parent.parent.joinpath("jobs").glob("*.yaml"))


def test_defaults_load():
    spec = load_spec(None)
    assert isinstance(spec, RunSpec) and spec.model.preset == "gpt2-small"


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("name: demo\ntrain:\n  lr: 1e-3\n  max_steps: 10\n")
    spec = load_spec(path, ["train.lr=3e-4", "model.preset=tiny", "data.tokens=2e6"])
    assert (spec.train.lr, spec.train.max_steps, spec.model.preset, spec.data.tokens) == (3e-4, 10, "tiny", 2_000_000)


def test_every_problem_is_reported_at_once_with_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: demo\ntrain:\n  lrr: 1\n  micro_batch_size: many\nmodel:\n  dropout: 2.0\njudge:\n  mode: vibes\n")
    with pytest.raises(RaygptError) as err:
        load_spec(path)
    message = str(err.value)
    assert str(path) in message
    assert "train.lrr: unknown key (did you mean 'lr'?)" in message
    assert "train.micro_batch_size: expected an integer, got 'many'" in message
    assert "judge.mode: expected one of 'single', 'comparative'" in message


def test_cross_field_checks(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  tokens: 100\n  chinchilla: gpt2-small\nmodel:\n  dropout: 1.5\n")
    with pytest.raises(RaygptError) as err:
        load_spec(path)
    assert "data.tokens and data.chinchilla" in str(err.value)
    assert "model.dropout: must be in [0, 1)" in str(err.value)


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(RaygptError, match=r"broken.yaml:.*line \d+.*malformed YAML"):
        load_spec(path)


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_job_specs_are_valid(path):
    load_spec(path)


def test_range_checks_cover_schedule_optimizer_and_prices(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  warmup_steps: -1\n  min_lr_ratio: 1.5\n  val_tokens: 0\n  max_failures: -2\n"
                    "model:\n  context_length: 0\nift:\n  weight_decay: -0.1\njudge:\n  price_input_per_mtok: -1\n")
    with pytest.raises(RaygptError) as err:
        load_spec(path)
    message = str(err.value)
    for expected in ("train.warmup_steps: must not be negative, got -1", "train.min_lr_ratio: must be in [0, 1], got 1.5",
                     "train.val_tokens: must be positive, got 0", "train.max_failures: must be -1",
                     "model.context_length: must be positive, got 0", "ift.weight_decay: must not be negative",
                     "judge.price_input_per_mtok: must not be negative"):
        assert expected in message
    # -1 is Ray's "restart forever", a valid setting.
    assert load_spec(None, ["train.max_failures=-1"]).train.max_failures == -1


def test_override_fills_an_empty_section(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("name: demo\ntrain:\n")
    assert load_spec(path, ["train.max_steps=5"]).train.max_steps == 5


def test_override_values_that_are_not_yaml_stay_strings():
    spec = load_spec(None, ["data.source=*.txt", "eval.models=[run-a, openai:gpt2]", "data.tokens=null"])
    assert (spec.data.source, spec.eval.models, spec.data.tokens) == ("*.txt", ["run-a", "openai:gpt2"], None)
