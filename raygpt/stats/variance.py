"""Where the noise in a judged score comes from, and intervals of a mean score that include the seeds.

One base model fine-tuned several times (``ift.seeds``), or a pool of base models that differ
only in their pretraining seed (``judge.pools``), each fine-tuned one or more times, is judged
run by run on the same items over several passes. Its score is

    score[p, s, k, i] = mean + item[i] + pretraining[p] + pretraining_item[p, i]
                        + seed[p, s] + seed_item[p, s, i] + pass[p, s, k, i]

with independent random effects: how hard the item is; how good pretraining seed p came out
overall and on this item; how good fine-tuning run s of it came out overall and on this item;
the judge's pass-to-pass noise on the same answer. Items are crossed with runs (every run
answers every item); fine-tuning runs sit within their pretraining seed; passes within a
(run, item) cell. A base model on its own is one pretraining seed.

Written here because no maintained Python library does this: scipy.stats has the t, F and
chi-square distributions used below, but no random-effects ANOVA; statsmodels' mixed models
fit by (RE)ML and give no interval for a mean that holds its level with three seeds. The
variance components are the method-of-moments (ANOVA) estimates of Searle, Casella &
McCulloch (1992), on cell means so missing passes unbalance nothing but the count.

The interval of a mean (``mean_ci``) puts each level's share of the variance of the mean
under its own t quantile, with that level's exact degrees of freedom, and adds the parts in
quadrature:

    half-width^2 = t(U - 1)^2 * MS_unit / (U I) + t(I - 1)^2 * max(0, MS_item - MS_unit_item) / (U I)

where the units are the pretraining seeds of a pool (each the mean of its fine-tuning runs)
or the fine-tuning seeds of one base model, I the items. The two parts sum to the usual
unbiased variance of the mean, ``(MS_unit + MS_item - MS_unit_item) / (U I)``. The usual t
interval with Satterthwaite's degrees of freedom estimated from the same mean squares covers
the truth 92-94% of the time at 3 seeds (the degrees of freedom come out high exactly when
the seed mean square is low by chance); this one covered 95-98% at 3, 5 and 10 seeds with
seed sd 0, 2 and 4 in 20,000 simulations each (tests/test_stats.py runs a smaller version),
at the price of a wider interval when the seeds matter about as much as the items do (up to
1.9 times the width of the interval with the true variance at 3 seeds, 1.1 times at 10).
Seed resampling cannot do better: with 3 seeds a bootstrap has a handful of distinct resamples
and shrinks the seed variance by a third. Paired differences (``paired_seed_robust``) are
built the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

from raygpt.stats.nesting import by_pretraining_seed
from raygpt.stats.values import finite, interval

PRETRAINING = "pretraining"
FINETUNING = "fine-tuning"


@dataclass
class SeedAnova:
    """Mean squares of one model's (or pool's) scores, on the cell means (the mean over passes
    for each run and item, the "unweighted means" analysis).

    The top level are the units a mean varies over: the pretraining seeds of a pool (each unit
    the mean of its fine-tuning runs), else the fine-tuning seeds. Items without a score from
    every run are left out (``items_dropped``).
    """

    unit_means: np.ndarray
    """(units, items kept)."""
    unit_level: str
    """``PRETRAINING`` or ``FINETUNING``: what a unit is."""
    runs: int
    items_dropped: int
    passes_harmonic: float
    """Harmonic mean of the passes per cell: a cell mean's pass noise is ``ms_pass / this``."""
    ms_unit: float
    ms_item: float
    ms_interaction: float
    """Units by items."""
    ms_pass: float
    df_pass: float
    runs_harmonic: float = math.nan
    """Pools: harmonic mean of the fine-tuning runs per pretraining seed."""
    ms_run: float = math.nan
    """Pools: fine-tuning runs within their pretraining seed (nan where no seed has two)."""
    df_run: float = 0.0
    ms_run_item: float = math.nan
    df_run_item: float = 0.0

    @property
    def units(self) -> int:
        return self.unit_means.shape[0]

    @property
    def items(self) -> int:
        return self.unit_means.shape[1]

    @staticmethod
    def of(scores: np.ndarray | Sequence[np.ndarray], keep: np.ndarray | None = None) -> SeedAnova:
        """``scores``: (seeds, passes, items) of one base model, or a list of such arrays, one
        per pretraining seed (``nesting.by_pretraining_seed``); nan where a judgement failed.
        ``keep`` (items,) overrides which items are kept."""
        groups = by_pretraining_seed(scores, 2, "variance components")
        counts = [(~np.isnan(g)).sum(axis=1) for g in groups]  # (runs, items) each
        complete = np.all([(c > 0).all(axis=0) for c in counts], axis=0) if keep is None else keep
        cells, within, df_pass, count_cells = [], 0.0, 0.0, []
        for g, c in zip(groups, counts):
            kept, n = g[:, :, complete], c[:, complete]
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.nansum(kept, axis=1) / n
            within += float(np.nansum((kept - mean[:, None]) ** 2))
            df_pass += float((n - 1).sum())
            cells.append(mean)
            count_cells.append(n.ravel())
        n_all = np.concatenate(count_cells)
        pools = len(groups) > 1
        unit_means = np.array([c.mean(axis=0) for c in cells]) if pools else cells[0]
        anova = SeedAnova(unit_means, PRETRAINING if pools else FINETUNING, sum(len(c) for c in cells),
                          int((~complete).sum()), float(n_all.size / (1 / n_all).sum()) if n_all.size else math.nan,
                          *_two_way(unit_means), ms_pass=within / df_pass if df_pass > 0 else math.nan,
                          df_pass=df_pass)
        if pools:
            anova._add_runs_within(cells)
        return anova

    def _add_runs_within(self, cells: list[np.ndarray]) -> None:
        """The fine-tuning level of a pool: runs within their pretraining seed, and by items."""
        sizes = np.array([len(c) for c in cells], dtype=float)
        self.runs_harmonic = float(len(sizes) / (1 / sizes).sum())
        items = self.items
        df_run = float((sizes - 1).sum())
        if df_run == 0 or items == 0:
            return
        between = within_items = 0.0
        for c, unit in zip(cells, self.unit_means):
            run_means = c.mean(axis=1)
            between += items * ((run_means - unit.mean()) ** 2).sum()
            within_items += ((c - run_means[:, None] - unit[None] + unit.mean()) ** 2).sum()
        self.ms_run, self.df_run = between / df_run, df_run
        if items > 1:
            self.df_run_item = df_run * (items - 1)
            self.ms_run_item = within_items / self.df_run_item

    @property
    def pass_noise(self) -> tuple[float, float]:
        """(the pass noise in a cell mean, its degrees of freedom); (0, inf) with one pass per cell."""
        if self.df_pass > 0:
            return self.ms_pass / self.passes_harmonic, self.df_pass
        return 0.0, math.inf


