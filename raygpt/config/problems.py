"""What pydantic finds in a spec, said the way raygpt says it: one line per problem, naming the key.

Pydantic names a location tuple and says "Input should be ..."; these lines name the dotted
key (``train.lr``, ``eval.models[2]``), show what was given (never the whole of a large
value), suggest the key or name meant when one is close, and state a field's whole range
(``must be in [0, 1)``) rather than the one bound it crossed. ``parse_section`` validates a
raw mapping against any pydantic model of raygpt's and raises every problem as one RaygptError.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from raygpt.config.fields import describe, number
from raygpt.errors import RaygptError

MAX_PROBLEMS_SHOWN = 25
"""A fuzzed or badly generated spec can have thousands of problems; the first ones are shown."""

Model = TypeVar("Model", bound=BaseModel)

_EXPECTED = {"int_type": "an integer", "int_from_float": "an integer", "int_parsing": "an integer",
             "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
             "bool_parsing": "true or false", "string_type": "a string", "list_type": "a list",
             "model_type": "a section (mapping)", "model_attributes_type": "a section (mapping)",
             "dict_type": "a section (mapping)"}


def parse_section(cls: type[Model], raw: Any, where: str, prefix: str = "", *, what: str = "run spec") -> Model:
    """``raw`` (a mapping read from YAML) validated as ``cls``; every problem, each named
    ``prefix`` + its key, in one RaygptError that starts with ``where`` (a file) and ``what``."""
    value, problems = section_problems(cls, raw, prefix)
    if problems:
        raise RaygptError(problems_message(where, problems, what))
    return value


def section_problems(cls: type[Model], raw: Any, prefix: str = "") -> tuple[Model | None, list[str]]:
    """``(cls validated from raw, [])``, or ``(None, one line per problem)``."""
    try:
        return cls.model_validate(raw), []
    except ValidationError as e:
        return None, [problem_line(cls, error, prefix) for error in e.errors(include_url=False)]


def problems_message(where: str, problems: list[str], what: str = "run spec") -> str:
    shown = problems[:MAX_PROBLEMS_SHOWN]
    if len(problems) > len(shown):
        shown.append(f"... and {len(problems) - len(shown)} more")
    return f"{where}: invalid {what}:\n  " + "\n  ".join(shown)


def problem_line(cls: type[BaseModel], error: ErrorDetails, prefix: str = "") -> str:
    """One of pydantic's errors as ``key: what is wrong, got what``."""
    key, owner, field, annotation = _locate(cls, error["loc"], prefix)
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    if kind == "raygpt":
        if ctx.get("keys"):  # a check across fields of the section at ``key``
            key = " and ".join(f"{key}.{name}" if key != "<top>" else name for name in ctx["keys"])
        return f"{key}: {ctx['problem']}"
    if kind == "extra_forbidden":
        known = list(owner.model_fields) if owner else []
        hint = _did_you_mean(error["loc"][-1], known) or f" (known: {', '.join(known)})"
        return f"{key}: unknown key{hint}"
    if kind == "invalid_key":
        return f"{key}: unknown key (a key is a name, got {describe(error['loc'][-1])})"
    if kind in _EXPECTED:
        if value is None:
            return f"{key}: a value is required"
        return f"{key}: expected {_EXPECTED[kind]}, got {describe(value)}"
    if kind == "literal_error":
        names = _literal_names(annotation)
        hint = _did_you_mean(value, names) if isinstance(value, str) else ""
        return f"{key}: expected one of {', '.join(map(repr, names))}, got {describe(value)}{hint}"
    if kind == "finite_number":
        return f"{key}: must be a finite number, got {value}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{key}: {_range(field, annotation, ctx)}, got {number(value)}"
    if kind in ("string_too_short", "too_short") and ctx.get("min_length") == 1:
        unset = " (leave the key out for the default)" if field is not None and field.default is None else ""
        return f"{key}: must not be empty{unset}"
    if kind == "too_long":
        return f"{key}: has {ctx.get('actual_length')} entries, at most {ctx.get('max_length')}"
    return f"{key}: {error['msg']}"


def _locate(cls: type[BaseModel], loc: tuple, prefix: str) -> tuple[str, type[BaseModel] | None, FieldInfo | None, Any]:
    """The dotted key of ``loc``, the model that holds its last key, that key's field (None for
    an entry of a list) and the annotation there. Parts that name no key or index (a union
    member's tag) are left out of the key."""
    key, owner, field, annotation = prefix.rstrip("."), None, None, cls
    for part in loc:
        model = _model_in(annotation)
        if model is not None:
            owner, field = model, model.model_fields.get(part) if isinstance(part, str) else None
            key = f"{key}.{part}" if key else str(part)
            annotation = field.annotation if field else None
        elif typing.get_origin(_unwrapped(annotation)) is list and isinstance(part, int):
            key, field, annotation = f"{key}[{part}]", None, typing.get_args(_unwrapped(annotation))[0]
    return key or "<top>", owner, field, annotation


def _unwrapped(annotation: Any) -> Any:
    """``X`` of ``Annotated[X, ...]`` and of ``X | None``."""
    while True:
        if typing.get_origin(annotation) is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif typing.get_origin(annotation) in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def _model_in(annotation: Any) -> type[BaseModel] | None:
    inner = _unwrapped(annotation)
    return inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None


def _literal_names(annotation: Any) -> list[Any]:
    inner = _unwrapped(annotation)
    return list(typing.get_args(inner)) if typing.get_origin(inner) is Literal else []


def _did_you_mean(given: Any, names: list[str]) -> str:
    close = difflib.get_close_matches(str(given), [str(n) for n in names], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _range(field: FieldInfo | None, annotation: Any, ctx: dict[str, Any]) -> str:
    """A value's bounds in words: its whole range (from the field, or the type of a list's
    entries), else the one bound the error names."""
    constraints = [*(field.metadata if field else []),
                   *(typing.get_args(annotation)[1:] if typing.get_origin(annotation) is Annotated else [])]
    constraints += [inner for c in constraints if isinstance(c, FieldInfo) for inner in c.metadata]
    bounds = {name: getattr(c, name) for c in constraints for name in ("gt", "ge", "lt", "le")
              if getattr(c, name, None) is not None} or {k: ctx[k] for k in ("gt", "ge", "lt", "le") if k in ctx}
    low = next(((k, bounds[k]) for k in ("gt", "ge") if k in bounds), None)
    high = next(((k, bounds[k]) for k in ("lt", "le") if k in bounds), None)
    if low and high:
        if _unwrapped(annotation) is int:
            return f"must be in {low[1] + (low[0] == 'gt')}..{high[1] - (high[0] == 'lt')}"
        return f"must be in {'(' if low[0] == 'gt' else '['}{low[1]}, {high[1]}{')' if high[0] == 'lt' else ']'}"
    if low:
        return {("gt", 0): "must be positive", ("ge", 0): "must not be negative"}.get(
            low, f"must be {'greater than' if low[0] == 'gt' else 'at least'} {low[1]}")
    return f"must be {'less than' if high[0] == 'lt' else 'at most'} {high[1]}"
