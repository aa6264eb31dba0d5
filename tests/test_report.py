"""The report: the verdict on fabricated seeds, and a report (CSV, markdown, PNGs) produced from a
tiny real ``prsl-attack`` run (its statistics: ``test_stats.py``). ~25-40 s."""

import csv
import json
import random
import re
from pathlib import Path

import pytest

from prsl_kernels.drivers.metrics import METRICS
from prsl_kernels.drivers.report import METRIC_LABELS, load_run, significance, write_report

PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fake_run(root, name, mean, rng, rounds=2, n=8, model_path=""):
    """An attack folder as prsl-attack writes it, with BERTScore F1 ~ N(mean, 0.02) after round 0."""
    d = root / name
    (d / "rounds").mkdir(parents=True)
    cfg = {"task": "caption", "space": "normalized", "eps": 0.5, "alpha": 0.01, "steps_per_round": 1,
           "target": "clean", "num_beams": 1, "rounds": rounds}
    (d / "attack_config.json").write_text(json.dumps({"name": name, "attack": cfg, "run_info": {},
                                                      "model_path": model_path}))
    for r in range(rounds + 1):
        recs = []
        for i in range(n):
            f1 = 1.0 if r == 0 else min(1.0, rng.gauss(mean, 0.02))
            recs.append({"model": name, "id": str(i), "round": r, "output": "x", "attack_loss": 1.0 + r,
                         "scores": {"clean": {"bertscore_f1": f1}, "reference": {"bertscore_f1": f1 - 0.1}}})
        corpus = {k: {"bertscore_f1": sum(x["scores"][k]["bertscore_f1"] for x in recs) / n}
                  for k in ("clean", "reference")}
        (d / "rounds" / f"round_{r:03d}.jsonl").write_text("\n".join(map(json.dumps, recs)) + "\n")
        (d / "rounds" / f"round_{r:03d}.json").write_text(json.dumps(
            {"model": name, "round": r, "n": n, "attack_loss": 1.0 + r, "corpus": corpus}))
    return d


def test_verdict_on_fabricated_seeds(tmp_path):
    rng = random.Random(1)
    dirs, groups = [], {}
    for group, mean in (("CE", 0.80), ("same", 0.80), ("better", 0.95)):
        for seed in range(4):
            name = f"{group}-s{seed}"
            dirs.append(_fake_run(tmp_path / "runs", name, mean, rng))
            groups[name] = group
    runs = [load_run(d, groups[d.name]) for d in dirs]
    rows = {g: p for g, m, d, t, df, p in significance(runs, "CE", 2, "clean", ["bertscore_f1"])}
    assert rows["better"] < 0.01
    report = write_report(dirs, tmp_path / "out", groups=groups, baseline="CE")
    text = report.read_text()
    assert "`same` vs `CE` against the clean output: **no significant difference**" in text
    assert "`better` vs `CE` against the clean output: significant at 0.05 for BERTScore F1" in text
    assert "±" in text     # means over 4 seeds carry a confidence interval


def test_report_names_no_absolute_paths(tmp_path):
    """Checkpoints are named relative to the report's folder, so a committed report
    carries no machine's directories."""
    out = tmp_path / "out"
    model = out / "models" / "ce-s0"
    d = _fake_run(tmp_path / "runs", "ce-s0", 0.8, random.Random(0), model_path=str(model.resolve()))
    text = write_report([d], out).read_text()
    assert "`models/ce-s0`" in text and str(tmp_path) not in text


def test_committed_demo_report_is_relative():
    root = Path(__file__).resolve().parents[1] / "docs" / "demo-run"
    for path in root.rglob("*"):
        if path.suffix in (".md", ".csv", ".json"):
            text = path.read_text()
            assert not re.search(r"(`|\(|\s|,)(/|[A-Za-z]:\\)(home|work|root|tmp|Users|mnt|data)\b", text), path


def test_every_metric_has_a_label():
    assert set(METRICS) <= set(METRIC_LABELS)


def _tiny_checkpoint(tmp_path):
    """A tiny ViT-GPT2 captioner saved as a checkpoint folder."""
    pytest.importorskip("transformers")
    from prsl_kernels.drivers import data, models

    texts = [c for s in data.synthetic_dataset(40, seed=1, image_size=32) for c in s.captions]
    size = models.TinySize(hidden=32, encoder_layers=1, decoder_layers=1, heads=2, image_size=32, max_text=40)
    ckpt = tmp_path / "ckpt"
    models.tiny_bundle("tiny-vit-gpt2", texts, size=size, seed=0, vocab_size=300).save(ckpt)
    return ckpt


def test_report_from_tiny_attack_run(tmp_path):
    from prsl_kernels.drivers.attack import main

    ckpt = _tiny_checkpoint(tmp_path)
    out = tmp_path / "attack"
    main(["--model", str(ckpt), str(ckpt), "--name", "first", "second", "--num-samples", "3", "--rounds", "2",
          "--metrics", "bleu1", "bleu4", "rouge_l", "cider", "--max-new-tokens", "6", "--batch-size", "2",
          "--output-dir", str(out), "--no-progress"])
    for name in ("first", "second"):
        lines = (out / name / "samples.jsonl").read_text().splitlines()
        assert len(lines) == 3 * 3
        rec = json.loads(lines[-1])
        assert set(rec) >= {"id", "round", "output", "scores"} and set(rec["scores"]) == {"reference", "clean"}
        assert set(rec["scores"]["clean"]) == {"bleu1", "bleu4", "rouge_l", "cider"}
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["model"] for r in rows} == {"first", "second"}
    assert {int(r["round"]) for r in rows} == {0, 1, 2}
    clean0 = [r for r in rows if r["round"] == "0" and r["against"] == "clean" and r["metric"] == "rouge_l"]
    assert all(float(r["mean"]) == pytest.approx(1.0) for r in clean0)    # round 0 is the clean output itself
    text = (out / "report.md").read_text()
    for section in ("## Clean quality", "## Robustness", "## Proportion of outputs below", "## Figures"):
        assert section in text
    for fig in ("score_vs_round_clean.png", "score_vs_round_reference.png", "below_thresholds.png",
                "attack_loss.png", "image_grid.png"):
        path = out / "figures" / fig
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000, fig
        assert f"figures/{fig}" in text


def test_report_without_threshold_metrics(tmp_path):
    """Metrics with no threshold figure (exact match, the natural choice without BERTScore or
    Java): the attack and its report finish; the threshold section and figure are left out."""
    from prsl_kernels.drivers.attack import main

    ckpt = _tiny_checkpoint(tmp_path)
    out = tmp_path / "attack"
    main(["--model", str(ckpt), "--num-samples", "2", "--rounds", "1", "--metrics", "exact_match",
          "--max-new-tokens", "4", "--batch-size", "2", "--output-dir", str(out), "--no-progress"])
    text = (out / "report.md").read_text()
    assert "## Robustness" in text and "Exact match" in text
    assert "## Proportion of outputs below" not in text and not (out / "figures" / "below_thresholds.png").exists()