def _two_way(cells: np.ndarray) -> tuple[float, float, float]:
    """(MS_unit, MS_item, MS_interaction) of a complete (units, items) table; nan where undefined."""
    units, items = cells.shape
    ms_unit = ms_item = ms_interaction = math.nan
    if items:
        grand = cells.mean()
        unit_means, item_means = cells.mean(axis=1), cells.mean(axis=0)
        if units > 1:
            ms_unit = items * ((unit_means - grand) ** 2).sum() / (units - 1)
        if items > 1:
            ms_item = units * ((item_means - grand) ** 2).sum() / (items - 1)
        if units > 1 and items > 1:
            interaction = cells - unit_means[:, None] - item_means[None] + grand
            ms_interaction = (interaction ** 2).sum() / ((units - 1) * (items - 1))
    return float(ms_unit), float(ms_item), float(ms_interaction)


@dataclass
class _Part:
    """One level's share of the variance of a mean (or difference), with its degrees of freedom."""

    variance: float
    df: float


def _half_width(parts: list[_Part], level: float) -> float:
    """``sqrt(sum t(df)^2 * variance)`` at two-sided ``level``: each part under its own t."""
    q = 1 - (1 - level) / 2
    # special.stdtrit is scipy.stats.t.ppf without its argument checks: the p-value's root search calls it often.
    return math.sqrt(sum(special.stdtrit(part.df, q) ** 2 * part.variance for part in parts if part.variance > 0))


def _quadrature_interval(center: float, parts: list[_Part], level: float) -> dict:
    """``center +- _half_width`` and the standard error ``sqrt(sum variance)``. A zero variance
    gives a zero-width interval."""
    se = math.sqrt(sum(part.variance for part in parts))
    half = _half_width(parts, level) if se > 0 else 0.0
    return {"ci": interval(center - half, center + half), "se": finite(se)}


