"""Small, numpy-only statistics for comparing models: ranks, rank correlations, bootstrap intervals.

Used by the judge (confidence intervals over items, agreement between passes, which models
can be told apart, position and length effects) and the report (how well the judge's scores
track test loss, whether a difference survives fine-tuning noise). Undefined results (a
constant input, fewer than two values) are ``nan`` in arrays and ``None`` in the JSON-ready
dicts and dataclasses, never a made-up number. A failed judgement is ``nan`` in the score
arrays and is left out, never averaged in as a zero.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank (scipy's ``rankdata(method="average")``)."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end + 1) / 2
            start = end
    return ranks


def _paired(x, y, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Two equally long float arrays, or a ValueError naming the statistic."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) != len(y):
        raise ValueError(f"{name}: {len(x)} values against {len(y)}")
    return x, y


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: the Pearson correlation of the ranks (ties averaged)."""
    x, y = _paired(x, y, "spearman")
    if len(x) < 2:
        return float("nan")
    rx, ry = rankdata(x) - (len(x) + 1) / 2, rankdata(y) - (len(y) + 1) / 2
    denominator = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b, which corrects for ties (what scipy's ``kendalltau`` returns)."""
    x, y = _paired(x, y, "kendall")
    if len(x) < 2:
        return float("nan")
    i, j = np.triu_indices(len(x), k=1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    concordance = (dx * dy).sum()
    untied_x, untied_y = (dx != 0).sum(), (dy != 0).sum()
    if untied_x == 0 or untied_y == 0:
        return float("nan")
    return float(concordance / np.sqrt(untied_x * untied_y))


def bootstrap_indices(n: int, samples: int, seed: int | Sequence[int]) -> np.ndarray:
    """``samples`` resamples (with replacement) of ``range(n)``, shape (samples, n), seeded.

    ``seed`` may be a sequence (``[seed, k]``) to draw independent streams from one seed.
    """
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap replicates (nans ignored)."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_mean_ci(per_item: np.ndarray, samples: int, seed: int, level: float = 0.95) -> list[tuple[float, float]]:
    """Percentile interval of each column's mean when items (rows) are resampled.

    ``per_item`` is (items, models) with nan where an item has no score for a model. All
    columns share the same resamples (a paired bootstrap), so the intervals of models judged
    on the same items are comparable.
    """
    per_item = np.asarray(per_item, dtype=float)
    if per_item.ndim != 2 or per_item.shape[0] == 0:
        return [(float("nan"), float("nan"))] * (per_item.shape[1] if per_item.ndim == 2 else 0)
    index = bootstrap_indices(per_item.shape[0], samples, seed)
    # One column at a time keeps memory at (samples, items).
    return [percentile_interval(resampled_means(column, index), level) for column in per_item.T]


def resampled_means(scores: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The mean of ``scores[index[s]]`` for each resample ``s`` (nans left out): shape (samples,),
    nan where a resample drew only items without a score."""
    resampled = np.asarray(scores, dtype=float)[index]
    counts = (~np.isnan(resampled)).sum(axis=1)
    sums = np.nansum(resampled, axis=1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _finite(value) -> float | None:
    """A float for JSON, ``None`` where the value is undefined (nan, inf or None)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _interval(low, high) -> list[float | None]:
    return [_finite(low), _finite(high)]


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


@dataclass
class PairedDifference:
    """The mean score difference ``a - b`` over the items both models have a score for."""

    a: str | int
    b: str | int
    mean: float | None
    ci: list[float | None]
    """Paired bootstrap interval of the mean difference at ``level``."""
    p_value: float | None
    """Two-sided bootstrap p-value of "no difference", before adjustment."""
    p_holm: float | None
    """Holm-adjusted across all pairs of the comparison."""
    different: bool
    """``p_holm < 1 - level``: the two models can be told apart."""
    items: int
    """Items with a score for both models."""


def paired_differences(per_item: np.ndarray, samples: int, seed: int, level: float = 0.95,
                       names: Sequence[str] | None = None) -> list[PairedDifference]:
    """Every pair of models (columns ``i < j`` of ``per_item``, (items, models), nan where an
    item has no score): the mean of ``score_i - score_j`` over the items both have, its paired
    bootstrap interval and a Holm-adjusted p-value.

    Paired: each resample draws item indices once and uses them for every model (and every
    pair), so the variation of item difficulty, which both models share, cancels in the
    difference instead of swamping it. The p-value is two-sided from the same resamples,
    ``2 * min(share of differences <= 0, share >= 0)`` with the +1 correction of
    ``(count + 1) / (samples + 1)``: the smallest error level at which the percentile interval
    would leave out 0. Its resolution is ``2 / (samples + 1)``, so with m pairs Holm needs
    ``samples >= 2 * m / (1 - level)`` for the closest pair to be able to come out different.
    ``a``/``b`` are ``names[i]``/``names[j]`` if given, else the column indices.
    """
    per_item = np.asarray(per_item, dtype=float)
    if per_item.ndim != 2:
        raise ValueError(f"paired_differences: per_item must be (items, models), got shape {per_item.shape}")
    n_items, n_models = per_item.shape
    labels = list(names) if names is not None else list(range(n_models))
    if len(labels) != n_models:
        raise ValueError(f"paired_differences: {len(labels)} names for {n_models} models")
    index = bootstrap_indices(n_items, samples, seed) if n_items else np.zeros((samples, 0), dtype=int)
    rows = []
    for i, j in itertools.combinations(range(n_models), 2):
        difference = per_item[:, i] - per_item[:, j]
        both = int((~np.isnan(difference)).sum())
        mean = float(np.nanmean(difference)) if both else math.nan
        low = high = p_value = math.nan
        if both >= 2:
            replicates = resampled_means(difference, index)
            replicates = replicates[~np.isnan(replicates)]
            low, high = percentile_interval(replicates, level)
            count = len(replicates)
            below, above = (replicates <= 0).sum(), (replicates >= 0).sum()
            p_value = min(1.0, 2 * min((below + 1) / (count + 1), (above + 1) / (count + 1)))
        rows.append((labels[i], labels[j], mean, low, high, p_value, both))
    adjusted = holm_adjust([row[5] for row in rows])
    return [PairedDifference(a, b, _finite(mean), _interval(low, high), _finite(p), _finite(p_holm),
                             bool(p_holm < 1 - level), both)
            for (a, b, mean, low, high, p, both), p_holm in zip(rows, adjusted)]


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


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b): the F and t distributions' CDFs."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _gammainc(a: float, x: float) -> float:
    """The regularized lower incomplete gamma function P(a, x): the chi-square CDF."""
    if x <= 0.0:
        return 0.0
    front = math.exp(-x + a * math.log(x) - math.lgamma(a))
    if x < a + 1:
        term = total = 1.0 / a
        for n in range(1, 100_000):
            term *= x / (a + n)
            total += term
            if abs(term) < abs(total) * 1e-16:
                break
        return front * total
    tiny = 1e-300
    b = x + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for n in range(1, 100_000):
        numerator = -n * (n - a)
        b += 2.0
        d = numerator * d + b
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = b + numerator / c
        c = c if abs(c) > tiny else tiny
        h *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return 1.0 - front * h


def _bisect(cdf, q: float) -> float:
    """The x in (0, 1) where the increasing ``cdf`` reaches q."""
    low, high = 0.0, 1.0
    for _ in range(200):
        middle = (low + high) / 2
        if cdf(middle) < q:
            low = middle
        else:
            high = middle
        if high - low < 1e-16:
            break
    return (low + high) / 2


def f_quantile(q: float, df1: float, df2: float = math.inf) -> float:
    """The q-quantile of the F(df1, df2) distribution; ``df2 = inf`` gives chi-square(df1) / df1.

    numpy has no distribution quantiles and raygpt takes no scipy, so the F CDF is the
    regularized incomplete beta function (chi-square: the incomplete gamma), inverted by
    bisection; it matches printed tables to their last digit, and takes the non-integer degrees
    of freedom Satterthwaite's approximation gives.
    """
    if math.isinf(df2):
        # chi-square quantile x = 2 y; search y = t / (1 - t) over t in (0, 1).
        t = _bisect(lambda t: _gammainc(df1 / 2, t / (1 - t)) if t < 1 else 1.0, q)
        return 2 * t / (1 - t) / df1
    x = _bisect(lambda x: _betainc(df1 / 2, df2 / 2, x), q)
    return df2 * x / (df1 * (1 - x)) if x < 1 else math.inf


def t_quantile(q: float, df: float) -> float:
    """The q-quantile of Student's t with ``df`` degrees of freedom (t^2 is F(1, df))."""
    if q == 0.5:
        return 0.0
    magnitude = math.sqrt(f_quantile(abs(2 * q - 1), 1.0, df))
    return magnitude if q > 0.5 else -magnitude


def t_cdf(x: float, df: float) -> float:
    """P(T <= x) for Student's t with ``df`` degrees of freedom; ``df = inf`` is the normal."""
    if math.isinf(df):
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + x * x))
    return 1 - tail if x > 0 else tail


