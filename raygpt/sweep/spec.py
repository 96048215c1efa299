"""A sweep spec: a base run spec, seeds, and named variants of it, each trained once per seed.

```yaml
sweep:
  name: gpt2-small-ablations
  base: jobs/train-gpt2-small-fineweb.yaml
  seeds: [1337, 1, 2]
  variants:
    baseline: {}
    wd-0.01: {train.weight_decay: 0.01}
  stages: [train, eval, ift, judge, report]
  max_concurrent: 2
```

Every (variant, seed) is an ordinary run spec: the base file, the sweep's ``common``
settings, the variant's settings, the command line's ``--set``, then the run's name
``<sweep>/<variant>@<seed>`` and ``train.seed``. ``load_sweep`` builds all of them before
anything starts, so a key that a run spec does not accept is refused for the whole sweep with
one message naming the variant and the key.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from raygpt.config import RunSpec, SpecSection, load_spec, parse_section, read_spec_text, read_spec_yaml
from raygpt.config.fields import Distinct, Int, LocalPath, Name, RunName, Seed, StoreUri, problem
from raygpt.config.schema import MAX_SEEDS
from raygpt.errors import RaygptError
from raygpt.storage import join

STAGES = ("train", "eval", "ift", "judge", "report")
"""The stages of a sweep, in the order they run."""

SWEEP_KEYS = ("name", "storage_path", "train.seed")
"""Settings the sweep itself makes for every run: no variant may set them."""

COMBINED_MARK = "+"
"""Joins the names of combined variants into the combined variant's name (``wd-0.01+tied``)."""

SEED_MARK = "@"
"""Joins a variant's name and a pretraining seed into a run's name (``wd-0.01@1337``)."""

VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _variant_names(variants: Any) -> Any:
    """Variant names are folder-safe text: YAML reads ``null:``, ``yes:`` or ``3:`` as values."""
    if isinstance(variants, dict):
        if not variants:
            raise problem("name at least the baseline, e.g. {baseline: {}}")
        for name in variants:
            if not isinstance(name, str):
                raise problem(f"the name {name!r} is not text (YAML reads null, yes/no and numbers as values): quote it")
            if not VARIANT_NAME.fullmatch(name) or len(name) > 100:
                raise problem(f"{name!r}: a variant's name is letters, digits, '.', '_' and '-' (at most 100)")
    return variants


def _stage_order(stages: list[str]) -> list[str]:
    if not stages:
        raise problem(f"name the stages to run (of {', '.join(STAGES)})")
    if "judge" in stages and "ift" not in stages:
        raise problem("judge scores the answers of ift: list ift too")
    return sorted(stages, key=STAGES.index)


def _one_folder(name: str) -> str:
    if "/" in name:
        raise problem(f"{name!r}: a sweep's name is one folder name, without '/'")
    return name


Settings = dict[Name, Any]
"""Run-spec settings by dotted key (``train.grad_clip: 1.0``), checked when each run's spec is built."""


