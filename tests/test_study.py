"""prsl-study: the whole study at smoke size (its statistics: ``test_stats.py``)."""

import json

import numpy as np
import pytest


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
