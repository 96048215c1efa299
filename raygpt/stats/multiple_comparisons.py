"""Many comparisons at once: Holm's adjustment of their p-values, and the letters that summarise them.

Both are written here: scipy.stats adjusts p-values only for the false discovery rate
(``false_discovery_control``), not Holm's family-wise step-down, and no maintained Python
library computes a compact letter display (R's multcompView does; Piepho's algorithm is short).
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable, Sequence

import numpy as np


def holm_adjust(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment of ``pvalues`` for testing them all at once.

    The k-th smallest of m p-values is multiplied by (m - k + 1), then a running maximum makes
    the adjusted values monotone in the raw ones, capped at 1. It controls the family-wise
    error rate (any false "different" among all pairs) under any dependence between the tests,
    and is never less powerful than Bonferroni. nan entries (tests that could not be made) stay
    nan and do not count in m.
    """
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested], kind="mergesort")]
    m = len(order)
    running = 0.0
    for k, index in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[index]))
        adjusted[index] = running
    return adjusted


def _letters(count: int) -> list[str]:
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    if count > len(alphabet):
        raise ValueError(f"compact_letter_display: {count} letters needed, at most {len(alphabet)} exist")
    return list(alphabet[:count])


def compact_letter_display(order: Sequence[Hashable], not_different: Iterable[tuple[Hashable, Hashable]]) -> dict:
    """Letters for a ranking: two models share a letter if and only if they cannot be told apart.

    ``order`` lists the models best first; ``not_different`` holds the pairs (either way round)
    that are not significantly different; every other pair is. Piepho's (2004) insert-and-absorb
    algorithm: start with one letter shared by all; for each different pair, split every letter
    column holding both into one without the first and one without the second; drop columns
    contained in another (absorb). A sweep then drops a model from a column when every pair
    that column gives it is given by another column, and absorbs again, so no letter is
    redundant. Letters go to columns in the order of their best model, so the best model has
    "a". Deterministic: pairs are processed in ranking order. Returns ``{model: letters}`` in
    ``order``.
    """
    models = list(order)
    rank = {model: k for k, model in enumerate(models)}
    if len(rank) != len(models):
        raise ValueError("compact_letter_display: a model appears twice in order")
    same = {frozenset(pair) for pair in not_different}
    for pair in same:
        if not pair <= rank.keys():
            raise ValueError(f"compact_letter_display: pair {sorted(map(str, pair))} names a model not in order")
    different = [(a, b) for a, b in itertools.combinations(models, 2) if frozenset((a, b)) not in same]

    def absorb(columns: list[frozenset]) -> list[frozenset]:
        unique = list(dict.fromkeys(columns))
        return [c for c in unique if c and not any(c < other for other in unique)]

    columns = [frozenset(models)] if models else []
    for a, b in different:
        split = []
        for column in columns:
            split += [column - {a}, column - {b}] if a in column and b in column else [column]
        columns = absorb(split)
    columns = sorted(columns, key=lambda c: sorted(rank[m] for m in c))
    for k in range(len(columns)):
        for model in sorted(columns[k], key=rank.get):
            others = [c for n, c in enumerate(columns) if n != k]
            if any(model in c for c in others) and all(any({model, partner} <= c for c in others)
                                                       for partner in columns[k] - {model}):
                columns[k] = columns[k] - {model}
    columns = sorted(absorb(columns), key=lambda c: sorted(rank[m] for m in c))
    letters = _letters(len(columns))
    return {model: "".join(letter for letter, column in zip(letters, columns) if model in column) for model in models}