class SweepConfig(SpecSection):
    """The ``sweep:`` section of a sweep spec."""

    name: Annotated[RunName, AfterValidator(_one_folder)]
    """The sweep's name: its folder under the base spec's ``storage_path``, which holds its runs
    (``<name>/<variant>@<seed>``) and what the later stages write (``eval``, ``ift``, ``judge``,
    ``report``)."""

    base: LocalPath
    """The run spec every variant changes: a path tried from the current folder, then beside
    the sweep file."""

    seeds: Annotated[list[Seed], Distinct, Field(min_length=1, max_length=MAX_SEEDS)] = [1337]
    """Pretraining seeds (``train.seed``: model init, data order, dropout). Every variant is
    trained once per seed; runs of one seed see the same sequences at every step and start
    from the same weights wherever their architectures share a parameter, so each variant is
    compared with the baseline seed by seed."""

    variants: Annotated[dict[Name, Settings], BeforeValidator(_variant_names)]
    """Variant name -> the run-spec settings it changes, by dotted key (``train.grad_clip:
    1.0``); ``{}`` is the base spec itself. Names are letters, digits, '.', '_' and '-'."""

    baseline: Name = "baseline"
    """The variant every other one is compared with."""

    common: Settings = {}
    """Settings for every run and stage of the sweep (``train.max_steps``, ``ift.seeds``,
    ``judge.model``), applied before each variant's own."""

    stages: Annotated[list[Literal["train", "eval", "ift", "judge", "report"]], Distinct,
                      AfterValidator(_stage_order)] = ["train", "eval", "report"]
    """What the sweep does, always in the order train, eval, ift, judge, report: ``eval`` is
    each run's test loss on one fixed test split, ``ift`` fine-tunes every run and answers the
    held-out instructions, ``judge`` scores the answers and pools them per variant, ``report``
    compares the variants with the baseline."""

    max_concurrent: Int | None = Field(None, ge=1, le=10_000)
    """Runs trained at once. None: as many as the cluster's GPUs allow (its CPUs on a CPU-only
    cluster), at least one."""

    combine: list[Annotated[list[Name], Field(min_length=2)]] = []
    """Variants to stack: each entry names variants whose settings are merged into one more
    variant, named by joining them with '+' (``[wd-0.01, tied]`` -> ``wd-0.01+tied``); the
    "stack the winners" run. Two of them setting one key differently is refused."""

    eval_dataset: StoreUri | None = None
    """The dataset whose test split every run is evaluated on. None: the baseline's
    ``train.dataset`` (one yardstick even when a variant trains on other data)."""


class SweepFile(SpecSection):
    sweep: SweepConfig
    """The sweep; a sweep spec holds nothing else."""


@dataclass(frozen=True)
class SweepRun:
    """One (variant, seed) of a sweep: an ordinary run."""

    variant: str
    seed: int
    spec: RunSpec

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class Sweep:
    """A sweep, every run's spec built and checked."""

    config: SweepConfig
    path: str
    """The sweep file."""
    base_path: str
    """The base run spec's file, as found."""
    settings: dict[str, dict[str, Any]]
    """Variant name -> its settings, combined variants included."""
    runs: list[SweepRun]
    stage_spec: RunSpec
    """The spec of the stages after training: the base with ``common`` and ``--set``, named
    after the sweep (its eval, ift and judge sections are the sweep's)."""

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def folder(self) -> str:
        """``<storage_path>/<sweep>``: its runs and everything the later stages write."""
        return join(self.stage_spec.storage_path, self.config.name)

    @property
    def variants(self) -> list[str]:
        """Variant names, the baseline first, then in the spec's order, combined ones last."""
        rest = [v for v in self.settings if v != self.config.baseline]
        return [self.config.baseline, *rest]

    def runs_of(self, variant: str) -> list[SweepRun]:
        return [r for r in self.runs if r.variant == variant]


def run_name(sweep: str, variant: str, seed: int) -> str:
    return f"{sweep}/{variant}{SEED_MARK}{seed}"


def is_sweep_file(path: str | Path) -> bool:
    """Whether a YAML file is a sweep spec (its top level has a ``sweep:`` section)."""
    try:
        return bool(re.search(r"^sweep\s*:", read_spec_text(path), flags=re.MULTILINE))
    except RaygptError:
        return False


