"""BIM: the eps-ball and the valid image range are never left (in both spaces), the update is
torchattacks' BIM, the attacked loss rises, resuming an interrupted attack reproduces the
uninterrupted one; the CLI picks held-out images, the task and the processor by itself.
Tiny random models, a handful of 32x32 images; whole file ~40-60 s on 2 busy cores (the
PTB tokenizer JVM and one tiny fine-tuning run dominate)."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from prsl_kernels.drivers import checkpoints, data, models  # noqa: E402
from prsl_kernels.drivers.attack import (AttackConfig, ModelAttack, TeacherForcedCE, attack_items,  # noqa: E402
                                         build_parser, main, select_samples)
from prsl_kernels.drivers.attack_steps import bim, bim_step  # noqa: E402

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


def torchattacks_bim_update(images, ori_images, grad, eps, alpha, lo=0.0, hi=1.0):
    """torchattacks 3.5.1 ``BIM.forward``'s update, verbatim but for the bounds (its [0, 1] generalised
    to per-channel ``lo``/``hi``, so the same formula checks normalised space). Written out rather than
    imported: the formula is what is checked, whatever torchattacks is installed (the set-up installs it
    with ``--no-deps``, as its metadata asks for torchvision and requests~=2.25)."""
    adv_images = images + alpha * grad.sign()
    a = torch.clamp(ori_images - eps, min=lo) if isinstance(lo, float) else torch.maximum(ori_images - eps, lo)
    b = (adv_images >= a).float() * adv_images + (adv_images < a).float() * a
    c = (b > ori_images + eps).float() * (ori_images + eps) + (b <= ori_images + eps).float() * b
    return torch.clamp(c, max=hi) if isinstance(hi, float) else torch.minimum(c, hi)


def test_bim_step_is_torchattacks_update():
    g = torch.Generator().manual_seed(torch.seed() % 2**63)
    # Pixel space: images with exact 0 / 1 pixels (where the range binds), random gradients.
    x0 = torch.rand(3, 3, 8, 8, generator=g)
    x0[:, :, :2] = 0.0
    x0[:, :, -2:] = 1.0
    ours = theirs = x0.clone()
    for _ in range(6):
        grad = torch.randn(x0.shape, generator=g)
        ours = bim_step(ours, x0, grad, 0.05, 0.02, bounds=(0.0, 1.0))
        theirs = torchattacks_bim_update(theirs, x0, grad, 0.05, 0.02)
        # Both are min/max of the same float operations: equal to the bit.
        assert torch.equal(ours, theirs)
    assert (ours == 0).any() and (ours == 1).any()
    assert (((ours - x0).abs() - 0.05).abs() < 1e-6).any()       # the ball binds too
    # Normalised space, per-channel mean/std: the same formula with the image range mapped through them.
    mean = torch.tensor([0.48, 0.46, 0.41]).view(3, 1, 1)
    std = torch.tensor([0.27, 0.26, 0.28]).view(3, 1, 1)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    n0 = (x0 - mean) / std
    ours = theirs = n0.clone()
    for _ in range(6):
        grad = torch.randn(x0.shape, generator=g)
        ours = bim_step(ours, n0, grad, 0.5, 0.2, bounds=(lo, hi))
        theirs = torchattacks_bim_update(theirs, n0, grad, 0.5, 0.2, lo, hi)
        assert torch.equal(ours, theirs)
    pixels = ours * std + mean
    # 1e-6: mapping back to pixels rounds once (|x| <= 4, float32 eps 1.2e-7).
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert (pixels.abs() < 1e-6).any(), "the lower bound never bound: the test would not see it missing"


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


def test_normalized_attack_produces_valid_images(bundle, samples, tmp_path):
    """In the default normalised space every adversarial input maps back to pixels in
    [0, 1], and the run equals BIM in pixel space (torchattacks' update) with eps and alpha times
    the std, the model fed (x - mean) / std."""
    items = attack_items(samples[:3], "caption")
    eps, alpha, steps = 0.5, 0.1, 4      # big steps: the black backgrounds (pixel 0) hit the bound at once
    cfg = AttackConfig(rounds=1, steps_per_round=steps, eps=eps, alpha=alpha, max_new_tokens=4, batch_size=3)
    attack = ModelAttack(bundle, items, tmp_path / "n", cfg, NoScores(), progress=False)
    attack.run()
    x = torch.load(tmp_path / "n" / "state.pt", weights_only=True)["x"]
    x0 = attack._clean_inputs()
    mean, std = bundle.image_mean, bundle.image_std
    pixels = x * std + mean
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert (x - x0).abs().max() <= eps + 1e-6
    at_bound = (pixels.abs() < 1e-6) & ((x0 * std + mean).abs() < 1e-6) & (x != x0)
    assert not at_bound.any()                   # a black pixel never moved below black...
    assert ((x0 * std + mean).abs() < 1e-6).float().mean() > 0.3   # ...and there are many of them

    # The same attack in pixel space, through torchattacks' update rule.
    ce = TeacherForcedCE(bundle, [it.prompt for it in items], json_outputs(tmp_path / "n", 0),
                         lambda p: (p - mean) / std, "cpu")
    p0 = x0 * std + mean
    p = p0.clone()
    for _ in range(steps):
        p = p.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(ce(p), p)
        p = torchattacks_bim_update(p.detach(), p0, grad, eps * float(std.mean()), alpha * float(std.mean()))
    # The two paths round differently ((p - mean) / std vs x): a gradient within rounding of 0 may
    # take the other sign. Such pixels are few; a missing bound differs on every pixel it clips.
    agree = ((p - pixels).abs() <= 1e-5).float().mean()
    assert agree > 0.99, float(agree)


def json_outputs(model_dir, rnd):
    return [json.loads(line)["output"] for line in (model_dir / "rounds" / f"round_{rnd:03d}.jsonl").open()]


def test_generation_follows_checkpoint_config_without_warnings(bundle, samples, tmp_path, capfd):
    """The checkpoint's generation config sets beams and length unless given; generate
    does not warn about max_length / attention masks on every call (pad == eos as in GPT-2)."""
    import copy

    b = copy.copy(bundle)
    b.model = copy.deepcopy(bundle.model)
    b.model.generation_config.num_beams = 2
    b.model.generation_config.max_length = 5          # encoder-decoder: 4 new tokens after the start token
    assert b.generation_settings() == {"num_beams": 2, "max_new_tokens": 4}
    items = attack_items(samples[:2], "caption")
    attack = ModelAttack(b, items, tmp_path / "g", AttackConfig(rounds=0), NoScores(), progress=False)
    assert (attack.num_beams, attack.max_new_tokens) == (2, 4)
    attack.run()
    described = json.loads((tmp_path / "g" / "attack_config.json").read_text())["attack"]
    assert described["num_beams"] == 2 and described["max_new_tokens"] == 4
    explicit = ModelAttack(b, items, tmp_path / "e", AttackConfig(rounds=0, num_beams=1, max_new_tokens=3),
                           NoScores(), progress=False)
    assert (explicit.num_beams, explicit.max_new_tokens) == (1, 3)
    assert b.model.generation_config.max_length == 5    # lifted during generate only
    assert bundle.generation_settings() == {"num_beams": 1, "max_new_tokens": 24}

    b.tokenizer = copy.deepcopy(bundle.tokenizer)
    b.tokenizer.pad_token = b.tokenizer.eos_token
    capfd.readouterr()
    pv = b.pixel_values([s.image for s in samples[:2]])
    for _ in range(2):
        b.generate(pv, max_new_tokens=3)
    err = capfd.readouterr().err
    assert "max_length" not in err and "attention mask" not in err, err


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


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out.split("\noptions:", 1)[1]
    entries = {e.split()[0]: " ".join(e.split()) for e in text.split("\n  --")[1:]}
    for option, default in (("rounds", "3"), ("batch-size", "16"), ("subset", "held-out"), ("data-seed", "0")):
        assert f"(default: {default})" in entries[option], entries[option]


def test_checkpoint_without_processor_is_a_clear_error(bundle, tmp_path):
    """A folder without an image processor names --processor (no raw hub OSError);
    a Trainer checkpoint-N finds its run's; --processor works."""
    ckpt = tmp_path / "bare"
    bundle.save(ckpt)
    (ckpt / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="--processor"):
        checkpoints.load_bundle(ckpt)
    run = tmp_path / "run"
    bundle.save(run)
    inner = run / "checkpoint-2"
    bundle.save(inner)
    (inner / "preprocessor_config.json").unlink()
    (inner / "trainer_state.json").write_text("{}")
    assert checkpoints.processor_dir(inner) == run
    assert checkpoints.load_bundle(ckpt, processor_path=run).kind == models.ENCODER_DECODER
    with pytest.raises(SystemExit, match="--processor"):
        main(["--model", str(ckpt), "--output-dir", str(tmp_path / "out"), "--metrics", "exact_match",
              "--num-samples", "1", "--no-progress"])


def test_task_from_checkpoint(bundle, tmp_path):
    """No --task needed: prsl_finetune.json (also a checkpoint-N's run's), else the architecture."""
    from prsl_kernels.drivers.attack import _task_for

    cap = tmp_path / "cap"
    bundle.save(cap)
    assert _task_for([cap], None) == "caption"                     # VisionEncoderDecoder
    vqa = tmp_path / "vqa"
    (vqa / "checkpoint-3").mkdir(parents=True)
    (vqa / "prsl_finetune.json").write_text(json.dumps({"task": "vqa"}))
    assert _task_for([vqa], None) == "vqa" and _task_for([vqa / "checkpoint-3"], None) == "vqa"
    (tmp_path / "blip").mkdir()
    (tmp_path / "blip" / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    assert _task_for([tmp_path / "blip"], None) == "vqa"
    with pytest.raises(ValueError, match="different tasks"):
        _task_for([cap, vqa], None)
    assert _task_for([cap, vqa], "vqa") == "vqa"


def _args(**kw):
    ns = build_parser().parse_args(["--model", "m"])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_held_out_selection(tmp_path):
    """The attack takes the images fine-tuning held out of the same file, not the first N."""
    from prsl_kernels.drivers.data import Sample

    ann = tmp_path / "captions.json"
    ann.write_text("{}")
    samples = [Sample(id=f"coco-{i}") for i in range(10)]
    run = tmp_path / "run"
    run.mkdir()

    def info(**data):
        (run / "prsl_finetune.json").write_text(json.dumps({"task": "caption", "data": data}))

    info(source=str(ann), held_out_ids=["coco-8", "coco-9"])
    chosen, _ = select_samples(samples, _args(data=str(ann), num_samples=5), [run])
    assert [s.id for s in chosen] == ["coco-8", "coco-9"]
    chosen, _ = select_samples(samples, _args(data=str(ann), num_samples=5, subset="first"), [run])
    assert [s.id for s in chosen] == [f"coco-{i}" for i in range(5)]
    ids = tmp_path / "ids.txt"
    ids.write_text("coco-3\ncoco-1\n")
    chosen, _ = select_samples(samples, _args(data=str(ann), ids_file=str(ids)), [run])
    assert [s.id for s in chosen] == ["coco-3", "coco-1"]
    other = tmp_path / "val.json"                       # a file the run never trained on: its first N
    other.write_text("{}")
    chosen, _ = select_samples(samples, _args(data=str(other), num_samples=3), [run])
    assert [s.id for s in chosen] == ["coco-0", "coco-1", "coco-2"]
    info(source=str(ann), held_out_ids=[])
    with pytest.raises(ValueError, match="every image"):
        select_samples(samples, _args(data=str(ann)), [run])
    info(source=str(ann))                                # an older run: no ids recorded
    with pytest.raises(ValueError, match="--subset first"):
        select_samples(samples, _args(data=str(ann)), [run])


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


def test_cli_on_a_checkpoint_of_a_visual_genome_run(tmp_path):
    """The VQA path of docs/drivers.md end to end: fine-tune on a Visual Genome file whose images lie in
    VG_100K and VG_100K_2 (13.6), then attack an intermediate checkpoint-N (13.8) with neither
    --task (13.7) nor a subset: the attack takes the images fine-tuning held out (13.3)."""
    from PIL import Image

    from prsl_kernels.drivers import finetune

    rng = np.random.default_rng()
    root = tmp_path / "vg"
    entries = []
    for i in range(20):
        folder = root / ("VG_100K" if i % 2 else "VG_100K_2")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
        entries.append({"id": i, "qas": [{"question": "what is it?", "answer": f"noise {i % 3}"}]})
    qa = root / "question_answers.json"
    qa.write_text(json.dumps(entries))
    run = tmp_path / "run"
    finetune.train(finetune.FinetuneConfig(
        output_dir=str(run), task="vqa", model="tiny-blip2-opt", data=str(qa),
        image_dir=[str(root / "VG_100K"), str(root / "VG_100K_2")], eval_images=2, eval_samples=2, hidden=32,
        layers=1, heads=2, patch=8, image_size=32, num_query_tokens=4, vocab_size=300, batch_size=8, max_steps=2,
        save_steps=2, progress=False, max_new_tokens=3))
    held_out = json.loads((run / "prsl_finetune.json").read_text())["data"]["held_out_ids"]
    assert len(held_out) == 2
    out = tmp_path / "attack"
    main(["--model", str(run / "checkpoint-2"), "--data", str(qa), "--image-dir", str(root), "--rounds", "1",
          "--num-samples", "5", "--metrics", "exact_match", "vqa_accuracy", "--max-new-tokens", "3",
          "--output-dir", str(out), "--no-progress", "--no-report"])
    described = json.loads((out / "checkpoint-2" / "attack_config.json").read_text())
    assert described["attack"]["task"] == "vqa"
    assert [i.rsplit("-q", 1)[0] for i in described["ids"]] == held_out
    rec = [json.loads(line) for line in (out / "checkpoint-2" / "samples.jsonl").read_text().splitlines()]
    assert {r["round"] for r in rec} == {0, 1} and all(r["scores"]["clean"]["exact_match"] == 1.0
                                                       for r in rec if r["round"] == 0)


# --------------------------------------------------------------------------- pgd / apgd, targeted, worst case


@pytest.mark.parametrize("attack", ["pgd", "apgd"])
def test_pgd_and_apgd_keep_eps_exactly_on_the_saved_images(bundle, samples, tmp_path, attack):
    """In pixel space (their default) the saved adversarial images are within eps = 4/255 of the
    clean ones and in [0, 1], exactly (no tolerance, compared in float64), and the attacked loss
    rises; the random start is drawn per image, so it does not depend on the batching."""
    items = attack_items(samples[:3], "caption")
    cfg = AttackConfig(attack=attack, rounds=2, steps_per_round=3, eps=4 / 255, max_new_tokens=6, batch_size=2)
    out = tmp_path / attack
    run = ModelAttack(bundle, items, out, cfg, NoScores(), progress=False)
    assert run.cfg.space == "pixel"
    run.run()
    x, x0 = torch.load(out / "state.pt", weights_only=True)["x"], run._clean_inputs()
    assert x.dtype == torch.float32
    assert ((x.double() - x0.double()).abs() <= 4 / 255).all()
    assert (x >= 0).all() and (x <= 1).all() and (x != x0).any()
    losses = {}
    for line in (out / "samples.jsonl").read_text().splitlines():
        rec = json.loads(line)
        losses.setdefault(rec["round"], []).append(rec["attack_loss"])
    assert sum(losses[2]) > sum(losses[0])
    start = run._random_start(x0)
    assert torch.equal(run._random_start(x0[:2]), start[:2])
    assert ((start.double() - x0.double()).abs() <= 4 / 255).all() and (start != x0).all(1).any()


def test_targeted_attack_reports_success(bundle, samples, tmp_path):
    items = attack_items(samples[:2], "caption")
    target = "a big red circle"
    # eps 0.05 (not 4/255): the tiny model's target CE then falls by far more than float noise.
    cfg = AttackConfig(attack="pgd", rounds=2, steps_per_round=3, eps=0.05, target_text=target, max_new_tokens=6,
                       batch_size=2)
    from prsl_kernels.drivers.metrics import CaptionScorer

    with CaptionScorer(metrics=["exact_match"]) as scorer:  # no Java, no BERT model
        ModelAttack(bundle, items, tmp_path / "t", cfg, scorer, progress=False).run()
    recs = [json.loads(line) for line in (tmp_path / "t" / "samples.jsonl").read_text().splitlines()]
    from prsl_kernels.drivers.data import normalize_text
    for rec in recs:
        assert rec["target_success"] == (normalize_text(rec["output"]) == normalize_text(target))
    first, last = (json.loads((tmp_path / "t" / "rounds" / f"round_{r:03d}.json").read_text()) for r in (0, 2))
    assert 0.0 <= last["target_success_rate"] <= 1.0
    # Descending the target's CE: its loss falls.
    assert last["attack_loss"] < first["attack_loss"]
    from prsl_kernels.drivers.report import write_report

    write_report([tmp_path / "t"], tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Targeted attack: share of outputs equal to the target text" in report


class LengthScores:
    """A per-sample 'metric' known in advance: minus the output's length (shorter scores higher)."""

    def score_sets(self, sets):
        return [({}, [{"neg_length": -float(len(c))} for c in cands]) for cands, _ in sets]


def test_worst_case_over_references_keeps_the_worst_candidate(bundle, samples, tmp_path):
    """Round 1 of the worst case scores, per image, no better than attacking any single reference
    (its candidate j is exactly the attack of reference j from the same start)."""
    items = attack_items(samples[:2], "caption")
    assert all(len(it.references) >= 2 for it in items)
    common = dict(rounds=1, steps_per_round=2, max_new_tokens=6, batch_size=2, space="pixel", eps=0.05, alpha=0.02)
    ModelAttack(bundle, items, tmp_path / "w", AttackConfig(worst_case=True, **common), LengthScores(),
                progress=False).run()
    worst = [json.loads(line) for line in (tmp_path / "w" / "rounds" / "round_001.jsonl").read_text().splitlines()]
    single = ModelAttack(bundle, items, tmp_path / "s", AttackConfig(target="reference", **common), LengthScores(),
                         progress=False)
    single.run()
    first_ref = [json.loads(line) for line in (tmp_path / "s" / "rounds" / "round_001.jsonl").read_text().splitlines()]
    for w, s in zip(worst, first_ref):
        assert w["scores"]["reference"]["neg_length"] <= s["scores"]["reference"]["neg_length"]


def test_attack_cli_options(tmp_path):
    from prsl_kernels.drivers.attack import fraction

    assert fraction("4/255") == 4 / 255 and fraction("0.5") == 0.5
    args = build_parser().parse_args(["--model", "m", "--attack", "apgd", "--steps", "100", "--eps", "2/255",
                                      "--worst-case-over-references"])
    assert (args.attack, args.steps_per_round, args.eps, args.worst_case, args.space) == ("apgd", 100, 2 / 255,
                                                                                        True, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", "m", "--eps", "4/0"])
    for bad in (dict(attack="cw"), dict(target_text="x", worst_case=True), dict(target_text=" "),
                dict(attack="apgd", alpha=0.1)):
        with pytest.raises(ValueError):
            AttackConfig(**bad).validate()
