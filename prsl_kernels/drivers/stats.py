"""The drivers' statistics, with numpy alone (no SciPy dependency).

* Student's t: the distribution through the regularised incomplete beta (:func:`betainc`),
  its tails and quantiles, the mean's confidence interval (:func:`mean_ci`) and Welch's test,
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


# --------------------------------------------------------------------------- Student's t


def _betacf(a, b, x, iters=300, eps=3e-16):
    # Continued fraction of the incomplete beta (modified Lentz).
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, iters + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a, b, x):
    """Regularised incomplete beta ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The continued fraction converges fast for x < (a+1)/(a+b+2); use the symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_sf_two_sided(t, df):
    """``P(|T| >= |t|)`` for Student's t with ``df`` (real) degrees of freedom."""
    if not math.isfinite(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_ppf(q, df):
    """Quantile of Student's t (``q`` in (0.5, 1)), by bisection on the CDF."""
    lo, hi = 0.0, 1e3
    target = 2.0 * (1.0 - q)          # two-sided tail mass beyond the quantile
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_sf_two_sided(mid, df) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


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
    half = 0.5 * t_sf_two_sided(t, df)
    return half if t >= 0 else 1.0 - half


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
