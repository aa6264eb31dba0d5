"""The drivers' statistics (``drivers/stats.py``): Student's t against known values and SciPy,
Welch's test, and the studies' paired comparisons against their definitions."""

import math
import random

import numpy as np
import pytest

from prsl_kernels.drivers import stats as st
from prsl_kernels.drivers.stats import mean_ci, t_ppf, t_sf, t_sf_two_sided, welch_test


def test_t_distribution_known_values():
    # Textbook quantiles t_{0.975, df}.
    for df, q in ((1, 12.7062047), (2, 4.3026527), (5, 2.5705818), (10, 2.2281389), (30, 2.0422725)):
        assert t_ppf(0.975, df) == pytest.approx(q, rel=1e-6)
    assert t_sf_two_sided(0.0, 7) == pytest.approx(1.0)
    # df = 1 is the Cauchy distribution: P(|T| >= t) = 1 - 2 atan(t) / pi.
    for t in (0.3, 1.0, 4.0):
        assert t_sf_two_sided(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-9)
    # the one-sided tail is half the two-sided one on either side of 0
    assert t_sf(1.7, 4) == pytest.approx(0.5 * t_sf_two_sided(1.7, 4), rel=1e-12)
    assert t_sf(-1.7, 4) == pytest.approx(1 - 0.5 * t_sf_two_sided(-1.7, 4), rel=1e-12)


def test_welch_against_scipy():
    import scipy.stats as stats
    rng = random.Random(0)
    for _ in range(5):
        a = [rng.gauss(0.8, 0.05) for _ in range(rng.randint(2, 6))]
        b = [rng.gauss(0.82, 0.1) for _ in range(rng.randint(2, 6))]
        t, df, p = welch_test(a, b)
        ref = stats.ttest_ind(a, b, equal_var=False)
        assert t == pytest.approx(float(ref.statistic), rel=1e-9)
        assert p == pytest.approx(float(ref.pvalue), rel=1e-7)
        m, half = mean_ci(a)
        lo, hi = stats.t.interval(0.95, len(a) - 1, loc=m, scale=stats.sem(a))
        assert half == pytest.approx((hi - lo) / 2, rel=1e-7)


def test_welch_degenerate_cases():
    assert math.isnan(welch_test([1.0], [1.0, 2.0])[2])
    assert welch_test([0.5, 0.5], [0.5, 0.5])[2] == 1.0
    assert welch_test([0.5, 0.5], [0.7, 0.7])[2] == 0.0
    m, half = mean_ci([0.3])
    assert m == 0.3 and math.isnan(half)


def _pairs(values):
    return {f"p{i}": float(v) for i, v in enumerate(values)}


def test_paired_matches_the_textbook_formula():
    rng = np.random.default_rng()
    a, b = rng.normal(0.8, 0.05, 12), rng.normal(0.78, 0.05, 12)
    r = st.paired(_pairs(a), _pairs(b))
    d = a - b
    se = d.std(ddof=1) / math.sqrt(d.size)
    assert r["n"] == 12 and r["diff"] == pytest.approx(d.mean(), rel=1e-12)
    assert r["t"] == pytest.approx(d.mean() / se, rel=1e-9)
    half = t_ppf(0.975, 11) * se
    assert r["ci95"] == pytest.approx([d.mean() - half, d.mean() + half], rel=1e-9)
    assert r["dz"] == pytest.approx(d.mean() / d.std(ddof=1), rel=1e-9)
    # Only keys present in both arms pair up.
    r2 = st.paired({**_pairs(a), "extra": 5.0}, _pairs(b))
    assert r2["n"] == 12 and r2["diff"] == pytest.approx(r["diff"])


def test_paired_against_scipy():
    import scipy.stats as stats
    rng = np.random.default_rng()
    a, b = rng.normal(0.0, 1.0, 10), rng.normal(0.3, 1.0, 10)
    r = st.paired(_pairs(a), _pairs(b))
    ref = stats.ttest_rel(a, b)
    assert r["p"] == pytest.approx(ref.pvalue, rel=1e-6)
    lo, hi = ref.confidence_interval(0.95)
    assert r["ci95"] == pytest.approx([lo, hi], rel=1e-6, abs=1e-9)


