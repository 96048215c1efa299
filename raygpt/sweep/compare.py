"""The comparison of a sweep's variants with its baseline, in numbers: each variant against the
baseline seed by seed, the run-to-run noise, and the cost. Sentences are the report's.

With one run per (variant, seed) and runs of one seed sharing their data order and the initial
values of their shared parameters (``raygpt.sweep.pairing``), a variant's effect is the mean of
its seed-paired differences from the baseline, ``d_s = loss(variant@s) - loss(baseline@s)``,
with a t interval on those differences (common random numbers: the seed's own luck cancels in
each difference, so the interval is narrower than the two runs' noise would make it) and a
two-sided t test, Holm-adjusted over all variants. The noise is the baseline's seed standard
deviation, with its chi-square interval.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import stats as scipy_stats

from raygpt.stats.multiple_comparisons import holm_adjust

LEVEL = 0.95


def seed_spread(values: Sequence[float], level: float = LEVEL) -> dict[str, Any]:
    """Mean and seed standard deviation of one quantity over runs, the deviation with its
    chi-square interval (``sqrt(df s^2 / chi2)`` at both tails; exact for normal noise)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    out: dict[str, Any] = {"n": int(x.size), "mean": float(x.mean()) if x.size else None, "sd": None,
                           "ci_sd": [None, None]}
    if x.size >= 2:
        df = x.size - 1
        sd = float(x.std(ddof=1))
        tail = (1 - level) / 2
        out["sd"] = sd
        out["ci_sd"] = [math.sqrt(df * sd ** 2 / scipy_stats.chi2.ppf(1 - tail, df)),
                        math.sqrt(df * sd ** 2 / scipy_stats.chi2.ppf(tail, df))]
    return out


def paired_difference(variant: dict[int, float], baseline: dict[int, float], level: float = LEVEL) -> dict[str, Any]:
    """A variant's seed-paired difference from the baseline (``variant - baseline``, by seed):
    mean, the t interval and two-sided p on the differences of the seeds both have."""
    seeds = sorted(s for s in variant if s in baseline and variant[s] is not None and baseline[s] is not None)
    d = np.asarray([variant[s] - baseline[s] for s in seeds], dtype=float)
    out: dict[str, Any] = {"seeds": seeds, "n": len(seeds), "differences": [float(v) for v in d],
                           "difference": float(d.mean()) if d.size else None, "sd": None, "ci": [None, None],
                           "df": None, "t": None, "p_value": None, "identical": bool(d.size) and not d.any()}
    if d.size < 2:
        return out
    df = d.size - 1
    sd = float(d.std(ddof=1))
    out.update(sd=sd, df=df)
    if sd == 0:  # every seed moved by the same amount (0 for a change that cannot act): no noise to test against
        out.update(ci=[out["difference"]] * 2, p_value=1.0 if out["identical"] else 0.0)
        return out
    se = sd / math.sqrt(d.size)
    half = scipy_stats.t.ppf(1 - (1 - level) / 2, df) * se
    t = out["difference"] / se
    out.update(ci=[out["difference"] - half, out["difference"] + half], t=t,
               p_value=float(2 * scipy_stats.t.sf(abs(t), df)))
    return out


def verdict(row: dict[str, Any], level: float = LEVEL) -> str:
    """``better`` / ``worse`` (the Holm-adjusted p under 1 - level and the interval off 0),
    ``noise`` (within the run-to-run noise: a variant whose test losses are bitwise the
    baseline's too, ``identical``), or ``too few seeds`` for an interval."""
    if row["n"] < 2:
        return "too few seeds"
    low, high = row["ci"]
    p = row.get("p_holm")
    if not row["identical"] and p is not None and p < 1 - level and (high < 0 or low > 0):
        return "better" if row["difference"] < 0 else "worse"
    return "noise"


def compare_variants(runs: list[dict[str, Any]], variants: list[str], baseline: str,
                     level: float = LEVEL) -> dict[str, Any]:
    """Per variant: test loss and final validation loss over seeds; against the baseline, the
    paired difference in test loss with its interval, Holm-adjusted p and verdict; the noise;
    cost. ``runs`` are dicts with variant, seed, test_loss, val_loss, gpu_hours, usd."""
    by_variant = {v: [r for r in runs if r["variant"] == v] for v in variants}
    base_losses = {r["seed"]: r.get("test_loss") for r in by_variant[baseline]}
    rows = []
    for variant in variants:
        members = by_variant[variant]
        row: dict[str, Any] = {
            "variant": variant, "baseline": variant == baseline, "runs": len(members),
            "test_loss": seed_spread([r.get("test_loss") for r in members], level),
            "val_loss": seed_spread([r.get("val_loss") for r in members], level),
            "gpu_hours": _total(r.get("gpu_hours") for r in members),
            "usd": _total(r.get("usd") for r in members),
        }
        if variant != baseline:
            row["vs_baseline"] = paired_difference({r["seed"]: r.get("test_loss") for r in members}, base_losses,
                                                   level)
        rows.append(row)
    tested = [row["vs_baseline"] for row in rows if "vs_baseline" in row]
    for entry, p_holm in zip(tested, holm_adjust([np.nan if t["p_value"] is None else t["p_value"]
                                                  for t in tested])):
        entry["p_holm"] = None if math.isnan(p_holm) else float(p_holm)
        entry["verdict"] = verdict(entry, level)
    base = next(row for row in rows if row["baseline"])
    return {"level": level, "baseline": baseline, "variants": rows,
            "noise": {"test_loss": base["test_loss"], "val_loss": base["val_loss"]},
            "cost": {"gpu_hours": _total(r["gpu_hours"] for r in rows), "usd": _total(r["usd"] for r in rows)}}


def _total(values) -> float | None:
    known = [v for v in values if v is not None]
    return float(sum(known)) if known else None
