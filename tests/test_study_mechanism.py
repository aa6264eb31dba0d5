"""prsl-study --design mechanism: the rule that picks the length, the adaptive objective, and the
whole design at smoke size (bases, treatment check, main comparison, attacks, report)."""

import csv
import json

import pytest
import torch

from prsl_kernels.drivers import study_mechanism as sm


def _row(b, steps, d):
    return {"b": b, "steps": steps, "held_out_D_mean": d}


def test_choose_steps_takes_the_shortest_length_that_cuts_d_by_the_margin():
    rows = [_row(0.0, 150, 0.10), _row(64.0, 150, 0.08), _row(0.0, 600, 0.10), _row(64.0, 600, 0.065),
            _row(0.0, 2000, 0.1), _row(64.0, 2000, 0.01)]
    assert sm.choose_steps(rows, (150, 600, 2000), 0.30, 600)[0] == 600
    none = [_row(0.0, s, 0.1) for s in (150, 600, 2000)] + [_row(64.0, s, 0.09) for s in (150, 600, 2000)]
    chosen, reason = sm.choose_steps(none, (150, 600, 2000), 0.30, 600)
    assert chosen == 600 and "no length" in reason
    assert sm.choose_steps(none, (150, 600, 2000), 0.30, 5000)[0] == 2000


def test_pgd_per_image_stays_in_each_images_ball():
    from prsl_kernels.drivers.study_mechanism_attacks import pgd_per_image

    x0 = torch.rand(3, 3, 8, 8)
    eps = torch.tensor([0.0, 2 / 255, 8 / 255])
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    x, loss = pgd_per_image(lambda z: (z ** 2).flatten(1).sum(1), x0, eps, 3, gens)
    dev = (x - x0).abs().flatten(1).amax(1)
    assert torch.all(dev <= eps + 1e-7) and dev[2] > 4 / 255 and x.min() >= 0 and x.max() <= 1


def test_mechanism_design_smoke(tmp_path):
    from prsl_kernels.drivers import study

    out, rep = tmp_path / "out", tmp_path / "rep"
    args = study.build_parser().parse_args(["--design", "mechanism", "--size", "smoke", "--output-dir", str(out),
                                           "--report-dir", str(rep), "--no-progress"])
    threads = torch.get_num_threads()
    summary = study.run(args)
    assert torch.get_num_threads() == threads
    saved = json.loads((rep / "summary.json").read_text())
    assert {(r["arm"], r["steps"]) for r in saved["treatment"]} == {
        (a, s) for a in ("ce", "prsl-k20-b1", "prsl-k20-b64") for s in (1, 2)}
    for r in saved["treatment"]:
        assert r["held_out_D_mean"] > 0 and r["grad_l1"] > 0 and r["spread"] >= 0
    assert saved["chosen_steps"] in (1, 2)
    p = saved["primary"]
    assert p["n_bases"] == 3 and len(p["ci95"]) == 2 and p["estimate"] == pytest.approx(summary["primary"]["estimate"])
    assert set(saved["competence"]) >= {"slope", "ci95", "p"}
    assert set(saved["attacks"]["by_arm"]) == {"ce", "prsl-k20-b64"}
    assert saved["provenance"]["commit"] and saved["provenance"]["reruns"] == []
    with open(rep / "records.csv") as f:
        recs = list(csv.DictReader(f))
    attacks = {r["attack"] for r in recs}
    assert attacks == {"clean", "bim", "apgd-ce", "apgd-margin", "bisect-margin", "min-eps-margin"}
    min_eps = [float(r["eps"]) for r in recs if r["attack"] == "min-eps-margin"]
    assert len(min_eps) == 6 * 4 and all(0 < e <= 16 / 255 + 1e-6 for e in min_eps)
    assert "## 1. Treatment check" in (rep / "report.md").read_text()
    assert (rep / "figures" / "treatment.png").is_file()

    # Resumable: a second run trains and attacks nothing and gives the same result.
    log_before = (out / "study.log").read_text()
    again = study.run(args)
    new = (out / "study.log").read_text()[len(log_before):]
    assert "(reused)" in new and again["primary"]["estimate"] == pytest.approx(summary["primary"]["estimate"])
    # The first invocation's provenance is kept; the second is listed after it.
    prov = json.loads((rep / "summary.json").read_text())["provenance"]
    assert prov["commit"] == saved["provenance"]["commit"] and len(prov["reruns"]) == 1
