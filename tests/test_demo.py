"""The embedded end-to-end run at its smallest size: fine-tune CE and PRSL, attack,
score with every metric, write the report. ~40-60 s on 2 busy cores (METEOR's JVM
start-up and the encoder load are most of it; the training is a few steps)."""

import csv
import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("pycocoevalcap")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_demo_smoke(tmp_path, capfd):
    from prsl_kernels.drivers.demo import main

    out = tmp_path / "demo"
    assert main(["--size", "smoke", "--output-dir", str(out), "--no-progress"]) == 0
    # Console output is for people: the console carries a header, one line per model, the report path and the verdict;
    # Trainer's log dicts, load bars and the Java tokenizer's chatter go to files (or nowhere).
    console = capfd.readouterr()
    lines = [ln for ln in console.out.splitlines() if ln.strip()]
    assert len(lines) <= 1 + 2 + 2, console.out
    assert sum(ln.strip().startswith(("ce-s0", "prsl-k6-s0")) for ln in lines) == 2, console.out
    for noise in ("{'loss'", "'train_runtime'", "PTBTokenizer", "Loading weights", "Writing model shards"):
        assert noise not in console.out + console.err, noise
    log = (out / "demo.log").read_text()
    assert "ce-s0" in log and "prsl-k6-s0" in log and "FinetuneConfig(" in log
    text = (out / "report.md").read_text()
    assert "PRSL embedded demo" in text and "| CE |" in text and "| PRSL k=6 |" in text
    assert "Wall time:" in text and "## Training" in text
    # One seed per configuration: the report must say a test is impossible, not invent one.
    assert "no significance test is possible" in text
    for fig in ("score_vs_round_clean.png", "score_vs_round_reference.png", "below_thresholds.png",
                "image_grid.png"):
        assert (out / "figures" / fig).read_bytes()[:4] == b"\x89PNG"
    with open(out / "summary.csv") as f:
        metrics = {r["metric"] for r in csv.DictReader(f)}
    assert metrics >= {"bleu1", "bleu4", "meteor", "rouge_l", "cider", "bertscore_f1", "attack_ce"}
    for name in ("ce-s0", "prsl-k6-s0"):
        assert "ce" in (out / "models" / name / "log.jsonl").read_text()
        info = json.loads((out / "models" / name / "prsl_finetune.json").read_text())
        assert info["loss"]["name"] == ("ce" if name.startswith("ce") else "prsl")
        assert (out / "attack" / name / "samples.jsonl").is_file()
