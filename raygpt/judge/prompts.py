"""Judge prompt templates: what the judge is asked, and how its reply is read and validated.

Each template is a small named class with a ``version`` string. The version is part of every
cache key and every judgement record, so a cached judgement always knows which wording made
it; change the wording, bump the version.

- ``SinglePrompt``: the book's chapter-7 prompt, one answer per call, a bare 0-100 integer.
  Its variant 1 names the answer before the reference: passes alternate the two, so a
  repeated pass is not the identical prompt again (which a deterministic judge answers
  identically, so the passes would agree perfectly and measure nothing).
- ``ComparativePrompt``: every candidate answer to one item in one call (labelled A, B, C...
  in the order the caller chose), with the reference answer and a rubric, answered as JSON
  ``{"scores": [{"label": "A", "reason": "...", "score": 0-100}, ...]}``. Scoring all
  answers side by side gives them one shared calibration, which separate calls lack.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from raygpt.prompts import AlpacaPrompt

LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class ReplyError(ValueError):
    """The judge's reply cannot be read as the scores it was asked for (it is retried)."""


@dataclass(frozen=True)
class Score:
    score: int
    reason: str = ""


def _as_score(value: Any, where: str) -> int:
    # JSON has one number type: 87.0 is an integer score, 87.5 and "87" are not.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ReplyError(f"{where}: score {value!r} is not an integer")
    if not 0 <= value <= 100:
        raise ReplyError(f"{where}: score {value} is outside 0-100")
    return int(value)


class SinglePrompt:
    """The book's prompt (ch07, ``generate_model_scores``): one answer, a bare integer reply."""

    name = "single"
    version = "book-ch07-v1"
    variants = 2
    """0: the book's wording; 1: the same request with the reference after the answer."""

    def messages(self, item: dict, answers: list[str], variant: int = 0) -> list[dict]:
        (answer,) = answers
        if variant == 0:
            prompt = (
                f"Given the input `{AlpacaPrompt().format_input(item)}` "
                f"and correct output `{item['output']}`, "
                f"score the model response `{answer}`"
                f" on a scale from 0 to 100, where 100 is the best score. "
                f"Respond with the integer number only."
            )
        else:
            prompt = (
                f"Given the input `{AlpacaPrompt().format_input(item)}`, "
                f"score the model response `{answer}` "
                f"against the correct output `{item['output']}`"
                f" on a scale from 0 to 100, where 100 is the best score. "
                f"Respond with the integer number only."
            )
        return [{"role": "user", "content": prompt}]

    def response_format(self, labels: list[str]) -> dict | None:
        return None

    def parse(self, reply: str, labels: list[str]) -> dict[str, Score]:
        """A bare integer as the book expects; also "85/100" or a sentence holding one number,
        which chatty judges send despite the instruction."""
        text = reply.strip().rstrip(".")
        out_of_100 = re.fullmatch(r"(?:score:?\s*)?(\d+)\s*/\s*100", text, re.I)
        numbers = re.findall(r"-?\d+(?:\.\d+)?", text)
        if re.fullmatch(r"-?\d+", text):
            value = int(text)
        elif out_of_100:
            value = int(out_of_100.group(1))
        elif len(numbers) == 1 and re.fullmatch(r"\d+", numbers[0]):
            value = int(numbers[0])
        else:
            raise ReplyError(f"expected one integer 0-100, got {reply[:80]!r}")
        return {labels[0]: Score(_as_score(value, "reply"))}


class ComparativePrompt:
    """All candidates to one item, side by side, with the reference answer and a rubric."""

    name = "comparative"
    version = "comparative-v1"
    variants = 1
    """Passes vary the order of the answers instead."""

    system = (
        "You are an impartial judge of how well AI assistants follow instructions. You see one "
        "instruction (with its input, if any), a reference answer written by an expert, and "
        "several candidate answers labelled with capital letters. Score every candidate from 0 to "
        "100 on the same scale:\n"
        "- 90-100: correct and complete, as good as the reference or better;\n"
        "- 70-89: correct, with minor omissions or flaws;\n"
        "- 40-69: partly correct, or correct but with notable problems;\n"
        "- 10-39: mostly wrong, or barely addresses the instruction;\n"
        "- 0-9: empty, off-topic, or nonsensical.\n"
        "Judge correctness against the reference first, then relevance, completeness and clarity. "
        "Judge each answer on its own merits: the order of the answers, their labels and their "
        "length must not affect the scores. Different answers may receive the same score.\n"
        'Reply with JSON only: {"scores": [{"label": "A", "reason": "<one sentence>", '
        '"score": <integer 0-100>}, ...]}, with exactly one entry for every label.'
    )

    def messages(self, item: dict, answers: list[str], variant: int = 0) -> list[dict]:
        parts = [f"<instruction>\n{item['instruction']}\n</instruction>"]
        if item.get("input"):
            parts.append(f"<input>\n{item['input']}\n</input>")
        parts.append(f"<reference>\n{item['output']}\n</reference>")
        labels = LABELS[: len(answers)]
        for label, answer in zip(labels, answers):
            parts.append(f"<answer {label}>\n{answer}\n</answer {label}>")
        parts.append(f"Score answers {', '.join(labels)}.")
        return [{"role": "system", "content": self.system}, {"role": "user", "content": "\n\n".join(parts)}]

    def response_format(self, labels: list[str]) -> dict | None:
        """The OpenAI structured-output schema; the reply is validated here whether or not the
        endpoint enforced it."""
        entry = {
            "type": "object",
            "properties": {
                "label": {"type": "string", "enum": list(labels)},
                "reason": {"type": "string"},
                "score": {"type": "integer", "description": "0 to 100"},
            },
            "required": ["label", "reason", "score"],
            "additionalProperties": False,
        }
        schema = {
            "type": "object",
            "properties": {"scores": {"type": "array", "items": entry}},
            "required": ["scores"],
            "additionalProperties": False,
        }
        return {"type": "json_schema", "json_schema": {"name": "judge_scores", "strict": True, "schema": schema}}

    def parse(self, reply: str, labels: list[str]) -> dict[str, Score]:
        """Every label exactly once, each with an integer score 0-100."""
        text = reply.strip()
        # Without structured output, models wrap JSON in prose or a ``` fence: take the object.
        start, end = text.find("{"), text.rfind("}")
        if start < 0 or end < start:
            raise ReplyError(f"no JSON object in reply {reply[:80]!r}")
        try:
            data = json.loads(text[start:end + 1])
        except json.JSONDecodeError as e:
            raise ReplyError(f"malformed JSON ({e.msg} at char {e.pos})") from None
        entries = data.get("scores") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise ReplyError('expected {"scores": [...]}')
        scores: dict[str, Score] = {}
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "label" not in entry or "score" not in entry:
                raise ReplyError(f"scores[{i}]: expected an object with label and score")
            label = str(entry["label"]).strip()
            if label not in labels:
                raise ReplyError(f"scores[{i}]: unknown label {label!r} (expected {', '.join(labels)})")
            if label in scores:
                raise ReplyError(f"scores[{i}]: label {label} appears twice")
            scores[label] = Score(_as_score(entry["score"], f"scores[{i}]"), str(entry.get("reason", "")))
        missing = [label for label in labels if label not in scores]
        if missing:
            raise ReplyError(f"no score for label(s) {', '.join(missing)}")
        return scores


TEMPLATES = {"single": SinglePrompt, "comparative": ComparativePrompt}