def _t_interval(center: float, terms: list[tuple[float, float]], level: float) -> dict:
    """``center +- t * se`` where the variance ``se^2`` is a sum of scaled mean squares, given as
    (c * MS, df) pairs, and t has Satterthwaite's (1946) degrees of freedom for such a sum,
    ``(sum c MS)^2 / sum((c MS)^2 / df)``. A zero variance gives a zero-width interval."""
    variance = sum(value for value, _ in terms)
    spread = sum(value ** 2 / df for value, df in terms if df > 0)
    if not variance > 0:
        return {"ci": _interval(center, center), "se": 0.0, "df": None}
    df = variance ** 2 / spread if spread > 0 else math.inf
    half = t_quantile(1 - (1 - level) / 2, df) * math.sqrt(variance)
    return {"ci": _interval(center - half, center + half), "se": _finite(math.sqrt(variance)), "df": _finite(df)}


@dataclass
class _CellAnova:
    """Mean squares of one base model's scores: seeds crossed with items, passes within cells.

    Computed on the cell means (the mean over passes for each seed and item), the "unweighted
    means" analysis, so missing passes (failed judgements) unbalance nothing but the count.
    Items without a score for every seed are left out (``items_dropped``).
    """

    cell_means: np.ndarray
    """(seeds, items kept)."""
    items_dropped: int
    passes_harmonic: float
    """Harmonic mean of the passes per cell: the cell mean's pass noise is ``ms_pass / this``."""
    ms_seed: float
    ms_item: float
    ms_interaction: float
    ms_pass: float
    df_pass: float

    @property
    def seeds(self) -> int:
        return self.cell_means.shape[0]

    @property
    def items(self) -> int:
        return self.cell_means.shape[1]

    @staticmethod
    def of(scores: np.ndarray, keep: np.ndarray | None = None) -> _CellAnova:
        scores = np.asarray(scores, dtype=float)
        if scores.ndim != 3:
            raise ValueError(f"variance components: scores must be (seeds, passes, items), got shape {scores.shape}")
        counts = (~np.isnan(scores)).sum(axis=1)  # (seeds, items)
        complete = (counts > 0).all(axis=0) if keep is None else keep
        kept, n = scores[:, :, complete], counts[:, complete]
        with np.errstate(invalid="ignore", divide="ignore"):
            cells = np.nansum(kept, axis=1) / n
        within = np.nansum((kept - cells[:, None]) ** 2)
        df_pass = float((n - 1).sum())
        seeds, items = cells.shape
        ms = {"ms_seed": math.nan, "ms_item": math.nan, "ms_interaction": math.nan}
        if items:
            grand = cells.mean()
            seed_means, item_means = cells.mean(axis=1), cells.mean(axis=0)
            if seeds > 1:
                ms["ms_seed"] = items * ((seed_means - grand) ** 2).sum() / (seeds - 1)
            if items > 1:
                ms["ms_item"] = seeds * ((item_means - grand) ** 2).sum() / (items - 1)
            if seeds > 1 and items > 1:
                interaction = cells - seed_means[:, None] - item_means[None] + grand
                ms["ms_interaction"] = (interaction ** 2).sum() / ((seeds - 1) * (items - 1))
        return _CellAnova(cells, int((~complete).sum()), float(n.size / (1 / n).sum()) if n.size else math.nan,
                          ms_pass=within / df_pass if df_pass > 0 else math.nan, df_pass=df_pass, **ms)

    @property
    def seed_term(self) -> float:
        """The seed variance's share of the variance of the mean, ``sigma_seed^2 / seeds``,
        clipped at 0; nan with one seed."""
        if self.seeds < 2 or self.items < 2:
            return math.nan
        return max(0.0, (self.ms_seed - self.ms_interaction) / (self.items * self.seeds))

    def seed_terms(self) -> list[tuple[float, float]]:
        """``seed_term`` as (c * MS, df) pairs for Satterthwaite; none where it is clipped to 0."""
        if not self.seed_term > 0:
            return []
        scale = self.items * self.seeds
        return [(self.ms_seed / scale, self.seeds - 1),
                (-self.ms_interaction / scale, (self.seeds - 1) * (self.items - 1))]


