"""The answers being judged: one ``AnswerSet`` per model, read from ``raygpt ift``'s answer files.

A model fine-tuned several times (``ift.seeds``) has one answers file per replicate, its id
``<model>@seed<k>`` (``raygpt.stages.replicate_id``): each replicate is judged as a candidate
of its own, and ``replicate_groups`` pools them back into their base model. ``judge.pools``
pools base models further, those that differ only in their pretraining seed, into one scored
entry (``scored_entries``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from raygpt.config import RunSpec
from raygpt.errors import RaygptError
from raygpt.stages import EMPTY_ANCHOR, REFERENCE_ANCHOR, answers_dir, replicate_id, replicate_of
from raygpt.storage import Storage, join

ITEM_FIELDS = ("instruction", "input", "output", "response")
MAX_ITEMS = 10_000
"""Items an answers file may hold (the book's test split has 110, AlpacaEval 805): each is a
judge call per pass and model, so more is a wrong file, not a plan."""


@dataclass
class AnswerSet:
    """One model's answers to the held-out instructions (an answers file of ``raygpt ift``)."""

    model: str
    """The candidate's id: the model's, or a replicate's (``<model>@seed<k>``)."""
    uri: str
    base_model: str | None
    """The base checkpoint's ref, as the answers file names it."""
    dataset: dict
    items: list[dict]
    seed: int | None = None
    """The fine-tuning seed of a replicate; None for a model fine-tuned once."""

    @property
    def group(self) -> str:
        """The base model's id, which the replicates of one model share."""
        return replicate_of(self.model)[0] if self.seed is not None else self.model


def load_answer_sets(spec: RunSpec, storage: Storage) -> list[AnswerSet]:
    """The answers files named in ``judge.answers``, else every ``*.json`` under the IFT output."""
    uris = list(spec.judge.answers)
    if not uris:
        root = answers_dir(spec)
        uris = [join(root, name) for name in storage.list(root) if name.endswith(".json")]
        if not uris:
            raise RaygptError(f"judge: no answers files under {root}: run `raygpt ift` first, "
                              f"or list the files in judge.answers")
    sets = [_read_answer_set(uri, storage) for uri in uris]
    seen: dict[str, str] = {}
    for answers in sets:
        if answers.model in seen:
            raise RaygptError(f"judge: {answers.uri} and {seen[answers.model]} both hold answers of model "
                              f"{answers.model!r}: judge each model once")
        seen[answers.model] = answers.uri
    scored_entries(sets, spec.judge.pools)  # checks the replicates and the pools before any call
    return sets


def replicate_groups(sets: list[AnswerSet]) -> dict[str, list[AnswerSet]]:
    """Base model id -> its answer sets (one, or one per fine-tuning seed, by seed), in the order
    the models first appear."""
    groups: dict[str, list[AnswerSet]] = {}
    for answers in sets:
        groups.setdefault(answers.group, []).append(answers)
    for group, members in groups.items():
        if len(members) > 1 and any(m.seed is None for m in members):
            plain = next(m for m in members if m.seed is None)
            other = next(m for m in members if m.seed is not None)
            raise RaygptError(f"judge: {plain.uri} holds {group!r} fine-tuned once and {other.uri} a replicate "
                              f"of it (seed {other.seed}): judge one or the other (list the files in judge.answers)")
        members.sort(key=lambda m: m.seed)
    return groups


def scored_entries(sets: list[AnswerSet], pools: dict[str, list[str]]) -> dict[str, list[list[AnswerSet]]]:
    """What is scored as one, by name: its base models (one, or a pool's, one per pretraining
    seed, in the order the pool names them), each a list of its answer sets (one per
    fine-tuning seed). A base model in no pool is an entry of its own, under its id; entries
    come in the order their first answers file does. Every problem with ``pools`` is one error."""
    groups = replicate_groups(sets)
    owner: dict[str, str] = {}
    problems = []
    for name, members in pools.items():
        if not members:
            problems.append(f"judge.pools.{name}: names no base model")
        if name.startswith("@"):
            problems.append(f"judge.pools.{name}: a pool's name must not start with '@' (anchors use '@')")
        elif name in groups and name not in members:
            problems.append(f"judge.pools.{name}: {name!r} is also a judged model that the pool does not hold: "
                            f"name the pool differently")
        for member in members:
            if member not in groups:
                known = ", ".join(sorted(groups)[:20])
                problems.append(f"judge.pools.{name}: {member!r} has no answers (judged base models: {known})")
            elif member in owner:
                problems.append(f"judge.pools.{name}: {member!r} is pooled in {owner[member]!r} already")
            else:
                owner[member] = name
    if problems:
        raise RaygptError("judge: " + "; ".join(problems))
    entries: dict[str, list[list[AnswerSet]]] = {}
    for group in groups:
        name = owner.get(group, group)
        if name not in entries:
            entries[name] = [groups[member] for member in pools[name]] if name in pools else [groups[group]]
    return entries


def _read_answer_set(uri: str, storage: Storage) -> AnswerSet:
    data = storage.read_json(uri)
    if not isinstance(data, dict) or not isinstance(data.get("items"), list) or not data["items"]:
        raise RaygptError(f"{uri}: not an answers file (expected an object with a non-empty 'items' list)")
    if len(data["items"]) > MAX_ITEMS:
        raise RaygptError(f"{uri}: {len(data['items']):,} items, more than the {MAX_ITEMS:,} an answers file may hold")
    model = data.get("model") or PurePosixPath(uri).stem
    if not isinstance(model, str) or model.startswith("@"):
        raise RaygptError(f"{uri}: model id {model!r} must be a string not starting with '@' (anchors use '@')")
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RaygptError(f"{uri}: seed {seed!r} must be an integer (the fine-tuning seed of a replicate)")
    _, suffix_seed = replicate_of(model)
    if seed is None:
        seed = suffix_seed
    elif suffix_seed is not None and suffix_seed != seed:
        raise RaygptError(f"{uri}: model id {model!r} names seed {suffix_seed} but the file says seed {seed}")
    elif suffix_seed is None:
        model = replicate_id(model, seed)  # a replicate's id always carries its seed
    items = []
    for index, item in enumerate(data["items"]):
        if not isinstance(item, dict):
            raise RaygptError(f"{uri}: item {index} is not an object")
        item = {"input": "", **item}
        for key in ITEM_FIELDS:
            if not isinstance(item.get(key), str):
                raise RaygptError(f"{uri}: item {index}: field {key!r} is missing or not a string")
        items.append(item)
    return AnswerSet(model, uri, data.get("base_model"), data.get("dataset") or {}, items, seed)


def check_aligned(sets: list[AnswerSet]) -> None:
    """All answers files must hold the same items in the same order with the same instruction,
    input and reference: otherwise the models were not asked the same questions. Names the
    first mismatch."""
    first = sets[0]
    for other in sets[1:]:
        for index in range(max(len(first.items), len(other.items))):
            if index >= len(other.items):
                raise RaygptError(f"answers do not line up: {other.uri} has {len(other.items)} items, {first.uri} "
                                  f"has {len(first.items)}: item {index} ({_item_id(first.items[index], index)}) is missing")
            if index >= len(first.items):
                raise RaygptError(f"answers do not line up: {other.uri} has {len(other.items)} items, {first.uri} "
                                  f"has {len(first.items)}: item {index} ({_item_id(other.items[index], index)}) is extra")
            ours, theirs = first.items[index], other.items[index]
            for key in ("id", "instruction", "input", "output"):
                if ours.get(key) != theirs.get(key):
                    raise RaygptError(
                        f"answers do not line up: {other.uri} item {index}: {key} {_clip(theirs.get(key))} differs "
                        f"from {_clip(ours.get(key))} in {first.uri} (same items, same order and same references "
                        f"are needed: generate all answers from one dataset split)")


def _item_id(item: dict, index: int) -> str:
    return f"id {item['id']}" if "id" in item else f"index {index}"


def _clip(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def candidates_of(sets: list[AnswerSet], anchors: bool) -> list[str]:
    return [s.model for s in sets] + ([REFERENCE_ANCHOR, EMPTY_ANCHOR] if anchors else [])


def answer_of(candidate: str, item_index: int, sets: dict[str, AnswerSet], reference_item: dict) -> str:
    if candidate == REFERENCE_ANCHOR:
        return reference_item["output"]
    if candidate == EMPTY_ANCHOR:
        return ""
    return sets[candidate].items[item_index]["response"]
