"""What to ask the judge: one ``JudgeCall`` per request, planned in a fixed order with its cache keys.

In comparative mode one call shows every candidate's answer to one item (models and the
hidden anchors), in an order shuffled per item and rotated per pass; in single mode one call
per candidate and item. ``run`` makes the calls (or ``batch`` sends them as one batch) and
``summary`` reads the outcomes back by the call's pass, item and order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raygpt.config import RunSpec
from raygpt.errors import RaygptError
from raygpt.judge.answers import AnswerSet, answer_of, candidates_of
from raygpt.judge.client import JudgeCache, sampling_settings
from raygpt.judge.prompts import LABELS, TEMPLATES


@dataclass
class JudgeCall:
    """One request to the judge: which answers, in which order, and its cache key."""

    pass_index: int
    item_index: int
    order: list[str]
    """Candidate ids (models and anchors) in the order shown, labelled A, B, C..."""
    messages: list[dict]
    response_format: dict | None
    seed: int
    key: str
    """The cache key the reply is written under."""
    fallback_key: str | None = None
    """A key an older cache may hold the reply under (the address's), read when ``key`` is absent."""
    variant: int = 0
    """The template's wording for this pass (``SinglePrompt.variants``)."""

    @property
    def labels(self) -> list[str]:
        return list(LABELS[: len(self.order)])


def presentation_orders(candidates: list[str], items: int, passes: int, seed: int) -> list[list[list[str]]]:
    """orders[pass][item]: a random order per item (seeded by seed and item), rotated by one
    place per pass, so that across passes each answer meets other positions (a Latin square
    when passes equals the number of candidates) and position bias averages out."""
    orders: list[list[list[str]]] = [[] for _ in range(passes)]
    for item in range(items):
        base = [candidates[i] for i in np.random.default_rng([seed, item]).permutation(len(candidates))]
        for p in range(passes):
            shift = p % len(base)
            orders[p].append(base[shift:] + base[:shift])
    return orders


def plan_calls(spec: RunSpec, sets: list[AnswerSet], identity: str | None = None) -> list[JudgeCall]:
    """Every judge call of the run, in a fixed order, each with its cache keys: by the judge's
    ``identity`` (falling back to the address's key of older caches), or by the address alone
    when the identity is not known."""
    config = spec.judge
    template = TEMPLATES[config.mode]()
    template_id = f"{template.name}/{template.version}"
    by_model = {s.model: s for s in sets}
    items = sets[0].items
    candidates = candidates_of(sets, config.anchors)
    if config.mode == "comparative" and len(candidates) > len(LABELS):
        raise RaygptError(f"judge: {len(candidates)} candidates per item, at most {len(LABELS)} fit one comparative "
                          f"call: judge fewer models at once or use judge.mode=single")
    calls = []
    orders = presentation_orders(candidates, len(items), config.passes, config.seed)
    for p in range(config.passes):
        seed = config.seed + p
        variant = p % template.variants
        settings = sampling_settings(config, seed)
        for i, item in enumerate(items):
            groups = [orders[p][i]] if config.mode == "comparative" else [[c] for c in candidates]
            for order in groups:
                answers = [answer_of(c, i, by_model, item) for c in order]
                messages = template.messages(item, answers, variant)
                described = (config.model, template_id, messages, settings)
                address_key = JudgeCache.address_key(config.base_url, *described)
                key = JudgeCache.key(identity, *described) if identity else address_key
                calls.append(JudgeCall(p, i, order, messages, template.response_format(list(LABELS[: len(order)])),
                                       seed, key, address_key if identity else None, variant))
    return calls
