"""Typed run specs: loaded from YAML, overridden by ``--set``, checked all at once.

``schema`` declares the spec (pydantic models, a docstring per field), ``fields`` the value
types, ``reading`` the hardened YAML 1.2 reader and ``problems`` the messages. ``load_spec``
reports every unknown key, wrong type, bad value and malformed override in one RaygptError
that names the file and each key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from raygpt.config.fields import SEED_LIMIT, run_name_problem, shorten
from raygpt.config.problems import MAX_PROBLEMS_SHOWN, parse_section, problems_message, section_problems
from raygpt.config.reading import (
    MAX_SPEC_BYTES,
    parse_override_value,
    read_spec_text,
    read_spec_yaml,
    yaml_problem,
)
from raygpt.config.schema import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    IftConfig,
    JudgeConfig,
    LogConfig,
    ModelConfig,
    ReportConfig,
    RunSpec,
    SpecSection,
    StorageConfig,
    TrainConfig,
    worker_range,
)
from raygpt.errors import RaygptError
from raygpt.storage import without_credentials, without_userinfo

__all__ = ["CheckpointConfig", "DataConfig", "EvalConfig", "IftConfig", "JudgeConfig", "LogConfig",
           "MAX_PROBLEMS_SHOWN", "MAX_SPEC_BYTES", "ModelConfig", "ReportConfig", "RunSpec", "SEED_LIMIT",
           "SpecSection", "StorageConfig", "TrainConfig", "load_spec", "parse_section", "read_spec_text",
           "read_spec_yaml", "recorded_spec", "run_name_problem", "spec_to_dict", "without_userinfo", "worker_range"]


def load_spec(path: str | Path | None = None, overrides: list[str] | None = None, *,
              settings: dict[str, Any] | None = None, where: str | None = None) -> RunSpec:
    """Load a run spec from YAML (or the defaults when ``path`` is None), set ``settings`` and
    apply ``--set`` overrides, in that order.

    ``settings`` maps dotted keys to values already parsed (``{"train.grad_clip": 1.0}``: a
    sweep's variant); ``overrides`` look like ``train.lr=3e-4`` with the value parsed as YAML.
    Every problem, in the file, the settings or the overrides, is one RaygptError that names
    ``where`` (default: the file) and the key.
    """
    where = where or (str(path) if path else "<defaults>")
    raw = read_spec_yaml(path, where) if path is not None else {}
    problems: list[str] = []
    for key, value in (settings or {}).items():
        _set_value(raw, str(key), value, str(key), problems)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"--set {shorten(item)}: expected KEY=VALUE, e.g. train.lr=3e-4")
            continue
        try:
            parsed = parse_override_value(value)
        except yaml.YAMLError as e:
            problems.append(f"--set {shorten(key)}:{yaml_problem(e)}")
            continue
        _set_value(raw, key, parsed, f"--set {shorten(key)}", problems)
    spec, found = section_problems(RunSpec, raw)
    problems += found
    if problems:
        raise RaygptError(problems_message(where, problems))
    return spec


def _set_value(raw: dict[str, Any], key: str, value: Any, label: str, problems: list[str]) -> None:
    """Set the dotted ``key`` of the raw spec to ``value``, creating sections on the way; a
    part of the path that is not a section is a problem named by ``label``."""
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        if node.get(part) is None:  # absent, or an empty section (``train:`` with nothing under it)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            problems.append(f"{label}: {shorten(part)} is not a section")
            return
    node[leaf] = value


def spec_to_dict(spec: BaseModel) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict of a spec (or of one of its sections), as given:
    what ``load_spec`` reads back. What is recorded anywhere is ``recorded_spec``'s."""
    return spec.model_dump()


def recorded_spec(spec: BaseModel) -> dict[str, Any]:
    """The spec (or a section) as run records, checkpoints, model cards and trackers keep it:
    every URL in it without its user:password."""
    return without_credentials(spec.model_dump())
