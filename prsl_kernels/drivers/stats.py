"""The drivers' statistics (Student's t from ``scipy.stats``).

* Student's t: its tails and quantiles, the mean's confidence interval (:func:`mean_ci`) and Welch's test,
  as the attack report compares groups of models (e.g. one loss over several seeds) with a
  baseline group.
* The studies' paired comparisons of arms over (base, seed) pairs: each fine-tuning arm
  starts from the same base models with the same seeds, so an arm and CE form pairs, and every
  test of :func:`paired`, :func:`tost`, :func:`adjusted_difference` and :func:`dose_slope` works
  on the per-pair differences ``d_i``; :func:`holm` adjusts a family of p-values.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.stats


# --------------------------------------------------------------------------- Student's t


def t_sf_two_sided(t, df):
    """``P(|T| >= |t|)`` for Student's t with ``df`` (real) degrees of freedom."""
    return float(2.0 * scipy.stats.t.sf(abs(t), df))


def t_ppf(q, df):
    """Quantile of Student's t."""
    return float(scipy.stats.t.ppf(q, df))


def mean_ci(values, level=0.95):
    """``(mean, half_width)`` of the Student-t interval; half width NaN for fewer than 2 values."""
    v = np.asarray(values, dtype=np.float64)
    m = float(v.mean()) if v.size else float("nan")
    if v.size < 2:
        return m, float("nan")
    half = t_ppf(0.5 + level / 2.0, v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return m, half


def welch_test(a, b):
    """Welch's unequal-variance t-test: ``(t, df, two-sided p)``; NaNs when either has < 2 values."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 2 or b.size < 2:
        return float("nan"), float("nan"), float("nan")
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    diff = a.mean() - b.mean()
    if va + vb == 0.0:
        # Identical values within each group: the difference is either exactly 0 or certain.
        return (0.0, float("inf"), 1.0) if diff == 0 else (math.copysign(math.inf, diff), float("inf"), 0.0)
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va * va / (a.size - 1) + vb * vb / (b.size - 1))
    return float(t), float(df), t_sf_two_sided(float(t), float(df))


# --------------------------------------------------------------------------- paired comparisons


def t_sf(t, df):
    """One-sided upper tail ``P(T >= t)`` of Student's t."""
    return float(scipy.stats.t.sf(t, df))


def paired(arm: dict, base: dict, level=0.95) -> dict:
    """Paired t-test of ``arm - base`` over the keys both have.

    Returns n, the mean difference, its ``level`` confidence interval, t, the two-sided p,
    the SD of the differences and Cohen's d_z (mean difference / SD of differences).
    """
    keys = sorted(set(arm) & set(base))
    d = np.array([arm[k] - base[k] for k in keys], dtype=np.float64)
    n = d.size
    out = {"n": int(n), "diff": float(d.mean()) if n else float("nan"), "ci95": [float("nan")] * 2,
           "t": float("nan"), "p": float("nan"), "sd": float("nan"), "dz": float("nan"), "df": n - 1}
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    out["sd"] = sd
    if se == 0.0:
        # Every pair differs by the same amount: exactly zero, or certain.
        out.update(ci95=[out["diff"]] * 2, t=0.0 if out["diff"] == 0 else math.copysign(math.inf, out["diff"]),
                   p=1.0 if out["diff"] == 0 else 0.0)
        return out
    half = t_ppf(0.5 + level / 2.0, n - 1) * se
    t = out["diff"] / se
    out.update(ci95=[out["diff"] - half, out["diff"] + half], t=t, p=t_sf_two_sided(t, n - 1), dz=out["diff"] / sd)
    return out


def tost(arm: dict, base: dict, margin: float) -> dict:
    """Two one-sided tests of equivalence, ``|mean(arm - base)| < margin``, on the pairs.

    ``p`` is the larger one-sided p; equivalence is shown at 5% when p < 0.05, which is the
    same as the 90% confidence interval lying inside ``(-margin, margin)``.
    """
    r = paired(arm, base)
    n = r["n"]
    if n < 2 or not margin > 0:
        return {"margin": margin, "p": float("nan"), "ci90": [float("nan")] * 2}
    se = r["sd"] / math.sqrt(n)
    if se == 0.0:
        p = 0.0 if abs(r["diff"]) < margin else 1.0
        return {"margin": margin, "p": p, "ci90": [r["diff"]] * 2}
    p_low = t_sf((r["diff"] + margin) / se, n - 1)        # H0: diff <= -margin
    p_high = 1.0 - t_sf((r["diff"] - margin) / se, n - 1)  # H0: diff >= +margin
    half = t_ppf(0.95, n - 1) * se
    return {"margin": margin, "p": max(p_low, p_high), "ci90": [r["diff"] - half, r["diff"] + half]}


def holm(pvalues: dict) -> dict:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1); NaNs pass through."""
    items = sorted(((p, k) for k, p in pvalues.items() if math.isfinite(p)))
    m = len(items)
    out = {k: float("nan") for k in pvalues}
    running = 0.0
    for i, (p, k) in enumerate(items):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = running
    return out


def adjusted_difference(arm: dict, base: dict, arm_cov: dict, base_cov: dict, level=0.95) -> dict:
    """The paired difference at equal clean quality: regress ``d_i`` on the covariate difference
    ``c_i`` (``arm_cov - base_cov``, e.g. clean exact match) and report the intercept (the
    difference predicted for c = 0) with its CI, and the slope."""
    keys = sorted(set(arm) & set(base) & set(arm_cov) & set(base_cov))
    d = np.array([arm[k] - base[k] for k in keys], dtype=np.float64)
    c = np.array([arm_cov[k] - base_cov[k] for k in keys], dtype=np.float64)
    n = d.size
    nan = {"n": int(n), "diff": float("nan"), "ci95": [float("nan")] * 2, "slope": float("nan"), "p": float("nan")}
    sxx = float(((c - c.mean()) ** 2).sum()) if n else 0.0
    if n < 3 or sxx == 0.0:
        return nan
    slope = float(((c - c.mean()) * (d - d.mean())).sum() / sxx)
    icpt = float(d.mean() - slope * c.mean())
    resid = d - icpt - slope * c
    s2 = float((resid ** 2).sum()) / (n - 2)
    se = math.sqrt(s2 * (1.0 / n + c.mean() ** 2 / sxx))
    if se == 0.0:
        return {**nan, "diff": icpt, "ci95": [icpt, icpt], "slope": slope, "p": 0.0 if icpt else 1.0}
    half = t_ppf(0.5 + level / 2.0, n - 2) * se
    return {"n": int(n), "diff": icpt, "ci95": [icpt - half, icpt + half], "slope": slope,
            "p": t_sf_two_sided(icpt / se, n - 2)}


def detectable_difference(sd: float, n: int, power=0.8, alpha=0.05) -> float:
    """The paired difference a two-sided t-test at ``alpha`` detects with ``power``, given the SD
    of the differences (the usual t approximation: (t_{1-a/2} + t_{power}) * sd / sqrt(n))."""
    if n < 2 or not math.isfinite(sd):
        return float("nan")
    return (t_ppf(1 - alpha / 2, n - 1) + t_ppf(power, n - 1)) * sd / math.sqrt(n)


def recalibrated_threshold(t: float, baseline_paper: float, baseline_here: float) -> float:
    """Map a BERTScore threshold of the paper's encoder onto this run's encoder.

    Both scales are anchored at 1 (identical texts) and at each encoder's score for unrelated
    texts (its baseline), and mapped linearly in between, as bert_score's own rescaling does.
    """
    return baseline_here + (t - baseline_paper) * (1.0 - baseline_here) / (1.0 - baseline_paper)


def dose_slope(endpoint: dict, dose: dict, level=0.95) -> dict:
    """The paired dose-response slope: per pair, the least-squares slope of ``endpoint[arm][pair]``
    against ``dose[arm]`` over the arms the pair has (at least two distinct doses), then the mean
    slope over pairs with its ``level`` t interval and the two-sided one-sample t-test p.

    Working within pairs removes each base's and seed's level, as the paired t-test does for two arms."""
    pairs = sorted(set().union(*(endpoint.get(a, {}).keys() for a in dose)))
    slopes = {}
    for pair in pairs:
        xs = np.array([dose[a] for a in dose if pair in endpoint.get(a, {})], dtype=np.float64)
        ys = np.array([endpoint[a][pair] for a in dose if pair in endpoint.get(a, {})], dtype=np.float64)
        sxx = float(((xs - xs.mean()) ** 2).sum()) if xs.size else 0.0
        if xs.size >= 2 and sxx > 0.0:
            slopes[pair] = float(((xs - xs.mean()) * (ys - ys.mean())).sum() / sxx)
    r = paired(slopes, {k: 0.0 for k in slopes}, level)
    return {"estimate": r["diff"], "ci95": r["ci95"], "p": r["p"], "n": r["n"], "sd": r["sd"], "per_pair": slopes}