def _p_value(center: float, parts: list[_Part]) -> float:
    """The two-sided p-value of "the true value is 0" that matches ``_quadrature_interval``:
    the error level at which the interval just reaches 0 (0 below 1e-12)."""
    if not sum(part.variance for part in parts) > 0:
        return 0.0 if center else 1.0
    if center == 0:
        return 1.0
    reach = lambda alpha: _half_width(parts, 1 - alpha) - abs(center)  # noqa: E731 (falls as alpha grows)
    return 0.0 if reach(1e-12) <= 0 else float(optimize.brentq(reach, 1e-12, 1.0))


def _mean_parts(anova: SeedAnova) -> list[_Part]:
    """The variance of the mean over units and items, split by level (module docstring)."""
    scale = anova.units * anova.items
    if anova.units < 2:
        return [_Part(anova.ms_item / scale, anova.items - 1)]
    return [_Part(anova.ms_unit / scale, anova.units - 1),
            _Part(max(0.0, anova.ms_item - anova.ms_interaction) / scale, anova.items - 1)]


def _finetuning_parts(anova: SeedAnova) -> list[_Part] | None:
    """A pool's variance of the mean with its pretraining seeds held fixed (only fine-tuning
    seeds and items random), split the same way; None where no pretraining seed has two runs."""
    if anova.unit_level != PRETRAINING or anova.df_run == 0 or anova.items < 2:
        return None
    units, items, runs = anova.units, anova.items, anova.runs_harmonic
    return [_Part(anova.ms_run / (units * runs * items), anova.df_run),
            _Part(max(0.0, anova.ms_item / (units * items) - anova.ms_run_item / (units * runs * items)), items - 1)]


def mean_ci(scores: np.ndarray | Sequence[np.ndarray], level: float = 0.95, _anova: SeedAnova | None = None) -> dict:
    """One base model's (or pool's) mean score over its runs, items and passes, with an
    interval that includes the seed variance.

    ``scores`` is (seeds, passes, items), or for a pool a list with one such array per
    pretraining seed; nan where a judgement failed. The mean is the mean over pretraining
    seeds of the mean over their fine-tuning runs of the (run, item) cell means, over the items
    scored by every run. The interval is the module docstring's: with a pool's pretraining
    seeds as units it includes both seed variances; with one run it is the usual t interval
    over items, and ``includes_seed_variance`` is False. For a pool whose pretraining seeds
    have fine-tuning replicates, ``ci_finetuning`` is the interval that holds the pretraining
    seeds fixed (fine-tuning seeds and items random): what the interval would be if the
    pretraining seed did not matter.
    """
    anova = _anova or SeedAnova.of(scores)
    result = {"mean": None, "ci": [None, None], "se": None, "seeds": anova.runs, "items": anova.items,
              "pretraining_seeds": anova.units if anova.unit_level == PRETRAINING else 1,
              "includes_seed_variance": anova.units >= 2, "ci_finetuning": None}
    if anova.items == 0:
        return result
    mean = float(anova.unit_means.mean())
    result["mean"] = finite(mean)
    if anova.items < 2:
        return result
    result.update(_quadrature_interval(mean, _mean_parts(anova), level))
    finetuning = _finetuning_parts(anova)
    if finetuning is not None:
        result["ci_finetuning"] = _quadrature_interval(mean, finetuning, level)["ci"]
    return result


NOT_ESTIMATED = {"variance": None, "sd": None, "ci_variance": [None, None], "ci_sd": [None, None]}
"""A component the design cannot estimate."""


def _quantile(q: float, df_top: float, df_reference: float) -> float:
    """The q-quantile of F(df_top, df_reference); chi-square(df_top) / df_top for an infinite reference."""
    if math.isinf(df_reference):
        return float(stats.chi2.ppf(q, df_top) / df_top)
    return float(stats.f.ppf(q, df_top, df_reference))


def _component(top: float, df_top: float, reference: float, df_reference: float, scale: float,
               level: float) -> dict:
    """A variance component ``(E[top] - E[reference]) / scale`` by the method of moments, clipped
    at 0, with an interval from the F distribution of ``top / reference``: the bounds are
    ``(top / F_q - reference) / scale`` for the two tail quantiles of F(df_top, df_reference),
    clipped at 0 (exact when the reference is known, and close when it has many degrees of
    freedom, as the interaction and pass mean squares do). ``reference = 0`` with
    ``df_reference = inf`` gives the chi-square interval of a mean square alone."""
    if not (math.isfinite(top) and math.isfinite(reference)) or df_top <= 0 or df_reference <= 0:
        return dict(NOT_ESTIMATED)
    tail = (1 - level) / 2
    estimate = max(0.0, (top - reference) / scale)
    high, low = (max(0.0, (top / _quantile(q, df_top, df_reference) - reference) / scale) for q in (tail, 1 - tail))
    return {"variance": finite(estimate), "sd": finite(math.sqrt(estimate)), "ci_variance": interval(low, high),
            "ci_sd": interval(math.sqrt(low), math.sqrt(high))}


