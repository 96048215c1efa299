"""Reading a spec's YAML: bounded, by YAML 1.2's core schema, and every oddity one error naming the line.

PyYAML implements YAML 1.1, whose implicit types surprise: ``1:30`` is the sexagesimal 90,
``12:30:00`` is 45000, ``no`` is false, ``0777`` is octal, ``2024-13-45`` a date that cannot
exist. Specs (and ``--set`` values) are read by YAML 1.2's core schema instead: ``true`` and
``false``, decimal, ``0o`` and ``0x`` integers, floats (``1e9`` is one), ``null``, and one
extension, digits grouped by underscores (``10_000_000``); anything else is a string, which
a typed field then refuses by name. No library offers this loader
(ruamel.yaml reads 1.2 but has none of the limits below), so it is PyYAML's safe loader with
its resolvers replaced. It also refuses what PyYAML accepts and raygpt cannot use: a repeated
key (PyYAML keeps the last silently, so a second ``train:`` drops the first), nesting deeper
than ``MAX_YAML_DEPTH`` (PyYAML recurses), aliases that expand past ``MAX_SPEC_VALUES``
values (a "billion laughs" fills the memory of whatever walks the result), and values Python
cannot hold (an integer of 5,000 digits).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from raygpt.config.fields import describe, shorten
from raygpt.errors import RaygptError
from raygpt.storage import utf8_text

MAX_SPEC_BYTES = 1 << 20
"""A run spec is a few kilobytes; reading stops after this many bytes, so a wrong path
(``/dev/zero``, a dataset shard) fails at once instead of filling the memory."""

MAX_YAML_DEPTH = 32
"""Nesting deeper than this is refused: the deepest spec value is a list in a section, and
PyYAML composes nested nodes recursively (10,000 levels raise RecursionError)."""

MAX_SPEC_VALUES = 10_000
"""Values (keys, scalars, lists and mappings) a spec may hold with every alias expanded; a
run spec holds a few hundred."""


class RefusedYAML(yaml.MarkedYAMLError):
    """Well-formed YAML that raygpt will not read: a repeated key, too deep, too large once
    its aliases are expanded, or a value Python cannot hold."""


_YAML_1_1_TYPES = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                   "tag:yaml.org,2002:timestamp"}


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's core-schema scalars and raygpt's limits."""

    yaml_implicit_resolvers = {first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML_1_1_TYPES]
                               for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def compose_node(self, parent, index):
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise RefusedYAML(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep",
                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as e:
            reason = str(e).split(";")[0]  # Python's int limit adds advice about sys.set_int_max_str_digits
            raise RefusedYAML(None, None, f"{shorten(str(node.value))} cannot be read ({reason})",
                              node.start_mark) from None

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_at: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = first_at.setdefault(key, key_node)
                except TypeError:  # an unhashable key: the base class says so
                    continue
                if first is not key_node:
                    raise RefusedYAML(None, None, f"{shorten(repr(key))} is given twice (first at line "
                                      f"{first.start_mark.line + 1}); give each key once", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _core_int(loader: _SpecLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node)
    sign, digits = (-1, text[1:]) if text[:1] == "-" else (1, text.lstrip("+"))
    base = {"0o": 8, "0x": 16}.get(digits[:2].lower(), 10)
    return sign * int(digits[2:] if base != 10 else digits, base)


def _core_float(loader: _SpecLoader, node: yaml.Node) -> float:
    text = loader.construct_scalar(node).lower()
    sign, body = (-1.0, text[1:]) if text[:1] == "-" else (1.0, text.lstrip("+"))
    if body in (".inf", ".nan"):
        return math.nan if body == ".nan" else sign * math.inf
    return sign * float(body)


def _core_bool(loader: _SpecLoader, node: yaml.Node) -> bool:
    text = loader.construct_scalar(node).lower()
    if text not in ("true", "false"):
        raise ValueError("a boolean is true or false")
    return text == "true"


_DIGITS = "[0-9](?:_?[0-9])*"  # digits, grouped by single underscores as raygpt's own specs write 10_000_000

for _tag, _pattern, _first, _construct in (
        ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF", _core_bool),
        ("int", rf"^(?:[-+]?{_DIGITS}|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789", _core_int),
        ("float", rf"^(?:[-+]?(?:\.{_DIGITS}|{_DIGITS}(?:\.(?:{_DIGITS})?)?)(?:[eE][-+]?[0-9]+)?"
                  r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+0123456789.", _core_float)):
    _SpecLoader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), list(_first))
    _SpecLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _construct)


def parse_yaml(text: str) -> Any:
    """``text`` read as YAML 1.2 within raygpt's limits; raises a ``yaml.YAMLError`` (a
    ``RefusedYAML`` for what raygpt will not read)."""
    value = yaml.load(text, Loader=_SpecLoader)  # noqa: S506 (a SafeLoader)
    values, stack = 0, [("", value)]
    while stack:  # counts every alias as what it stands for, so a bomb or a cycle ends here
        path, item = stack.pop()
        values += 1
        if values > MAX_SPEC_VALUES:
            raise RefusedYAML(None, None, f"more than {MAX_SPEC_VALUES:,} values once its aliases are expanded, at "
                              f"{path or 'the top'} (a run spec holds a few hundred: an alias bomb, or an alias "
                              "inside itself?)", None)
        if isinstance(item, (dict, list)):
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            named = len(path) < 60  # past that the place is clear enough, and a cycle's path would grow forever
            stack += [(_key_path(path, key) if named else path, child) for key, child in pairs]
    return value


def _key_path(path: str, key: Any) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)


def yaml_problem(e: yaml.YAMLError) -> str:
    """`` line L, column C: what`` of a YAML error (the place when it has one)."""
    mark = getattr(e, "problem_mark", None)
    at = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
    kind = "" if isinstance(e, RefusedYAML) else "malformed YAML: "
    return f"{at} {kind}{getattr(e, 'problem', None) or str(e)}"


def read_spec_text(path: str | Path) -> str:
    """The text of a spec file: at most ``MAX_SPEC_BYTES``, UTF-8, each failure one RaygptError naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
    except (OSError, ValueError) as e:  # ValueError: a path with a NUL byte
        raise RaygptError(f"{path}: cannot read run spec ({getattr(e, 'strerror', None) or e})") from None
    if len(data) > MAX_SPEC_BYTES:
        raise RaygptError(f"{path}: larger than {MAX_SPEC_BYTES // 1024} KiB; is it really a run spec (YAML)?")
    return utf8_text(data, str(path))


def read_spec_yaml(path: str | Path, where: str | None = None) -> dict[str, Any]:
    """The mapping a spec file holds ({} for an empty file), read within the limits above; a
    problem is one RaygptError naming ``where`` (default: the path) and the line."""
    where = where or str(path)
    try:
        raw = parse_yaml(read_spec_text(path))
    except yaml.YAMLError as e:
        raise RaygptError(f"{where}:{yaml_problem(e)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RaygptError(f"{where}: a run spec is a mapping of sections, got {describe(raw)}")
    return raw


def parse_override_value(text: str) -> Any:
    """A ``--set`` value parsed as YAML (numbers, booleans, lists, null); text that is not valid
    YAML, such as a glob ``*.txt``, stays the string it is. Values raygpt refuses to read (deep
    nesting, a 5000-digit number, a repeated key) raise the ``RefusedYAML``."""
    if not text:
        return text
    try:
        return parse_yaml(text)
    except RefusedYAML:
        raise
    except yaml.YAMLError:
        return text
