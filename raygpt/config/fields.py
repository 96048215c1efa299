"""The value types of a run spec's fields: what pydantic checks beyond the Python type.

Types are strict (a flag is ``true`` or ``false``, a string is a string, never a number YAML
happened to read), with one allowance: an integer may be written as an integral float, as YAML
reads ``1.5e9``. Every string must be UTF-8 text (a name typed as bytes that are not UTF-8
arrives as lone surrogates, which no file system or S3 key takes).

Registry names (model presets, schedules, parallel strategies, prompt styles, trackers, eval
tasks) are ``Literal`` lists here rather than imports of the registries, which sit above this
package and load torch and Ray; ``tests/test_config.py`` keeps each list equal to its registry.
A problem that is not a type (a URI, a run name, a repeated entry) raises ``problem(text)``,
whose text ``raygpt.config.problems`` shows as it is.
"""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any, Callable, Literal

from pydantic import AfterValidator, BeforeValidator, Field, StringConstraints
from pydantic_core import PydanticCustomError

from raygpt.storage import endpoint_problem, is_http_url, uri_problem, without_userinfo

PresetName = Literal["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl", "nano", "tiny"]
"""``raygpt.model.PRESETS``."""
ScheduleName = Literal["cosine", "linear", "constant", "wsd"]
"""``raygpt.train.schedule.SCHEDULES``."""
StrategyName = Literal["ddp"]
"""``raygpt.train.parallel.STRATEGIES``."""
PromptStyleName = Literal["alpaca"]
"""``raygpt.prompts.PROMPT_STYLES``."""
TrackerName = Literal["tensorboard", "wandb", "mlflow"]
"""``raygpt.train.sinks.TRACKERS``."""
EvalTask = Literal["test_loss", "hellaswag"]
"""``raygpt.evaluate.EVAL_TASKS``."""

INT_LIMIT = 2**63
"""Integer fields fit in 64 bits (what torch, numpy and Ray's resource counts hold)."""

SEED_LIMIT = 2**32
"""Seeds are in 0..2**32-1: numpy's seed sequences take no negative seed, and the samples
during training seed torch (whose seeds end at 2**64) with ``train.seed * 1_000_003 + step``."""


def problem(text: str, *keys: str) -> PydanticCustomError:
    """A validation error whose message is ``text`` as written. ``keys``: the fields of the
    section it concerns, for a check across fields (the message then names them, not the section)."""
    return PydanticCustomError("raygpt", "{problem}", {"problem": text, "keys": keys})


def _checked(problem_of: Callable[[Any], str | None]) -> AfterValidator:
    def check(value: Any) -> Any:
        if found := problem_of(value):
            raise problem(found)
        return value

    return AfterValidator(check)


def shorten(text: str, limit: int = 60) -> str:
    """A value as a message shows it: a pasted file or a long name is cut short."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def describe(value: Any) -> str:
    """A value as an error message shows it, never the whole of a large one."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    if isinstance(value, int) and not isinstance(value, bool):
        return number(value)
    return f"{shorten(repr(value))} ({type(value).__name__})"


def number(value: int | float) -> str:
    """A number as a message shows it: Python will not print an integer of over 4,300 digits."""
    if isinstance(value, int) and value.bit_length() > 200:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    return str(value)


def _whole_number(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and not -INT_LIMIT <= value < INT_LIMIT:
        raise problem(f"{shorten(number(value))} is out of range (integers fit in 64 bits)")
    return value


def _utf8_problem(text: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"{shorten(repr(text))} is not UTF-8 text ({text[e.start]!r} at character {e.start}: "
                "bytes that are not UTF-8 in what was typed)")
    return None


def run_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a run (a folder under ``storage_path`` and Ray Train's key), or
    None. A run name is one folder name, or two joined by '/' (a sweep's runs are
    ``<sweep>/<variant>@<seed>``)."""
    if not name or name in (".", ".."):
        return f"{name!r} is not a run name: give a folder name such as gpt2-small-run1"
    if "\\" in name or name.count("/") > 1:
        return f"{shorten(repr(name))}: a run name is a folder name, or two joined by one '/' (a sweep's run), " \
               "without '\\'"
    for part in name.split("/"):
        if part in ("", ".", ".."):
            return f"{shorten(repr(name))}: {part!r} cannot be part of a run name"
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in name):
        return f"{shorten(repr(name))}: a run name holds no control characters (newline, tab, ...)"
    if any(part != part.strip() for part in name.split("/")):
        return f"{name!r}: a run name neither starts nor ends with a space"
    if len(name.encode()) > 200:
        return f"{name[:40]!r}...: a run name has at most 200 bytes (it is a folder name)"
    return None


def _repeated_problem(values: list) -> str | None:
    seen = set()
    for value in values:
        if value in seen:
            return f"lists {value!r} twice"
        seen.add(value)
    return None


def _worker_count(value: Any) -> Any:
    """``train.num_workers``: n > 0, or [min, max] with 1 <= min <= max."""
    if isinstance(value, list):
        shown = shorten(repr(value)) if len(value) <= 4 else f"a list of {len(value)}"
        if len(value) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) for n in value):
            raise problem(f"expected [min, max] (two numbers), got {shown}")
        if not 1 <= value[0] <= value[1]:
            raise problem(f"[min, max] needs 1 <= min <= max, got {shown}")
        return value
    value = _whole_number(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise problem(f"expected a number or [min, max], got {describe(value)}")
    if value <= 0:
        raise problem(f"must be positive, got {value}")
    return value


_UTF8 = _checked(_utf8_problem)

Int = Annotated[int, BeforeValidator(_whole_number)]
Text = Annotated[str, _UTF8]
"""Any text, the empty string included."""
Name = Annotated[str, StringConstraints(min_length=1), _UTF8]
"""Text that names something: never empty (an empty value is not "unset")."""
StoreUri = Annotated[str, _checked(uri_problem)]
"""A local path or ``s3://bucket/prefix``."""
LocalPath = Annotated[str, _checked(lambda uri: uri_problem(uri, remote=False))]
WebSource = Annotated[str, _checked(lambda uri: uri_problem(uri, web=True))]
"""A local path, ``s3://`` URI or ``http(s)://`` URL to read from."""
ModelRef = StoreUri
"""A run name, a checkpoint or model folder, ``ift:NAME`` or ``openai:NAME``: only a URI is checked."""
Endpoint = Annotated[str, _checked(endpoint_problem)]
HttpUrl = Annotated[str, _checked(lambda url: None if is_http_url(url) else
                                  f"{without_userinfo(url)!r} is not a URL; expected http(s)://host[:port]/path")]
RunName = Annotated[str, _UTF8, _checked(run_name_problem)]
Seed = Annotated[Int, Field(ge=0, lt=SEED_LIMIT)]
WorkerCount = Annotated[int | list[int], BeforeValidator(_worker_count)]
Distinct = _checked(_repeated_problem)
"""For a list whose entries are named once each: ``Annotated[list[X], Distinct]``."""