def _component(top: float, df_top: float, reference: float, df_reference: float, scale: float,
               level: float) -> dict:
    """A variance component ``(E[top] - E[reference]) / scale`` by the method of moments, clipped
    at 0, with an interval from the F distribution of ``top / reference``: the bounds are
    ``(top / F_q - reference) / scale`` for the two tail quantiles of F(df_top, df_reference),
    clipped at 0 (exact when the reference is known, and close when it has many degrees of
    freedom, as the interaction and pass mean squares do). ``reference = 0`` with
    ``df_reference = inf`` gives the chi-square interval of a mean square alone."""
    if not (math.isfinite(top) and math.isfinite(reference)) or df_top <= 0:
        return {"variance": None, "sd": None, "ci_variance": [None, None], "ci_sd": [None, None]}
    tail = (1 - level) / 2
    estimate = max(0.0, (top - reference) / scale)
    high, low = (max(0.0, (top / f_quantile(q, df_top, df_reference) - reference) / scale) for q in (tail, 1 - tail))
    return {"variance": _finite(estimate), "sd": _finite(math.sqrt(estimate)), "ci_variance": _interval(low, high),
            "ci_sd": _interval(math.sqrt(low), math.sqrt(high))}


def variance_components(scores: np.ndarray, level: float = 0.95) -> dict:
    """Where the noise in one base model's judged score comes from.

    ``scores`` is (seeds, passes, items): the judge's score of the answer of the model
    fine-tuned with seed s to item i, in pass p; nan where a judgement failed. The model is

        score[s, p, i] = mean + item[i] + seed[s] + seed_item[s, i] + pass[s, p, i]

    with independent random effects: how hard the item is; how good this fine-tuning run came
    out overall; how this run happened to answer this item; the judge's pass-to-pass noise on
    the same answer. Items are crossed with seeds (every run answers every item); passes sit
    within a (seed, item) cell. Each variance is estimated by the method of moments (ANOVA:
    a difference of mean squares, scaled; Searle, Casella & McCulloch 1992), clipped at 0, with
    the F-ratio interval of ``_component``. Missing passes are handled by computing the
    ANOVA on cell means with the harmonic mean of passes per cell ("unweighted means"); an item
    that some seed has no score for in any pass is dropped and counted. In comparative mode a
    call shared by several seeds' answers can move them together; that shows as pass noise
    here and makes the seed-by-item variance read a little low.

    With one seed the seed and seed-by-item variances cannot be estimated: they are None, and
    the item component then also holds the seed-by-item part. With one pass the pass and
    seed-by-item variances cannot be separated: both are None (their sum is still in the
    variance of the mean). ``notes`` says so in words. ``mean`` is ``mean_ci(scores, level)``.
    """
    anova = _CellAnova.of(scores)
    seeds, items = anova.seeds, anova.items
    h = anova.passes_harmonic
    pass_noise = anova.ms_pass / h if anova.df_pass > 0 else 0.0  # the pass noise in a cell mean
    df_pass_noise = anova.df_pass if anova.df_pass > 0 else math.inf
    none = _component(math.nan, 0, math.nan, 0, 1, level)
    notes = []
    if items < 2:
        components = {"item": none, "seed": none, "seed_item": none, "pass": none}
        notes.append(f"{items} item(s) with a score for every seed: nothing can be estimated")
    elif seeds >= 2:
        df_interaction = (seeds - 1) * (items - 1)
        components = {
            "item": _component(anova.ms_item, items - 1, anova.ms_interaction, df_interaction, seeds, level),
            "seed": _component(anova.ms_seed, seeds - 1, anova.ms_interaction, df_interaction, items, level),
            "seed_item": (_component(anova.ms_interaction, df_interaction, pass_noise, df_pass_noise, 1, level)
                          if anova.df_pass > 0 else none),
        }
    else:
        components = {"item": _component(anova.ms_item, items - 1, pass_noise, df_pass_noise, 1, level),
                      "seed": none, "seed_item": none}
        notes.append("one fine-tuning seed: the seed variance cannot be estimated (the interval of the mean "
                     "leaves it out) and the item variance includes how this one run answered each item")
    if items >= 2:
        components["pass"] = _component(anova.ms_pass, anova.df_pass, 0.0, math.inf, 1, level)
    if anova.df_pass == 0 and items >= 2:
        notes.append("one judge pass per answer: the judge's pass noise and the seed-by-item variance cannot "
                     "be told apart (both None; together they are in the variance of the mean)")
    if anova.items_dropped:
        notes.append(f"{anova.items_dropped} item(s) left out: no score for some seed")
    return {"seeds": seeds, "passes_per_cell": _finite(h), "items": items, "items_dropped": anova.items_dropped,
            "components": components, "mean": mean_ci(scores, level, _anova=anova), "notes": notes}


