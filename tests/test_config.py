"""Run specs: typed loading, one error naming every bad key, overrides, and every job spec stays valid."""

import json
import pickle
import subprocess
import sys
import typing
from pathlib import Path
from typing import Literal

import pytest

from raygpt.config import RunSpec, SpecSection, fields, load_spec, parse_section, recorded_spec, spec_to_dict
from raygpt.errors import RaygptError

JOBS = sorted(Path(__file__).parent.parent.joinpath("jobs").glob("*.yaml"))


def load_error(path=None, overrides=None) -> str:
    """The message of the RaygptError that ``load_spec`` must raise."""
    with pytest.raises(RaygptError) as err:
        load_spec(path, overrides)
    return str(err.value)


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
def test_job_specs_are_valid(path, monkeypatch):
    from raygpt.sweep.spec import is_sweep_file, load_sweep

    if is_sweep_file(path):  # a sweep: every run it describes is a valid run spec
        monkeypatch.chdir(path.parent.parent)
        assert load_sweep(path).runs
    else:
        load_spec(path)


def test_range_checks_cover_schedule_optimizer_and_prices(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  warmup_steps: -1\n  min_lr_ratio: 1.5\n  val_tokens: 0\n  max_failures: -2\n"
                    "model:\n  context_length: 0\nift:\n  weight_decay: -0.1\njudge:\n  price_input_per_mtok: -1\n")
    message = load_error(path)
    for expected in ("train.warmup_steps: must not be negative, got -1", "train.min_lr_ratio: must be in [0, 1], got 1.5",
                     "train.val_tokens: must be positive, got 0", "train.max_failures: must be at least -1",
                     "model.context_length: must be in 1..131072, got 0", "ift.weight_decay: must not be negative",
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


def test_registry_names_in_the_schema_are_the_registries():
    """The schema names registry entries without importing the registries (they load torch and
    Ray, and sit above ``raygpt.config``); this keeps each list equal to its registry."""
    from raygpt.evaluate import EVAL_TASKS
    from raygpt.model import PRESETS
    from raygpt.prompts import PROMPT_STYLES
    from raygpt.train.parallel import STRATEGIES
    from raygpt.train.schedule import SCHEDULES
    from raygpt.train.sinks import TRACKERS

    for names, registry in ((fields.PresetName, PRESETS), (fields.ScheduleName, SCHEDULES),
                            (fields.StrategyName, STRATEGIES), (fields.PromptStyleName, PROMPT_STYLES),
                            (fields.TrackerName, TRACKERS), (fields.EvalTask, EVAL_TASKS)):
        assert list(typing.get_args(names)) == list(registry)


def test_importing_the_config_loads_neither_torch_nor_ray():
    code = "import sys, raygpt.config; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_typos_of_registry_names_are_refused_with_a_hint(tmp_path):
    path = tmp_path / "typos.yaml"
    path.write_text("model:\n  preset: gpt2-smal\ndata:\n  chinchilla: gpt2-medum\ntrain:\n  schedule: cosin\n"
                    "  parallel: fsdp\nift:\n  prompt_style: alpacca\nlog:\n  trackers: [wandb, tensorbord]\n")
    message = load_error(path)
    for expected in ("model.preset: expected one of 'gpt2-small', ",
                     "got 'gpt2-smal' (str) (did you mean 'gpt2-small'?)",
                     "data.chinchilla: expected one of", "(did you mean 'gpt2-medium'?)", "(did you mean 'cosine'?)",
                     "train.parallel: expected one of 'ddp', got 'fsdp' (str)", "(did you mean 'alpaca'?)",
                     "log.trackers[1]: expected one of 'tensorboard', 'wandb', 'mlflow', got 'tensorbord' (str) "
                     "(did you mean 'tensorboard'?)"):
        assert expected in message


def test_submit_refuses_a_typo_before_contacting_the_cluster(tmp_path, capsys):
    from raygpt.cli import main

    path = tmp_path / "train.yaml"
    path.write_text("name: typo\ntrain:\n  schedule: cosin\n")
    # An address nothing listens on: reaching it would fail differently, after seconds.
    assert main(["submit", str(path), "--address", "http://127.0.0.1:9", "--no-follow"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raygpt submit: error: ") and "train.schedule: expected one of" in err, err


def test_every_field_is_documented_and_bounds_are_said_whole():
    for name, section in RunSpec.model_fields.items():
        assert section.description, name
        inner = section.annotation
        if isinstance(inner, type) and issubclass(inner, SpecSection):
            assert all(f.description for f in inner.model_fields.values()), name
    message = load_error(None, ["train.beta2=1", "data.heldout_permille=1000", "judge.passes=0", "ift.patience=-1",
                                "train.lr=0", "model.dropout=1"])
    for expected in ("train.beta2: must be in [0, 1), got 1", "data.heldout_permille: must be in 1..999, got 1000",
                     "judge.passes: must be in 1..100, got 0", "ift.patience: must not be negative, got -1",
                     "train.lr: must be positive, got 0", "model.dropout: must be in [0, 1), got 1"):
        assert expected in message


def test_types_are_strict_but_integral_floats_are_integers():
    spec = load_spec(None, ["train.max_steps=1e3", "data.tokens=2.5e6", "train.lr=1"])
    assert (spec.train.max_steps, spec.data.tokens, spec.train.lr) == (1000, 2_500_000, 1.0)
    assert isinstance(spec.train.max_steps, int) and isinstance(spec.train.lr, float)
    message = load_error(None, ["train.compile=1", "train.max_steps=1.5", "name=12", "train.use_gpu=yes",
                                "eval.models=run"])
    for expected in ("train.compile: expected true or false, got 1", "train.max_steps: expected an integer, got 1.5",
                     "name: expected a string, got 12", "train.use_gpu: expected true or false, got 'yes' (str)",
                     "eval.models: expected a list, got 'run' (str)"):
        assert expected in message


def test_specs_pickle_and_copy_as_ray_ships_them():
    spec = load_spec(None, ["train.lr=1e-3", "eval.models=[a, openai:gpt2]"])
    again = pickle.loads(pickle.dumps(spec))
    assert again == spec and again.eval.models == ["a", "openai:gpt2"] and again.train.lr == 1e-3
    assert spec_to_dict(spec)["train"]["lr"] == 1e-3
    assert load_spec(None, settings={"train.lr": 1e-3, "eval.models": ["a", "openai:gpt2"]}) == spec


def test_parse_section_reports_any_model_the_same_way():
    class Grid(SpecSection):
        values: list[float] = []
        """Values to try."""
        metric: Literal["val_loss", "score"] = "val_loss"
        """What the grid compares."""

    assert parse_section(Grid, {"values": [1, 2.5]}, "sweep.yaml", "sweep.").values == [1.0, 2.5]
    with pytest.raises(RaygptError) as err:
        parse_section(Grid, {"value": [1], "metric": "scor"}, "sweep.yaml", "sweep.", what="sweep")
    assert str(err.value) == ("sweep.yaml: invalid sweep:\n"
                              "  sweep.metric: expected one of 'val_loss', 'score', got 'scor' (str) "
                              "(did you mean 'score'?)\n  sweep.value: unknown key (did you mean 'values'?)")


def test_at_most_25_problems_are_shown():
    message = load_error(None, [f"train.no_such_key_{i}=1" for i in range(40)])
    assert len(message.splitlines()) == 1 + 25 + 1 and message.endswith("... and 15 more")


def test_recorded_specs_keep_no_password_and_s3_endpoints_take_none():
    password = "pw-Zx81-never-recorded"
    spec = load_spec(None, [f"judge.base_url=http://u:{password}@127.0.0.1:8000/v1",
                            f"ift.data=https://u:{password}@data.example/i.json",
                            f"eval.hellaswag_data=https://u:{password}@data.example/h.jsonl",
                            f"log.mlflow_tracking_uri=postgresql://u:{password}@db.example/mlflow"])
    assert password in spec.judge.base_url  # the spec keeps what it is used with
    recorded = recorded_spec(spec)
    assert password not in json.dumps(recorded) and recorded["judge"]["base_url"] == "http://127.0.0.1:8000/v1"
    assert recorded["log"]["mlflow_tracking_uri"] == "postgresql://db.example/mlflow"
    message = load_error(None, [f"storage.endpoint_url=http://u:{password}@127.0.0.1:8333"])
    assert "storage.endpoint_url: 'http://127.0.0.1:8333' carries a user:password" in message
    assert password not in message