def load_sweep(path: str | Path, overrides: list[str] | None = None, combine: list[list[str]] | None = None) -> Sweep:
    """Read a sweep spec and build every run's spec; every problem is one RaygptError that
    names the file and, for a run's setting, the variant and the key. ``overrides`` are
    ``--set`` values for every run; ``combine`` adds combined variants to the spec's own."""
    where = str(path)
    config = _parse(path)
    problems: list[str] = []
    settings = dict(config.variants)
    if config.baseline not in settings:
        problems.append(f"sweep.baseline: {config.baseline!r} is not a variant (variants: {', '.join(settings)})")
    for variant, values in settings.items():
        for key in values:
            if key in SWEEP_KEYS:
                problems.append(f"sweep.variants.{variant}: {key}: set by the sweep for every run, not by a variant")
    for key in config.common:
        if key in SWEEP_KEYS:
            problems.append(f"sweep.common: {key}: set by the sweep for every run")
    for names in [*config.combine, *(combine or [])]:
        name, merged, problem = _combined(names, config.variants)
        if problem:
            problems.append(problem)
        elif name in settings and settings[name] != merged:
            problems.append(f"sweep.combine {names}: a variant named {name!r} exists already with other settings")
        else:
            settings[name] = merged
    if problems:
        raise RaygptError(f"{where}: invalid sweep:\n  " + "\n  ".join(problems))
    base_path = _find_base(config.base, Path(path))
    runs = []
    for variant, values in settings.items():
        for seed in config.seeds:
            name = run_name(config.name, variant, seed)
            try:
                spec = load_spec(base_path, overrides, where=f"{where}: variant {variant!r}",
                                 settings={**config.common, **values, "name": name, "train.seed": seed})
            except RaygptError as e:
                problems.append(str(e))
                break  # the same problem at every seed
            # Tracker runs say which variant and seed they are, so a tracker's own views group them.
            spec.log.tags = [*spec.log.tags, f"sweep:{config.name}", f"variant:{variant}", f"seed:{seed}"]
            runs.append(SweepRun(variant, seed, spec))
    if problems:
        raise RaygptError("\n".join(problems))
    stage_spec = load_spec(base_path, overrides, where=f"{where}: common", settings={**config.common,
                                                                                    "name": config.name})
    judge = stage_spec.judge
    if "judge" in config.stages and judge.mode == "comparative":
        from raygpt.judge.prompts import LABELS

        answers = len(runs) * max(1, len(stage_spec.ift.seeds)) + (2 if judge.anchors else 0)
        if answers > len(LABELS):
            raise RaygptError(f"{where}: the judge would compare {answers} answers to each item in one call "
                              f"(comparative mode, anchors included), at most {len(LABELS)} fit: set judge.mode: "
                              "single in sweep.common, or judge fewer runs")
    storage_paths = {r.spec.storage_path for r in runs}
    if len(storage_paths) > 1:
        raise RaygptError(f"{where}: the runs of one sweep share one storage_path, got {sorted(storage_paths)}")
    return Sweep(config, where, str(base_path), settings, runs, stage_spec)


def parse_combine(values: list[str]) -> list[list[str]]:
    """``--combine A,B`` flags as lists of variant names."""
    return [[name.strip() for name in value.split(",") if name.strip()] for value in values]


def _combined(names: list[str], variants: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any], str | None]:
    """(name, merged settings, problem) of the variant that stacks ``names``."""
    label = f"combine {COMBINED_MARK.join(names)}"
    if len(names) < 2 or len(set(names)) != len(names):
        return "", {}, f"{label}: name two or more different variants"
    unknown = [n for n in names if n not in variants]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(variants), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (variants: {', '.join(variants)})"
        return "", {}, f"{label}: {unknown[0]!r} is not a variant{hint}"
    merged: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for name in names:
        for key, value in variants[name].items():
            if key in merged and merged[key] != value:
                return "", {}, (f"{label}: {owner[key]} sets {key} to {merged[key]!r} and {name} to {value!r}: "
                                "combine variants that change different settings")
            merged[key], owner[key] = value, name
    return COMBINED_MARK.join(names), merged, None


def _parse(path: str | Path) -> SweepConfig:
    raw = read_spec_yaml(path)
    if "sweep" not in raw:
        raise RaygptError(f"{path}: not a sweep spec (expected a top-level 'sweep:' section)")
    return parse_section(SweepFile, raw, str(path), what="sweep").sweep


def _find_base(base: str, sweep_path: Path) -> Path:
    candidates = [Path(base).expanduser()]
    if not candidates[0].is_absolute():
        candidates.append(sweep_path.parent / base)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise RaygptError(f"{sweep_path}: sweep.base: {base}: no such run spec (looked in "
                      f"{' and '.join(str(c) for c in candidates)})")