def mean_ci(scores: np.ndarray, level: float = 0.95, _anova: _CellAnova | None = None) -> dict:
    """One base model's mean score over seeds, items and passes, with an interval that includes
    the fine-tuning seed variance.

    ``scores`` is (seeds, passes, items), nan where a judgement failed; the mean is the mean of
    the (seed, item) cell means over the items scored for every seed. Its variance, with items,
    seeds and passes all random, is ``sigma_item^2 / I + sigma_seed^2 / S + (sigma_seed_item^2
    + sigma_pass^2 / P) / (S I)``, which in mean squares is ``(MS_item + max(0, MS_seed -
    MS_interaction)) / (S I)``; the interval is ``mean +- t * se`` with Satterthwaite's degrees
    of freedom.

    Analytic rather than a two-stage bootstrap (resample seeds, then items) on purpose: with
    the usual 3 to 5 seeds a bootstrap over seeds has only a handful of distinct resamples and
    shrinks the seed variance by (S - 1) / S, so its interval is too narrow exactly when the
    seeds matter, while the t quantile on few degrees of freedom (4.3 for 2) widens it as it
    should. With one seed it is the usual t interval over items, and ``includes_seed_variance``
    is False.
    """
    anova = _anova or _CellAnova.of(scores)
    seeds, items = anova.seeds, anova.items
    result = {"mean": None, "ci": [None, None], "se": None, "df": None, "seeds": seeds, "items": items,
              "includes_seed_variance": seeds >= 2}
    if items == 0:
        return result
    mean = float(anova.cell_means.mean())
    result["mean"] = _finite(mean)
    if items < 2:
        return result
    result.update(_t_interval(mean, [(anova.ms_item / (seeds * items), items - 1), *anova.seed_terms()], level))
    return result