def _satterthwaite(terms: list[tuple[float, float]]) -> tuple[float, float]:
    """A sum of mean squares (each given as (coefficient * MS, df)) and Satterthwaite's (1946)
    degrees of freedom for it; for the reference of a component's F interval."""
    total = sum(value for value, _ in terms)
    spread = sum(value ** 2 / df for value, df in terms if df > 0)
    return total, (total ** 2 / spread if spread > 0 else math.inf)


def variance_components(scores: np.ndarray | Sequence[np.ndarray], level: float = 0.95) -> dict:
    """Where the noise in one base model's (or pool's) judged score comes from.

    ``scores`` as for ``mean_ci``. Components (the module docstring's model), each a variance
    and sd with an F-ratio interval, None where it cannot be estimated: ``item``,
    ``pretraining`` and ``pretraining_item`` (pools only), ``seed`` and ``seed_item`` (the
    fine-tuning seed, within its pretraining seed), ``pass``. ``limits`` lists what the design
    cannot estimate: ``"too few items"`` (fewer than two scored by every run); ``"one run"``
    (the seed variances are None and the item variance also holds how this one run answered
    each item); ``"one pass"`` (one pass per answer: the pass noise and the seed-by-item
    variance are None, their sum is still in the variance of the mean); ``"fine-tuning
    confounded"`` (a pool whose pretraining seeds were each fine-tuned once: the fine-tuning
    variance is inside the pretraining one). In
    comparative mode a call shared by several runs' answers can move them together; that shows
    as pass noise and makes the seed-by-item variance read a little low. ``mean`` is
    ``mean_ci(scores, level)``.
    """
    anova = SeedAnova.of(scores)
    items, units = anova.items, anova.units
    pass_noise, df_pass_noise = anova.pass_noise
    limits = []
    names = ("item", "seed", "seed_item", "pass") + ((PRETRAINING, "pretraining_item")
                                                    if anova.unit_level == PRETRAINING else ())
    components = {name: dict(NOT_ESTIMATED) for name in names}
    if items < 2:
        limits.append("too few items")
    elif anova.unit_level == PRETRAINING:
        components.update(_pool_components(anova, level))
        if anova.df_run == 0:
            limits.append("fine-tuning confounded")
    elif units >= 2:
        df_interaction = (units - 1) * (items - 1)
        components["item"] = _component(anova.ms_item, items - 1, anova.ms_interaction, df_interaction, units, level)
        components["seed"] = _component(anova.ms_unit, units - 1, anova.ms_interaction, df_interaction, items, level)
        if anova.df_pass > 0:
            components["seed_item"] = _component(anova.ms_interaction, df_interaction, pass_noise, df_pass_noise, 1,
                                                 level)
    else:
        components["item"] = _component(anova.ms_item, items - 1, pass_noise, df_pass_noise, 1, level)
        limits.append("one run")
    if items >= 2:
        components["pass"] = _component(anova.ms_pass, anova.df_pass, 0.0, math.inf, 1, level)
        if anova.df_pass == 0:
            limits.append("one pass")
    return {"seeds": anova.runs, "pretraining_seeds": units if anova.unit_level == PRETRAINING else 1,
            "passes_per_cell": finite(anova.passes_harmonic), "items": items, "items_dropped": anova.items_dropped,
            "components": components, "mean": mean_ci(scores, level, _anova=anova), "limits": limits}


