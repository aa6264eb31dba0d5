"""Metrics on hand-made cases with known values, through the real packages.

One scorer for the module: METEOR's JVM takes ~20 s to load its tables, so it is
started once. Whole file: ~40-60 s on 2 busy cores.
"""

import json
import math

import pytest

pytest.importorskip("bert_score")
pytest.importorskip("pycocoevalcap")

from prsl_kernels.drivers.metrics import (MAX_SCORE, METRICS, NO_JAVA_METRICS, UNIT_METRICS,  # noqa: E402
                                          CaptionScorer, bertscore_layers, embedded_bertscore_model, vqa_accuracy,
                                          vqa_normalize)

A = "a large red circle in the top left corner"
B = "two small green squares beside a blue triangle"
C = "one yellow star over a calm dark sea"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scorer(one_torch_thread):
    with CaptionScorer() as s:
        yield s


def test_identical_strings_score_one(scorer):
    corpus, per = scorer.score([A, B], [[A, C], [B]])
    for s in per:
        for m in ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "bertscore_f1"):
            assert s[m] == pytest.approx(1.0, abs=1e-5), m
    for m in ("bleu1", "bleu4", "meteor", "rouge_l", "bertscore_f1"):
        assert corpus[m] == pytest.approx(1.0, abs=1e-5), m


def test_cider_hand_case(scorer):
    # Two images with disjoint words: each n-gram has document frequency 1 of 2, so a
    # candidate equal to its single reference has cosine 1 for n = 1..4, no length
    # penalty, and CIDEr-D = 10 * mean(1, 1, 1, 1) = 10; a candidate sharing nothing with
    # its reference scores 0. The corpus CIDEr-D is the mean, 5.
    corpus, per = scorer.score([A, C], [[A], [B]])
    assert per[0]["cider"] == pytest.approx(10.0, rel=1e-9)
    assert per[1]["cider"] == pytest.approx(0.0, abs=1e-12)
    assert corpus["cider"] == pytest.approx(5.0, rel=1e-9)


def test_bleu_hand_case(scorer):
    # "the cat sat on the mat" vs "the cat sat on a mat": clipped n-gram precisions
    # p1 = 5/6 ("the" counts once), p2 = 3/5, p3 = 2/4, p4 = 1/3; equal lengths, so no
    # brevity penalty and BLEU-n is the geometric mean of p1..pn.
    corpus, per = scorer.score(["the cat sat on the mat"], [["the cat sat on a mat"]])
    p = (5 / 6, 3 / 5, 2 / 4, 1 / 3)
    for n in range(1, 5):
        assert per[0][f"bleu{n}"] == pytest.approx(math.prod(p[:n]) ** (1 / n), rel=1e-6)
        assert corpus[f"bleu{n}"] == pytest.approx(math.prod(p[:n]) ** (1 / n), rel=1e-6)
    # ROUGE-L: LCS "the cat sat on mat" = 5 of 6 both ways; F with beta 1.2 is then 5/6.
    assert per[0]["rouge_l"] == pytest.approx(5 / 6, rel=1e-6)


def test_corpus_and_mean_differ_where_they_should(scorer):
    cands = [A, B, "zebra"]
    refs = [[A], [B], [C]]
    corpus, per = scorer.score(cands, refs)
    means = {m: sum(s[m] for s in per) / len(per) for m in METRICS}  # per-sample means, as the report takes
    # Corpus BLEU pools clipped counts (17 of 18 candidate words match) and applies one
    # brevity penalty (candidates 18 words, references 25): 17/18 * exp(1 - 25/18);
    # the per-sample mean is (1 + 1 + 0) / 3 (the one-word output has a huge penalty).
    assert corpus["bleu1"] == pytest.approx(17 / 18 * math.exp(1 - 25 / 18), rel=1e-6)
    assert means["bleu1"] == pytest.approx(2 / 3, abs=1e-6)
    assert means["meteor"] == pytest.approx(2 / 3, abs=1e-6)
    for m in ("rouge_l", "cider", "bertscore_f1"):
        assert corpus[m] == pytest.approx(means[m], rel=1e-9, abs=1e-12), m
    assert sum(s["rouge_l"] < 0.9 for s in per) == 1   # the report's "below@0.9": 1 of 3


def test_bertscore_matches_bert_score_package(scorer):
    from bert_score import BERTScorer

    cands = [A, "a big red disc at the upper left", "", B]
    refs = [[A, B], [A, C], [B], [C, "green squares next to a triangle"]]
    _, per = scorer.score(cands, refs)
    reference = BERTScorer(model_type=embedded_bertscore_model(), num_layers=6)
    _, _, f1 = reference.score([cands[i] for i in (0, 1, 3)], [refs[i] for i in (0, 1, 3)])
    for j, i in enumerate((0, 1, 3)):
        assert per[i]["bertscore_f1"] == pytest.approx(float(f1[j]), abs=1e-5)
    assert per[2]["bertscore_f1"] == 0.0   # empty candidate: 0, as bert_score defines it
    assert 0.5 < per[1]["bertscore_f1"] < 1.0   # a paraphrase scores high but below identity