def paired_seed_robust(scores_a: np.ndarray, scores_b: np.ndarray, level: float = 0.95,
                       names: tuple[str, str] = ("a", "b")) -> dict:
    """Whether base model a's lead over b survives fine-tuning noise.

    ``scores_a``/``scores_b`` are (seeds, passes, items) on the same items (seeds and passes may
    differ in number), nan where a judgement failed. The difference of the two ``mean_ci``
    means over the items both have a score for from every seed; its variance is

        var(d_i) / I + sigma_seed_a^2 / S_a + sigma_seed_b^2 / S_b

    where ``d_i`` is item i's a-minus-b difference of seed-averaged scores: paired over items
    (an item's difficulty cancels), with each model's own fine-tuning seed variance added
    (runs of different base models share no seed effect). The interval is t with Satterthwaite's
    degrees of freedom, as in ``mean_ci``. ``survives`` is True when the interval leaves out 0,
    False when it holds 0, and None when a model has one seed (its seed variance is unknown
    and left out of the interval). ``p_value`` is the two-sided t test of "no difference" on the
    same variance and degrees of freedom (before any adjustment for several pairs). ``sentence``
    says it in one line for the report.
    """
    scores_a, scores_b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    if scores_a.ndim != 3 or scores_b.ndim != 3 or scores_a.shape[2] != scores_b.shape[2]:
        raise ValueError(f"paired_seed_robust: (seeds, passes, items) arrays on the same items needed, got shapes "
                         f"{scores_a.shape} and {scores_b.shape}")
    keep = ((~np.isnan(scores_a)).any(axis=1).all(axis=0)) & ((~np.isnan(scores_b)).any(axis=1).all(axis=0))
    a, b = _CellAnova.of(scores_a, keep), _CellAnova.of(scores_b, keep)
    items = int(keep.sum())
    result = {"a": names[0], "b": names[1], "difference": None, "ci": [None, None], "se": None, "df": None,
              "p_value": None, "items": items, "seeds": [a.seeds, b.seeds], "survives": None, "sentence": ""}
    single = [name for name, anova in zip(names, (a, b)) if anova.seeds < 2]
    if items < 2:
        result["sentence"] = f"{names[0]} vs {names[1]}: cannot tell, {items} item(s) scored for both"
        return result
    per_item = a.cell_means.mean(axis=0) - b.cell_means.mean(axis=0)
    difference = float(per_item.mean())
    interval = _t_interval(difference, [(per_item.var(ddof=1) / items, items - 1), *a.seed_terms(),
                                        *b.seed_terms()], level)
    result.update(difference=_finite(difference), **interval)
    if interval["se"]:
        df = interval["df"] if interval["df"] is not None else math.inf
        result["p_value"] = _finite(min(1.0, 2 * (1 - t_cdf(abs(difference) / interval["se"], df))))
    else:
        result["p_value"] = 0.0 if difference else 1.0
    low, high = interval["ci"]
    seeds = f"{a.seeds} and {b.seeds} fine-tuning seeds" if a.seeds != b.seeds else f"{a.seeds} fine-tuning seeds each"
    head = (f"{names[0]} - {names[1]}: {difference:+.1f} points ({round(level * 100)}% CI {low:+.1f} to "
            f"{high:+.1f}")
    if single:
        result["sentence"] = (f"{head}, without the seed variance of {' and '.join(single)}): cannot tell whether "
                              f"it survives fine-tuning noise, {' and '.join(single)} fine-tuned with one seed")
    else:
        result["survives"] = bool(low > 0 or high < 0)
        verdict = ("survives fine-tuning noise" if result["survives"]
                   else "does not survive fine-tuning noise (the interval holds 0)")
        result["sentence"] = f"{head}, with {seeds}): the difference {verdict}"
    return result


def spearman_interval(losses: Sequence[float], scores: Sequence[np.ndarray], samples: int, seed: int,
                      level: float = 0.95) -> dict:
    """Spearman's rho between test loss and judged score across models, with an interval that
    resamples both the items and each model's fine-tuning seeds.

    ``losses[k]`` is model k's test loss (taken as exact: a test set of many tokens measures it
    far more precisely than the judge measures the score); ``scores[k]`` is (seeds, items) or
    (items,) of per-item scores (mean over passes), nan where none, the same items for every
    model. A model's score is the mean over its seeds of each seed's mean over items. Each
    bootstrap replicate draws items once for all models (they answered the same questions) and,
    for each model apart, its seeds with replacement. With few seeds the seed resampling is a
    little narrow ((S - 1) / S of the seed variance) and resampling both levels counts the
    seed-by-item noise twice (a little wide); for a rank correlation no analytic interval does
    better. Replicates in which a model has no score, or the scores tie so rho is undefined,
    are left out. Negative rho: lower loss, higher score.
    """
    losses = np.asarray(losses, dtype=float)
    arrays = [np.atleast_2d(np.asarray(s, dtype=float)) for s in scores]
    if len(arrays) != len(losses):
        raise ValueError(f"spearman_interval: {len(losses)} losses for {len(arrays)} models")
    if len({a.shape[1] for a in arrays}) > 1:
        raise ValueError(f"spearman_interval: models scored on different numbers of items "
                         f"{sorted({a.shape[1] for a in arrays})}")
    n_items = arrays[0].shape[1] if arrays else 0
    seeds = [a.shape[0] for a in arrays]
    result = {"spearman": None, "ci": [None, None], "models": len(arrays), "items": n_items, "seeds": seeds,
              "resampled": "items and seeds" if max(seeds, default=1) > 1 else "items",
              "bootstrap_samples": samples, "seed": seed}
    if len(arrays) < 2 or n_items == 0:
        return result
    item_index = bootstrap_indices(n_items, samples, seed)
    replicated = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the mean of no scores is nan, as intended
        means = np.array([np.nanmean(np.nanmean(a, axis=1)) for a in arrays])
        for k, a in enumerate(arrays):
            per_seed = np.array([resampled_means(row, item_index) for row in a])  # (seeds, samples)
            picks = bootstrap_indices(a.shape[0], samples, [seed, k + 1])  # (samples, seeds)
            replicated.append(np.nanmean(per_seed[picks, np.arange(samples)[:, None]], axis=1))
    replicated = np.array(replicated)  # (models, samples)
    rho = spearman(losses, means) if not np.isnan(means).any() else math.nan
    rhos = np.array([spearman(losses, column) for column in replicated.T if not np.isnan(column).any()])
    result.update(spearman=_finite(rho), ci=_interval(*percentile_interval(rhos, level)))
    return result