def _pool_components(anova: SeedAnova, level: float) -> dict:
    """A pool's components: the pretraining level from the table of pretraining-seed means,
    the fine-tuning level from the runs within each pretraining seed (when some has two)."""
    units, items, runs = anova.units, anova.items, anova.runs_harmonic
    pass_noise, df_pass_noise = anova.pass_noise
    df_unit_item = (units - 1) * (items - 1)
    found = {"item": _component(anova.ms_item, items - 1, anova.ms_interaction, df_unit_item, units, level)}
    if anova.df_run > 0:
        # E[MS_unit] = I s_p^2 + s_pi^2 + (I s_f^2 + s_fi^2) / S, E[MS_interaction] = s_pi^2 + s_fi^2 / S,
        # E[MS_run] = I s_f^2 + s_fi^2, E[MS_run_item] = s_fi^2 (+ the pass noise of a cell mean).
        reference = _satterthwaite([(anova.ms_interaction, df_unit_item), (anova.ms_run / runs, anova.df_run),
                                    (-anova.ms_run_item / runs, anova.df_run_item)])
        found[PRETRAINING] = _component(anova.ms_unit, units - 1, *reference, items, level)
        found["pretraining_item"] = _component(anova.ms_interaction, df_unit_item, anova.ms_run_item / runs,
                                               anova.df_run_item, 1, level)
        found["seed"] = _component(anova.ms_run, anova.df_run, anova.ms_run_item, anova.df_run_item, items, level)
        if anova.df_pass > 0:
            found["seed_item"] = _component(anova.ms_run_item, anova.df_run_item, pass_noise, df_pass_noise, 1, level)
    else:
        # One run per pretraining seed: its fine-tuning luck is part of the pretraining seed's.
        found[PRETRAINING] = _component(anova.ms_unit, units - 1, anova.ms_interaction, df_unit_item, items, level)
        if anova.df_pass > 0:
            found["pretraining_item"] = _component(anova.ms_interaction, df_unit_item, pass_noise, df_pass_noise, 1,
                                                   level)
    return found


def paired_seed_robust(scores_a: np.ndarray | Sequence[np.ndarray], scores_b: np.ndarray | Sequence[np.ndarray],
                       level: float = 0.95, names: tuple[str, str] = ("a", "b")) -> dict:
    """Whether base model (or pool) a's lead over b survives the seed noise.

    ``scores_a``/``scores_b`` as for ``mean_ci``, on the same items (seeds and passes may
    differ in number). The difference of the two means over the items every run of both has a
    score for; its variance, split by level as in ``mean_ci``, is

        max(0, var(d_i) / I - MS_ai / (U_a I) - MS_bi / (U_b I)) + MS_a / (U_a I) + MS_b / (U_b I)

    where ``d_i`` is item i's a-minus-b difference of the unit means (an item's difficulty
    cancels; what is left over items is how differently the two models take each item), and
    each model's unit mean square carries its own seed variance (runs of different models
    share no seed effect). Each part is under its own t quantile (items: I - 1 degrees of
    freedom; a model's units: U - 1), added in quadrature. ``survives`` is True when the
    interval leaves out 0, False when it holds 0, and None when a model has one run (its seed
    variance is unknown and left out of the interval). ``p_value`` is the two-sided error
    level at which the interval just reaches 0 (before any adjustment for several pairs).
    ``seeds`` and ``unit_levels`` say over what each model's seed variance was measured.
    """
    groups_a = by_pretraining_seed(scores_a, 2, "paired_seed_robust")
    groups_b = by_pretraining_seed(scores_b, 2, "paired_seed_robust")
    if groups_a[0].shape[2] != groups_b[0].shape[2]:
        raise ValueError(f"paired_seed_robust: (seeds, passes, items) arrays on the same items needed, got "
                         f"{groups_a[0].shape[2]} and {groups_b[0].shape[2]} items")
    keep = np.all([(~np.isnan(g)).any(axis=1).all(axis=0) for g in groups_a + groups_b], axis=0)
    a, b = SeedAnova.of(groups_a, keep), SeedAnova.of(groups_b, keep)
    items = int(keep.sum())
    result = {"a": names[0], "b": names[1], "difference": None, "ci": [None, None], "se": None, "p_value": None,
              "items": items, "seeds": [a.units, b.units], "unit_levels": [a.unit_level, b.unit_level],
              "survives": None}
    if items < 2:
        return result
    per_item = a.unit_means.mean(axis=0) - b.unit_means.mean(axis=0)
    difference = float(per_item.mean())
    shared = per_item.var(ddof=1) / items - sum(m.ms_interaction / (m.units * items) for m in (a, b) if m.units >= 2)
    parts = [_Part(max(0.0, shared), items - 1)]
    parts += [_Part(m.ms_unit / (m.units * items), m.units - 1) for m in (a, b) if m.units >= 2]
    result.update(difference=finite(difference), p_value=finite(_p_value(difference, parts)),
                  **_quadrature_interval(difference, parts, level))
    if a.units >= 2 and b.units >= 2:
        low, high = result["ci"]
        result["survives"] = bool(low > 0 or high < 0)
    return result
