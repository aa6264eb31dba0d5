"""prsl-study: its statistics against their definitions, and the whole study at smoke size."""

import json
import math

import numpy as np
import pytest

from prsl_kernels.drivers import study_stats as st
from prsl_kernels.drivers.report import t_ppf


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
    stats = pytest.importorskip("scipy.stats")
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


@pytest.mark.usefixtures("one_torch_thread")
def test_study_smoke_end_to_end_and_resume(tmp_path):
    from prsl_kernels.drivers import study

    out, rep = tmp_path / "out", tmp_path / "rep"
    args = study.build_parser().parse_args(["--size", "smoke", "--output-dir", str(out), "--report-dir", str(rep),
                                           "--workers", "1", "--no-progress"])
    summary = study.run(args)
    saved = json.loads((rep / "summary.json").read_text())
    assert set(saved["arms"]) == {"ce", "prsl-k6", "prsl-k20", "prsl-released"}
    for arm in saved["arms"].values():
        assert arm["n_models"] == 2 and 0.0 <= arm["clean_exact_match_mean"] <= 1.0
    assert saved["n_images"] == 4 and saved["rounds"] == 2 and saved["steps_per_round"] == 1
    p = saved["primary"]
    assert (p["arm"], p["vs"]) == ("prsl-k20", "ce") and len(p["ci95"]) == 2 and p["n"] == 2
    assert p["diff"] == pytest.approx(summary["primary"]["diff"])
    # The gate (impossible at smoke size) failed, so the base was trained longer once.
    assert [g["stage"] for g in saved["gate"]] == [0, 1] and not any(g["passed"] for g in saved["gate"])
    text = (rep / "report.md").read_text()
    assert text.index("## Pre-registered analysis") < text.index("## Results")
    assert (rep / "figures" / "rounds.png").is_file() and (rep / "figures" / "paired.png").is_file()
    rows = (rep / "models.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 8
    jpeg = json.loads((out / "attack" / "ce" / "base0-s0" / "jpeg_round_trip.json").read_text())
    assert jpeg["clip_stats"]["psnr_db"] < jpeg["model_stats"]["psnr_db"]  # CLIP's stats shift every pixel

    # A killed study continues: lose one model (as if killed while it trained) and run again.
    victim = out / "models" / "prsl-released" / "base0-s1"
    (victim / "prsl_finetune.json").unlink()
    log_before = (out / "study.log").read_text()
    again = study.run(args)
    new_lines = (out / "study.log").read_text()[len(log_before):].splitlines()
    retrained = [ln for ln in new_lines if '"reused": false' in ln]
    assert len(retrained) == 1 and "prsl-released-base0-s1" in retrained[0]
    assert again["primary"]["diff"] == pytest.approx(summary["primary"]["diff"])


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


@pytest.mark.usefixtures("one_torch_thread")
def test_dose_design_smoke(tmp_path):
    """prsl-study --design dose at smoke size: CE and PRSL k=20 at the four b, BIM and APGD per
    model, the slope and the per-b comparisons in summary.json, the frontier figure."""
    from prsl_kernels.drivers import study

    out, rep = tmp_path / "out", tmp_path / "rep"
    args = study.build_parser().parse_args(["--design", "dose", "--size", "smoke", "--output-dir", str(out),
                                           "--report-dir", str(rep), "--workers", "1", "--no-progress"])
    summary = study.run(args)
    saved = json.loads((rep / "summary.json").read_text())
    assert set(saved["arms"]) == {"ce", "prsl-k20-b1", "prsl-k20-b4", "prsl-k20-b16", "prsl-k20-b64"}
    assert set(saved["dose"]) == {"0", "1", "4", "16", "64"}
    for b, d in saved["dose"].items():
        assert d["n_models"] == 2 and 0.0 <= d["clean_exact_match_mean"] <= 1.0
        assert 0.0 <= d["endpoint_mean"] <= 1.0 and 0.0 <= d["apgd_endpoint_mean"] <= 1.0
        assert ("vs_ce" in d) == (b != "0")
    assert set(saved["slope"]) >= {"estimate", "ci95", "p"} and saved["slope"]["n"] == 2
    assert saved["slope"]["estimate"] == pytest.approx(summary["slope"]["estimate"])
    # The slope is the mean over pairs of each pair's least-squares slope against log2 b.
    rows = list(__import__("csv").DictReader((rep / "models.csv").open()))
    assert len(rows) == 10
    slopes = []
    for pair in ("base0-s0", "base0-s1"):
        xs = np.log2([1, 4, 16, 64])
        ys = [float(next(r["endpoint"] for r in rows if r["arm"] == f"prsl-k20-b{b}" and r["pair"] == pair))
              for b in (1, 4, 16, 64)]
        slopes.append(np.polyfit(xs, ys, 1)[0])
    assert saved["slope"]["estimate"] == pytest.approx(float(np.mean(slopes)), abs=1e-5)  # CSV keeps 6 digits
    # APGD ran in pixel space at 4/255 for 2 steps, one round, on every model.
    cfg = json.loads((out / "attack-apgd" / "ce" / "base0-s0" / "attack_config.json").read_text())["attack"]
    assert cfg["attack"] == "apgd" and cfg["space"] == "pixel" and cfg["steps_per_round"] == 2
    assert cfg["eps"] == pytest.approx(4 / 255)
    text = (rep / "report.md").read_text()
    assert text.index("## Pre-registered analysis of the dose design") < text.index("## Results")
    assert (rep / "figures" / "frontier.png").is_file() and (rep / "figures" / "dose.png").is_file()
    assert not (out / "attack" / "ce" / "base0-s0" / "jpeg_round_trip.json").exists()