def describe_agreement(rho: float | None, ci: Sequence[float | None], level: float = 0.95) -> str:
    """One plain sentence on whether test loss and the judged score agree.

    Agreement means lower loss goes with higher score, a negative Spearman(loss, score): "agree"
    when the whole interval is below 0, "disagree" when it is all above, and "cannot tell at
    this sample size" when it holds 0 or is undefined.
    """
    low, high = (None, None) if ci is None else ci
    if rho is None or low is None or high is None or not all(map(math.isfinite, (rho, low, high))):
        return "test loss and IFT score: cannot tell at this sample size (too few models or scores)"
    numbers = f"Spearman {rho:.2f}, {round(level * 100)}% CI {low:.2f} to {high:.2f}"
    if high < 0:
        return f"test loss and IFT score agree (lower loss, higher score): {numbers}"
    if low > 0:
        return f"test loss and IFT score disagree (lower loss, lower score): {numbers}"
    return f"test loss and IFT score: cannot tell at this sample size ({numbers})"


def length_controlled(scores: np.ndarray, lengths: np.ndarray, reference_scores: np.ndarray | None = None,
                      reference_lengths: np.ndarray | None = None, names: Sequence[str] | None = None) -> dict:
    """Each model's score with its answers' length taken out, beside the raw score.

    ``scores`` and ``lengths`` are (items, models) (lengths in any unit: characters, tokens),
    nan where missing. As AlpacaEval 2 does for its win rate (Dubois et al. 2024), each answer
    is compared with a reference answer to the same item, the reference anchor's if
    ``reference_scores``/``reference_lengths`` (items,) are given, else the mean over models.
    The model, fitted by least squares over every (item, model) with both values:

        score[i, m] - reference_score[i] = theta[m] + beta * (length[i, m] - reference_length[i]) + noise

    with one length coefficient ``beta`` (score points per unit of length) shared by all models
    and an intercept per model. With the intercepts in, beta is learnt from how each model's
    score moves with its own answers' lengths across items (the pooled within-model slope),
    not from the fact that better models may also write longer answers. The length-controlled
    score is the predicted score at zero length difference, ``mean(reference_score) +
    theta[m]``, i.e. the raw score minus ``beta`` times the model's mean length difference.
    Unlike AlpacaEval (a logistic model of preferences with a tanh-squashed length term) this
    is linear, since judge scores are points, not preferences. ``raw`` is the mean over the
    same cells. beta is None when lengths do not vary within any model.
    """
    scores, lengths = np.asarray(scores, dtype=float), np.asarray(lengths, dtype=float)
    if scores.ndim != 2 or scores.shape != lengths.shape:
        raise ValueError(f"length_controlled: scores {scores.shape} and lengths {lengths.shape} must be the same "
                         f"(items, models) shape")
    n_models = scores.shape[1]
    labels = list(names) if names is not None else list(range(n_models))
    given = reference_scores is not None
    if given != (reference_lengths is not None):
        raise ValueError("length_controlled: give both reference_scores and reference_lengths, or neither")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an item no model has both values for: nan
        if given:
            ref_score, ref_length = np.asarray(reference_scores, dtype=float), np.asarray(reference_lengths, dtype=float)
        else:
            both = ~np.isnan(scores) & ~np.isnan(lengths)
            ref_score = np.nanmean(np.where(both, scores, np.nan), axis=1)
            ref_length = np.nanmean(np.where(both, lengths, np.nan), axis=1)
    d_score, d_length = scores - ref_score[:, None], lengths - ref_length[:, None]
    used = ~np.isnan(d_score) & ~np.isnan(d_length)
    count = used.sum(axis=0)
    safe = np.maximum(count, 1)
    mean_ds = np.where(used, d_score, 0).sum(axis=0) / safe
    mean_dl = np.where(used, d_length, 0).sum(axis=0) / safe
    centred_l = np.where(used, d_length - mean_dl, 0)
    centred_s = np.where(used, d_score - mean_ds, 0)
    spread = (centred_l ** 2).sum()
    beta = float((centred_l * centred_s).sum() / spread) if spread > 0 else math.nan
    models = []
    for m in range(n_models):
        cells = used[:, m]
        raw = scores[cells, m].mean() if count[m] else math.nan
        models.append({"model": labels[m], "raw": _finite(raw),
                       "length_controlled": _finite(raw - beta * mean_dl[m]) if count[m] else None,
                       "mean_length": _finite(lengths[cells, m].mean()) if count[m] else None,
                       "mean_length_difference": _finite(mean_dl[m]) if count[m] else None,
                       "items": int(count[m])})
    return {"length_coefficient": _finite(beta), "reference": "given" if given else "mean over models",
            "models": models}


