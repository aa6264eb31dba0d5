"""BIM: the eps-ball and pixel range are never left, the attacked loss rises, resuming
an interrupted attack reproduces the uninterrupted one. Tiny random models, a handful
of 32x32 images; whole file ~30-50 s on 2 busy cores (the PTB tokenizer JVM dominates)."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from prsl_kernels.drivers import data, models  # noqa: E402
from prsl_kernels.drivers.attack import (AttackConfig, ModelAttack, TeacherForcedCE, attack_items, bim,  # noqa: E402
                                         bim_step, main)

SIZE = models.TinySize(hidden=32, encoder_layers=1, decoder_layers=1, heads=2, patch=8, image_size=32, max_text=40)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def samples():
    return data.synthetic_dataset(5, seed=3, split="eval", image_size=32)


@pytest.fixture(scope="module")
def bundle(samples):
    texts = [c for s in data.synthetic_dataset(60, seed=1, image_size=32) for c in s.captions]
    return models.tiny_bundle("tiny-vit-gpt2", texts, size=SIZE, seed=0, vocab_size=300)


class NoScores:
    """Attack bookkeeping without the Java / BERT metrics (tested in test_metrics)."""

    def score_sets(self, sets):
        return [({}, [{"length": float(len(c))} for c in cands]) for cands, _ in sets]


def test_bim_step_projects_onto_ball_and_range():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=g)
    x = x0.clone()
    eps, alpha = 0.05, 0.02
    for _ in range(10):
        grad = torch.randn(x.shape, generator=g)
        new = bim_step(x, x0, grad, eps, alpha, bounds=(0.0, 1.0))
        assert (new - x0).abs().max() <= eps + 1e-6
        assert new.min() >= 0 and new.max() <= 1
        # Where neither projection binds, the step is exactly alpha * sign(grad).
        free = ((x + alpha * grad.sign() - x0).abs() < eps - 1e-6) & (x + alpha * grad.sign() > 0) \
            & (x + alpha * grad.sign() < 1)
        assert torch.allclose((new - x)[free], (alpha * grad.sign())[free])
        x = new
    assert (x - x0).abs().max() == pytest.approx(eps, abs=1e-6)   # after 10 steps of 0.02 the ball binds


def test_bim_per_channel_bounds_broadcast():
    lo = torch.tensor([-1.0, -2.0, -0.5]).view(3, 1, 1)
    hi = torch.tensor([1.0, 2.0, 0.5]).view(3, 1, 1)
    x0 = torch.zeros(2, 3, 4, 4)
    x = bim_step(x0, x0, torch.ones_like(x0), 10.0, 5.0, bounds=(lo, hi))
    assert torch.equal(x[:, 0], torch.ones(2, 4, 4)) and torch.equal(x[:, 2], torch.full((2, 4, 4), 0.5))


@pytest.mark.parametrize("target", ["reference", "clean"])
def test_bim_raises_attacked_loss(bundle, samples, target):
    x0 = bundle.pixel_values([s.image for s in samples])
    prompts = [""] * len(samples)
    texts = [s.captions[0] for s in samples] if target == "reference" else bundle.generate(x0, max_new_tokens=8)
    ce = TeacherForcedCE(bundle, prompts, texts, lambda x: x, "cpu")
    with torch.no_grad():
        before = ce.per_sample(x0)
    x = bim(ce, x0, x0, eps=0.5, alpha=0.01, steps=5)
    with torch.no_grad():
        after = ce.per_sample(x)
    assert (x - x0).abs().max() <= 0.5 + 1e-6
    assert (after > before).all(), (before, after)


def test_model_attack_pixel_mode_stays_in_range(bundle, samples, tmp_path):
    items = attack_items(samples[:3], "caption")
    cfg = AttackConfig(rounds=2, steps_per_round=3, space="pixel", eps=0.03, alpha=0.02, max_new_tokens=6,
                       batch_size=2)
    attack = ModelAttack(bundle, items, tmp_path / "m", cfg, NoScores(), progress=False)
    attack.run()
    state = torch.load(tmp_path / "m" / "state.pt", weights_only=True)
    x0 = attack._clean_inputs()
    assert state["round"] == 2
    assert x0.min() >= 0 and x0.max() <= 1                    # pixel space of the [-1, 1] normalised inputs
    assert (state["x"] - x0).abs().max() <= 0.03 + 1e-6
    assert state["x"].min() >= 0 and state["x"].max() <= 1
    assert (state["x"] != x0).any()
    losses = {}
    for line in (tmp_path / "m" / "samples.jsonl").read_text().splitlines():
        rec = json.loads(line)
        losses.setdefault(rec["round"], []).append(rec["attack_loss"])
    assert sorted(losses) == [0, 1, 2] and all(len(v) == 3 for v in losses.values())
    assert sum(losses[2]) > sum(losses[0])


def test_resumed_attack_equals_uninterrupted(bundle, samples, tmp_path):
    from prsl_kernels.drivers.metrics import CaptionScorer

    items = attack_items(samples[:4], "caption")
    cfg = AttackConfig(rounds=3, steps_per_round=2, eps=0.5, alpha=0.05, max_new_tokens=6, batch_size=3)
    # Real (Java) metrics here too, but not METEOR / BERTScore: their start-up is tested elsewhere.
    scorer = CaptionScorer(metrics=("bleu1", "rouge_l", "cider"))
    ModelAttack(bundle, items, tmp_path / "full", cfg, scorer, progress=False).run()
    ModelAttack(bundle, items, tmp_path / "cut", cfg, scorer, progress=False).run(stop_after=1)
    assert torch.load(tmp_path / "cut" / "state.pt", weights_only=True)["round"] == 1
    assert not (tmp_path / "cut" / "rounds" / "round_002.jsonl").exists()
    # A fresh object, as after a crash.
    ModelAttack(bundle, items, tmp_path / "cut", cfg, scorer, progress=False).run()

    def records(d):
        return [{k: v for k, v in json.loads(line).items() if k != "model"}
                for line in (tmp_path / d / "samples.jsonl").read_text().splitlines()]

    full, resumed = records("full"), records("cut")
    assert [r["round"] for r in full] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert len(full) == len(resumed)
    for a, b in zip(full, resumed):
        assert a["id"] == b["id"] and a["round"] == b["round"] and a["output"] == b["output"]
        assert a["scores"] == b["scores"]
        assert a["attack_loss"] == pytest.approx(b["attack_loss"], rel=1e-5)
    xa = torch.load(tmp_path / "full" / "state.pt", weights_only=True)["x"]
    xb = torch.load(tmp_path / "cut" / "state.pt", weights_only=True)["x"]
    assert torch.allclose(xa, xb, atol=1e-6)


def test_resume_refuses_other_settings(bundle, samples, tmp_path):
    items = attack_items(samples[:2], "caption")
    cfg = AttackConfig(rounds=1, eps=0.5, alpha=0.01, max_new_tokens=4)
    ModelAttack(bundle, items, tmp_path / "m", cfg, NoScores(), progress=False).run()
    other = AttackConfig(rounds=1, eps=0.25, alpha=0.01, max_new_tokens=4)
    with pytest.raises(RuntimeError, match="other settings"):
        ModelAttack(bundle, items, tmp_path / "m", other, NoScores(), progress=False).run()


def test_vqa_items_and_bad_settings(samples):
    items = attack_items(samples[:2], "vqa", questions_per_image=2)
    assert len(items) == 4 and items[0].prompt.startswith("Question: ") and items[0].references
    for bad in (dict(space="lab"), dict(target="nothing"), dict(rounds=-1), dict(eps=-0.1), dict(task="dance")):
        with pytest.raises(ValueError):
            AttackConfig(**bad).validate()


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit, match="not a checkpoint"):
        main(["--model", str(tmp_path), "--output-dir", str(tmp_path / "out")])


def test_vqa_attack_on_tiny_blip2(samples, tmp_path):
    size = models.TinySize(hidden=32, encoder_layers=1, decoder_layers=1, heads=2, patch=8, image_size=32,
                           max_text=40, num_query_tokens=4)
    texts = [t for s in data.synthetic_dataset(40, seed=1, image_size=32)
             for t in s.captions + [f"{data.vqa_prompt(q)} {a}" for q, a in s.qa]]
    blip = models.tiny_bundle("tiny-blip2-opt", texts, size=size, seed=0, vocab_size=300)
    items = attack_items(samples[:3], "vqa")
    x0 = blip.pixel_values([it.image for it in items])
    ce = TeacherForcedCE(blip, [it.prompt for it in items], [it.references[0] for it in items], lambda x: x, "cpu")
    x = bim(ce, x0, x0, eps=1.0, alpha=0.01, steps=3)
    with torch.no_grad():
        before, after = ce.per_sample(x0), ce.per_sample(x)
    assert (after > before).all(), (before, after)
    # The task defaults (eps 1.0, alpha 0.5) through the whole round loop.
    attack = ModelAttack(blip, items, tmp_path / "vqa", AttackConfig(task="vqa", rounds=1, max_new_tokens=4),
                         NoScores(), progress=False)
    attack.run()
    assert (attack.eps, attack.alpha) == (1.0, 0.5)
    x = torch.load(tmp_path / "vqa" / "state.pt", weights_only=True)["x"]
    assert (x - x0).abs().max() <= 1.0 + 1e-6
    rec = json.loads((tmp_path / "vqa" / "samples.jsonl").read_text().splitlines()[-1])
    assert rec["round"] == 1 and rec["prompt"].startswith("Question: ")