def test_empty_and_unprintable_outputs(scorer):
    corpus, per = scorer.score(["", "\x08\x08 |||"], [[A], [B]])
    for s in per:
        for m in METRICS:
            assert math.isfinite(s[m]) and s[m] == pytest.approx(0.0, abs=1e-6), m
    assert corpus["meteor"] == 0.0
    # Empty references (an attack scored against an empty clean output): a non-empty output
    # scores 0 against them, an empty one is identical (next test).
    corpus, per = scorer.score(["a red circle", "blue"], [[""], ["\x08"]])
    assert corpus["cider"] == 0.0 and all(s["cider"] == 0.0 and s["bertscore_f1"] == 0.0 for s in per)


def test_identical_outputs_score_the_maximum_on_every_metric(scorer):
    """Unchanged outputs are never "attacked". An empty output against itself gave
    ROUGE-L 1 but BLEU / METEOR / BERTScore 0; a one-word answer BLEU-2..4 ~ 0 against itself."""
    cands = ["", "yes", "Two.", A, "a red circle"]
    refs = [[""], ["yes"], ["two", "2"], [A.upper() + "."], ["a blue circle"]]
    corpus, per = scorer.score(cands, refs)
    for i in range(4):
        assert per[i] == {m: MAX_SCORE[m] for m in METRICS}, (cands[i], per[i])
    assert per[4]["exact_match"] == 0.0 and per[4]["bleu4"] < 1 and per[4]["rouge_l"] < 1
    for m in UNIT_METRICS:
        assert not any(s[m] < 0.9 for s in per[:4]), m
    for m in ("rouge_l", "cider", "bertscore_f1", "exact_match", "vqa_accuracy"):
        assert corpus[m] == pytest.approx(sum(s[m] for s in per) / len(per)), m


def test_vqa_accuracy():
    # The VQA evaluation's normalisation: articles, punctuation and number words.
    assert vqa_normalize("The two dogs.") == "2 dogs" and vqa_normalize("red, white") == "red white"
    assert vqa_accuracy("Two", ["2"]) == 1.0 and vqa_accuracy("a cat", ["dog"]) == 0.0
    # min(1, matches / 3) with many references; with fewer, their number is the denominator.
    assert vqa_accuracy("yes", ["yes", "yes", "no", "yes", "no"]) == 1.0
    assert vqa_accuracy("no", ["yes", "yes", "no", "yes", "no"]) == pytest.approx(2 / 3)
    assert vqa_accuracy("no", ["yes", "no"]) == pytest.approx(1 / 2)


def test_java_is_checked_at_start(monkeypatch, capfd):
    """Without Java the error says so and names the metrics that need none
    (it was ``[Errno 2] No such file or directory: 'java'`` mid-run)."""
    import prsl_kernels.drivers.metrics as metrics_mod

    # The PTB tokenizer's own report ("PTBTokenizer tokenized N tokens") stays off the console.
    capfd.readouterr()
    CaptionScorer(metrics=("rouge_l",)).score([A], [[B]])
    assert "PTBTokenizer" not in capfd.readouterr().err
    monkeypatch.setattr(metrics_mod.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="need Java") as err:
        CaptionScorer(metrics=("bleu4", "bertscore_f1"))
    assert " ".join(NO_JAVA_METRICS) in str(err.value) and "bleu4" in str(err.value)
    corpus, per = CaptionScorer(metrics=("exact_match", "vqa_accuracy")).score(["yes", "no"], [["yes"], ["yes"]])
    assert [p["exact_match"] for p in per] == [1.0, 0.0] and corpus["vqa_accuracy"] == 0.5


def test_score_sets_equal_separate_calls(scorer):
    s1 = ([A, B, C], [[A], [C], [B, C]])
    s2 = ([B, "a red circle"], [[B], [A]])
    joint = scorer.score_sets([s1, s2])
    for (cands, refs), (corpus, per) in zip((s1, s2), joint):
        c2, p2 = scorer.score(cands, refs)
        assert corpus == pytest.approx(c2)
        for a, b in zip(per, p2):
            assert a == pytest.approx(b)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown metrics"):
        CaptionScorer(metrics=("bleu", "spice"))
    s = CaptionScorer(metrics=("bleu1",))
    with pytest.raises(ValueError, match="candidates"):
        s.score([A], [[A], [B]])
    with pytest.raises(ValueError, match="at least one reference"):
        s.score([A], [[]])
    with pytest.raises(FileNotFoundError):
        CaptionScorer(bertscore_model="/nonexistent/t5-base", metrics=("bertscore_f1",)).score([A], [[A]])


def test_bertscore_layer_counts(tmp_path):
    # The paper's encoders get bert_score's tuned layers; others their last layer.
    for name, layers in (("t5-base", 11), ("deberta-xlarge", 18), ("models--microsoft--deberta-xlarge", 18)):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"num_hidden_layers": 99}))
        assert bertscore_layers(d) == layers
    d = tmp_path / "my-encoder"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"num_hidden_layers": 7}))
    assert bertscore_layers(d) == 7
    assert bertscore_layers(embedded_bertscore_model()) == 6