def _position_statistics(scores: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Per-item sufficient statistics of the position-effect fit (see ``position_bias``).

    scores (passes, items, models) with nan where missing; slots the same shape, int position
    or -1. Returns ``(gram, moment, within)``: gram (items, K, K) and moment (items, K), whose
    sums over items give the normal equations ``gram @ effect = moment``, and whether the fit is
    the within-answer one (some answer seen in two passes) or, with one pass, raw means.
    """
    n_positions = int(slots.max()) + 1
    observed = ~np.isnan(scores) & (slots >= 0)
    onehot = (slots[..., None] == np.arange(n_positions)) & observed[..., None]  # (P, I, M, K)
    counts = onehot.sum(axis=0).astype(float)  # (I, M, K): each answer's passes per position
    per_answer = observed.sum(axis=0)  # (I, M)
    within = bool((per_answer >= 2).any())
    y = np.where(observed, scores, 0.0)
    if within:
        # Take each answer's own mean out, so quality (item x model) cannot masquerade as position.
        answer_mean = y.sum(axis=0) / np.maximum(per_answer, 1)
        residual = np.where(observed, y - answer_mean[None], 0.0)
        moment = np.einsum("pim,pimk->ik", residual, onehot)
        gram = (np.einsum("imk,kl->ikl", counts, np.eye(n_positions))
                - np.einsum("imk,iml->ikl", counts / np.maximum(per_answer, 1)[..., None], counts))
    else:
        # One pass: orders are random, so the mean at a position minus the overall mean is unbiased.
        moment = np.einsum("pim,pimk->ik", y, onehot)
        gram = counts.sum(axis=1)  # (I, K): observations per position, a diagonal
    return gram, moment, within


def _position_effects(gram: np.ndarray, moment: np.ndarray, within: bool) -> np.ndarray:
    """Solve summed statistics for the position effects, centred on the average position.

    gram (..., K, K) or (..., K) (raw means), moment (..., K); effects (..., K), nan where a
    position has no observation."""
    if within:
        effects = np.einsum("...kl,...l->...k", np.linalg.pinv(gram), moment)
        seen = np.einsum("...kk->...k", gram) > 0
    else:
        seen = gram > 0
        means = moment / np.where(seen, gram, 1)
        overall = moment.sum(axis=-1, keepdims=True) / np.maximum(gram.sum(axis=-1, keepdims=True), 1)
        effects = means - overall
    effects = np.where(seen, effects, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return effects - np.nanmean(effects, axis=-1, keepdims=True)


def _range(effects: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmax(effects, axis=-1) - np.nanmin(effects, axis=-1)


def _position_null(y: np.ndarray, slots: np.ndarray, gram: np.ndarray, within: bool, samples: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Position effects (samples, K) fitted after a shuffle that leaves no position effect.

    Within answers: each answer's observed scores are dealt to its observed passes in a random
    order (its positions, and so ``gram``, stay as they were). One pass: each item's positions
    are dealt among its models at random.
    """
    observed = ~np.isnan(y) & (slots >= 0)
    n_positions = gram.shape[-1]
    if within:
        passes = np.arange(y.shape[0])[:, None, None]
        # Observed passes first, in their own order (targets) and in a random one (sources).
        targets = np.argsort(np.where(observed, passes, np.inf), axis=0, kind="stable")
        sources = np.argsort(np.where(observed, rng.random((samples,) + y.shape), np.inf), axis=1)
        shuffled = np.empty((samples,) + y.shape)
        np.put_along_axis(shuffled, np.broadcast_to(targets, shuffled.shape),
                          np.take_along_axis(np.broadcast_to(y, shuffled.shape), sources, axis=1), axis=1)
        per_answer = observed.sum(axis=0)
        answer_mean = np.where(observed, y, 0.0).sum(axis=0) / np.maximum(per_answer, 1)
        residual = np.where(observed, shuffled - answer_mean, 0.0)
        onehot = ((slots[..., None] == np.arange(n_positions)) & observed[..., None]).astype(float)
        moments = residual.reshape(samples, -1) @ onehot.reshape(-1, n_positions)
        return _position_effects(np.broadcast_to(gram, (samples,) + gram.shape), moments, within)
    keys = np.where(slots >= 0, rng.random((samples,) + slots.shape), np.inf)
    dealt = np.take_along_axis(np.broadcast_to(slots, keys.shape), np.argsort(keys, axis=-1), axis=-1)
    onehot = (dealt[..., None] == np.arange(n_positions)) & ~np.isnan(y)[..., None]  # (samples, P, I, M, K)
    moments = np.einsum("pim,spimk->sk", np.where(np.isnan(y), 0.0, y), onehot.astype(float))
    return _position_effects(onehot.sum(axis=(1, 2, 3)).astype(float), moments, within)


def position_bias(scores: np.ndarray, positions: np.ndarray, candidates_mask: Sequence[bool], samples: int,
                  seed: int, level: float = 0.95) -> dict:
    """How much the position an answer is shown in moves its score, from the models' answers only.

    ``scores`` and ``positions`` are (passes, items, candidates): the score and the 0-based
    place in the presented order, nan where missing; ``candidates_mask`` is True for models
    and False for the anchors, which are left out: the reference and the empty answer sit at
    the ceiling and the floor of the scale, where a bonus cannot show, so with them in the
    estimate reads low. The fit is ``score = quality(item, model) + effect(position)`` by least
    squares, effects centred on the average position: with the answer's quality taken out
    (each answer is seen in several positions over the passes, the orders being rotated), only
    how its score moves with its position is left. With one pass, the mean score at a position
    minus the overall mean (orders are random, so that is unbiased, if noisier).

    ``range`` (most minus least favoured position) is never negative, so it is read against
    ``noise_floor``: the median range when scores are shuffled among the passes of each answer
    (with one pass: positions among the models of each item), which keeps the presentation
    design and removes any position effect; ``null_95`` is that null's 95th percentile and
    ``p_value`` the share of it at least as large as the observed range (+1 corrected).
    Intervals (per position and of the range) resample items. Positions are reported as
    0-based indices.
    """
    scores, positions = np.asarray(scores, dtype=float), np.asarray(positions, dtype=float)
    mask = np.asarray(candidates_mask, dtype=bool)
    if scores.ndim != 3 or scores.shape != positions.shape or mask.shape != (scores.shape[2],):
        raise ValueError(f"position_bias: scores {scores.shape} and positions {positions.shape} must be (passes, "
                         f"items, candidates) with one mask entry per candidate ({mask.shape})")
    y, slots = scores[:, :, mask], np.where(np.isnan(positions), -1, positions).astype(int)[:, :, mask]
    _, n_items, n_models = y.shape
    if n_items == 0 or n_models == 0 or slots.max() < 0:
        return {"by_position": [], "range": None, "range_ci": [None, None], "noise_floor": None, "null_95": None,
                "p_value": None, "models": int(n_models), "method": None}
    gram, moment, within = _position_statistics(y, slots)
    effects = _position_effects(gram.sum(axis=0), moment.sum(axis=0), within)
    observed_range = float(_range(effects))

    index = bootstrap_indices(n_items, samples, seed)
    weights = np.zeros((samples, n_items))
    np.add.at(weights, (np.arange(samples)[:, None], index), 1.0)  # how often each item is drawn
    resampled = _position_effects(np.tensordot(weights, gram, axes=1), weights @ moment, within)  # (samples, K)
    ranges = _range(resampled)
    rng = np.random.default_rng([seed, 1])
    block = 100  # shuffles at a time: memory stays at 100 copies of the scores
    null_effects = np.concatenate([_position_null(y, slots, gram.sum(axis=0), within, min(block, samples - start), rng)
                                   for start in range(0, samples, block)])
    null_ranges = _range(null_effects)
    null_ranges = null_ranges[~np.isnan(null_ranges)]
    rows = []
    for k in range(len(effects)):
        n = int(((slots == k) & ~np.isnan(y)).sum())
        rows.append({"position": k, "n": n, "effect": _finite(effects[k]),
                     "ci": _interval(*percentile_interval(resampled[:, k], level))})
    return {"by_position": rows, "range": _finite(observed_range),
            "range_ci": _interval(*percentile_interval(ranges, level)),
            "noise_floor": _finite(np.median(null_ranges)) if len(null_ranges) else None,
            "null_95": _finite(np.percentile(null_ranges, 95)) if len(null_ranges) else None,
            "p_value": (_finite((1 + (null_ranges >= observed_range).sum()) / (1 + len(null_ranges)))
                        if len(null_ranges) and not math.isnan(observed_range) else None),
            "models": int(n_models), "method": "within answers across passes" if within else "raw means (one pass)"}


def item_agreement(scores: np.ndarray) -> dict | None:
    """How well the judge's passes agree on the same answers: the informative consistency check.

    ``scores`` is (passes, items, models), nan where a judgement failed. ``within_item`` is
    Spearman's rho between two passes' scores of the models' answers to one item, averaged
    over items and pairs of passes: does the judge order the same answers the same way when
    only the presentation order changed? (Items whose scores tie in a pass, so rho is
    undefined, are left out.) ``icc`` is the one-way intraclass correlation ICC(1) with each
    (item, model) answer a group and its passes the replicates (unequal counts handled by the
    usual n0): the share of one judgement's variance that belongs to the answer rather than to
    the pass, i.e. the reliability of a single judgement. Both fall as judge noise rises, unlike
    the Spearman of per-pass model means, which averages the noise away over items and stays
    near 1 long after the judge has stopped telling answers apart. None with fewer than two
    passes.
    """
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 3:
        raise ValueError(f"item_agreement: scores must be (passes, items, models), got shape {scores.shape}")
    passes, n_items, _ = scores.shape
    if passes < 2:
        return None
    rhos = []
    for p, q in itertools.combinations(range(passes), 2):
        for i in range(n_items):
            both = ~np.isnan(scores[p, i]) & ~np.isnan(scores[q, i])
            if both.sum() >= 2:
                rhos.append(spearman(scores[p, i, both], scores[q, i, both]))
    rhos = np.array(rhos)
    rhos = rhos[~np.isnan(rhos)]
    observed = ~np.isnan(scores)
    per_answer = observed.sum(axis=0)  # (items, models)
    answer_means = np.where(observed, scores, 0.0).sum(axis=0) / np.maximum(per_answer, 1)
    counts, means = per_answer[per_answer > 0], answer_means[per_answer > 0]
    groups, total = len(counts), int(counts.sum())
    icc = math.nan
    if groups >= 2 and total > groups:
        grand = (counts * means).sum() / total
        ms_between = (counts * (means - grand) ** 2).sum() / (groups - 1)
        ms_within = np.nansum((scores - answer_means[None]) ** 2) / (total - groups)
        n0 = (total - (counts ** 2).sum() / total) / (groups - 1)
        denominator = ms_between + (n0 - 1) * ms_within
        icc = (ms_between - ms_within) / denominator if denominator > 0 else math.nan
    return {"within_item": _finite(rhos.mean()) if len(rhos) else None, "icc": _finite(icc),
            "item_pairs": len(rhos), "pass_pairs": passes * (passes - 1) // 2, "answers": int(groups)}
def rounded(value: float | None, digits: int = 4) -> float | None:
    """``value`` as a JSON-ready float rounded to ``digits``; None for None and nan (no score, no mean)."""
    if value is None:
        return None
    value = float(value)
    return None if np.isnan(value) else round(value, digits)