def test_paired_p_is_calibrated_under_the_null():
    # Under H0 (normal differences, 10 pairs) p < 0.05 must happen 5% of the time. A fixed
    # seed: the property is about the distribution, and 1000 draws put 5% +- 0.7% (1 SD).
    rng = np.random.default_rng(1234)
    hits = sum(st.paired(_pairs(rng.normal(0, 1, 10)), _pairs(np.zeros(10)))["p"] < 0.05 for _ in range(1000))
    assert 0.03 <= hits / 1000 <= 0.075


def test_tost_decides_by_the_90_percent_interval():
    rng = np.random.default_rng()
    base = rng.normal(0.8, 0.05, 10)
    near = base + rng.normal(0.0, 0.002, 10)       # differences ~0 +- 0.002: equivalent within 0.03
    far = base + 0.05 + rng.normal(0.0, 0.002, 10)  # differences ~0.05: not equivalent within 0.03
    eq, neq = st.tost(_pairs(near), _pairs(base), 0.03), st.tost(_pairs(far), _pairs(base), 0.03)
    assert eq["p"] < 0.05 and -0.03 < eq["ci90"][0] < eq["ci90"][1] < 0.03
    assert neq["p"] > 0.5 and neq["ci90"][0] > 0.03


def test_holm_step_down():
    adj = st.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": float("nan")})
    assert adj["a"] == pytest.approx(0.03) and adj["c"] == pytest.approx(0.06) and adj["b"] == pytest.approx(0.06)
    assert math.isnan(adj["d"])
    assert st.holm({"a": 0.6, "b": 0.7}) == {"a": 1.0, "b": 1.0}


def test_adjusted_difference_recovers_the_intercept():
    rng = np.random.default_rng()
    n = 12
    cov_base = rng.uniform(0.5, 0.7, n)
    cov_arm = cov_base + rng.normal(0.0, 0.05, n)
    base = rng.normal(0.8, 0.05, n)
    arm = base + 0.02 + 0.5 * (cov_arm - cov_base)  # exactly intercept 0.02, slope 0.5
    r = st.adjusted_difference(_pairs(arm), _pairs(base), _pairs(cov_arm), _pairs(cov_base))
    assert r["diff"] == pytest.approx(0.02, abs=1e-9) and r["slope"] == pytest.approx(0.5, abs=1e-7)
    noisy = arm + rng.normal(0.0, 0.01, n)
    r = st.adjusted_difference(_pairs(noisy), _pairs(base), _pairs(cov_arm), _pairs(cov_base))
    assert r["ci95"][0] < r["diff"] < r["ci95"][1] and abs(r["diff"] - 0.02) < 0.03


def test_threshold_mapping_keeps_the_anchors():
    b_paper, b_here = 0.83, 0.55
    assert st.recalibrated_threshold(1.0, b_paper, b_here) == pytest.approx(1.0)
    assert st.recalibrated_threshold(b_paper, b_paper, b_here) == pytest.approx(b_here)
    ts = [st.recalibrated_threshold(t, b_paper, b_here) for t in (0.9, 0.8, 0.75, 0.7)]
    assert ts == sorted(ts, reverse=True)


def test_detectable_difference_shrinks_with_pairs():
    assert st.detectable_difference(0.04, 40) < st.detectable_difference(0.04, 10) < st.detectable_difference(0.04, 3)
    assert math.isnan(st.detectable_difference(0.04, 1))


def test_dose_slope_recovers_a_planted_slope():
    rng = np.random.default_rng()
    doses = {"b1": 0.0, "b4": 2.0, "b16": 4.0, "b64": 6.0}
    level = rng.normal(0.8, 0.05, 8)  # a per-pair level the paired slope must ignore
    endpoint = {a: {f"p{i}": level[i] - 0.01 * x for i in range(8)} for a, x in doses.items()}
    r = st.dose_slope(endpoint, doses)
    assert r["n"] == 8 and r["estimate"] == pytest.approx(-0.01, abs=1e-12) and r["p"] < 1e-10
    noisy = {a: {p: v + rng.normal(0, 0.002) for p, v in e.items()} for a, e in endpoint.items()}
    r = st.dose_slope(noisy, doses)
    assert r["ci95"][0] < r["estimate"] < r["ci95"][1] and r["ci95"][1] < 0 and r["p"] < 0.05
    # A pair with a single dose has no slope and is left out.
    partial = {a: dict(e) for a, e in endpoint.items()}
    for a in ("b4", "b16", "b64"):
        del partial[a]["p0"]
    assert st.dose_slope(partial, doses)["n"] == 7
