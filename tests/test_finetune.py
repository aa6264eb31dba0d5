"""The fine-tuning driver (prsl_kernels/drivers/finetune.py) and the tiny presets (models.py).

Slowest here: test_torchrun_two_processes (~20-40 s, two processes) and
test_resume_equals_uninterrupted (three short runs).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from prsl_kernels.drivers import checkpoints, data, finetune, models


def tiny(out, **kw):
    cfg = dict(output_dir=str(out), train_images=48, eval_images=8, eval_samples=8, hidden=32, layers=1,
               heads=2, batch_size=8, max_steps=8, lr=1e-2, warmup_ratio=0.0, schedule="constant", logging_steps=2,
               progress=False,
               vocab_size=300, train_references="first", max_new_tokens=6, num_query_tokens=4)
    cfg.update(kw)
    return finetune.FinetuneConfig(**cfg)


def _log(out):
    return [json.loads(line) for line in (out / finetune.LOG_FILE).read_text().splitlines()]


def _train_losses(out):
    return [(r["step"], r["loss"]) for r in _log(out) if "loss" in r]


def _weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("preset", models.PRESETS)
def test_preset_batches_align_labels(preset):
    samples = data.synthetic_dataset(3, seed=0)
    bundle = models.tiny_bundle(preset, data.synthetic_corpus(), size=models.TinySize(hidden=32, heads=2,
                                                                                      num_query_tokens=4))
    assert len(bundle.tokenizer) > 100
    ex = data.vqa_examples(samples)[:3]
    batch = bundle.batch(ex)
    labels = batch.pop("labels")
    logits, targets = bundle.align(bundle.model(**batch).logits, labels)
    assert logits.shape[:2] == targets.shape
    for row, e in enumerate(ex):
        # the counted targets are exactly the answer's tokens followed by eos
        want = bundle.tokenizer(e.target, add_special_tokens=False)["input_ids"] + [bundle.tokenizer.eos_token_id]
        assert targets[row][targets[row] != -100].tolist() == want
        # and each is predicted from the position holding the previous token
        ids = batch["input_ids" if bundle.kind == models.BLIP2 else "decoder_input_ids"][row]
        pos = (targets[row] != -100).nonzero().flatten()
        assert ids[pos[1:]].tolist() == want[:-1]
    lo, hi = bundle.pixel_range()
    assert torch.all(batch["pixel_values"] >= lo - 1e-6) and torch.all(batch["pixel_values"] <= hi + 1e-6)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("loss", ["ce", "prsl"])
def test_tiny_vit_gpt2_trains_and_saves(tmp_path, loss):
    out = finetune.train(tiny(tmp_path / loss, loss=loss, k=6, b=1.0))
    losses = [v for _, v in _train_losses(out)]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5, losses
    rec = [r for r in _log(out) if "ce" in r and "loss" in r]
    # Trainer's "loss" averages the steps' means; ce/penalty are token-weighted over the window.
    assert all(r["ce"] + r["penalty"] == pytest.approx(r["loss"], rel=1e-2) for r in rec)
    assert all((r["penalty"] > 0) == (loss == "prsl") for r in rec)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rec)  # token accuracy (RowStats.correct)
    # mean entropy (RowStats.entropy; its value against float64: tests/test_entropy.py)
    assert rec and all(np.isfinite(r["entropy"]) and r["entropy"] > 0.0 for r in rec)
    info = json.loads((out / finetune.RUN_INFO).read_text())
    assert info["loss"] == {"name": loss, "k": 6 if loss == "prsl" else 0, "b": 1.0 if loss == "prsl" else 0.0,
                            "window_start": 0, "backend": "auto"}
    assert info["data"]["source"] == "synthetic" and info["steps"] == 8 and info["completed"]
    assert 0.0 <= info["final_eval"]["exact_match"] <= 1.0 and info["final_eval"]["n"] == 8
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (out / name).is_file(), name
    bundle = checkpoints.load_bundle(out)
    assert bundle.kind == models.ENCODER_DECODER
    pv = bundle.pixel_values([s.image for s in data.synthetic_dataset(2, seed=5)])
    assert len(bundle.generate(pv, max_new_tokens=4)) == 2


def test_sincos_position_codes_tell_every_patch_apart():
    codes = models.sincos_2d(32, 8)
    assert codes.shape == (64, 32) and codes.abs().max() <= 1
    # Every pair of grid cells gets clearly different codes, neighbours included.
    dist = torch.cdist(codes, codes) + torch.eye(64) * 1e9
    assert dist.min() > 0.5
    # Their scale is that of a patch embedding, not of a std-0.02 random init.
    assert codes.norm(dim=1).mean() > 3
    with pytest.raises(ValueError, match="divide by 4"):
        models.sincos_2d(30, 8)


def test_tiny_blip2_opt_vqa_trains(tmp_path):
    out = finetune.train(tiny(tmp_path, model="tiny-blip2-opt", task="vqa", loss="prsl", k=20, b=0.5,
                              train_images=16, max_steps=8))
    losses = [v for _, v in _train_losses(out)]
    assert losses[-1] < losses[0] - 0.5, losses
    bundle = checkpoints.load_bundle(out)
    assert bundle.kind == models.BLIP2
    ex = data.vqa_examples(data.synthetic_dataset(2, seed=9))[:2]
    outs = bundle.generate(bundle.batch(ex, with_labels=False)["pixel_values"], [e.prompt for e in ex],
                           max_new_tokens=3)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)


def test_blip2_checkpoint_without_image_token_is_a_clear_error(tmp_path, capsys):
    """An older BLIP-2 snapshot (no image_token_index) failed in the collator with
    'Could not infer dtype of NoneType'; it is refused at load, saying what is missing and how to fix it."""
    size = models.TinySize(hidden=32, encoder_layers=1, decoder_layers=1, heads=2, num_query_tokens=4)
    ckpt = tmp_path / "blip2-old"
    models.tiny_bundle("tiny-blip2-opt", data.synthetic_corpus(), size=size, vocab_size=300).save(ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    assert config.pop("image_token_index") is not None
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="image_token_index") as err:
        checkpoints.load_bundle(ckpt)
    assert "<image>" in str(err.value) and "resize_token_embeddings" in str(err.value)
    rc = finetune.main(["--output-dir", str(tmp_path / "out"), "--task", "vqa", "--model", str(ckpt),
                        "--max-steps", "1"])
    assert rc == 2 and "image_token_index" in capsys.readouterr().err


def test_prsl_released_runs(tmp_path, capsys):
    out = finetune.train(tiny(tmp_path, loss="prsl-released", k=6, window_start=0, b=1e-3, max_steps=4, lr=None))
    rec = [r for r in _log(out) if "penalty" in r]
    assert rec and all(r["penalty"] != 0 for r in rec)
    info = json.loads((out / finetune.RUN_INFO).read_text())
    assert info["loss"]["name"] == "prsl-released"
    assert info["config"]["lr"] == finetune.LR_DEFAULTS["preset"]      # the preset's default
    # No raw Trainer log dicts on the console (they are in log.jsonl).
    assert "{'loss'" not in capsys.readouterr().out


def test_ce_and_penalty_logged_when_logging_steps_exceed_max_steps(tmp_path):
    """With --logging-steps > --max-steps the only line is Trainer's final one."""
    out = finetune.train(tiny(tmp_path, loss="prsl", k=6, max_steps=2, logging_steps=50))
    rec = [r for r in _log(out) if "ce" in r]
    assert len(rec) == 1 and rec[0]["tokens"] > 0 and rec[0]["penalty"] > 0 and "train_loss" in rec[0]
    # train_loss is the mean of the 2 steps' means, ce/penalty token-weighted over them: close, not equal.
    assert rec[0]["ce"] + rec[0]["penalty"] == pytest.approx(rec[0]["train_loss"], rel=5e-2)


def test_learning_rate_defaults_per_model_kind(tmp_path, capsys):
    """1e-3 trains the tiny presets from scratch; a local checkpoint gets 5e-5."""
    assert finetune.default_lr("tiny-vit-gpt2") == 1e-3 and finetune.default_lr(str(tmp_path)) == 5e-5
    assert finetune.parse_args(["--output-dir", str(tmp_path)]).lr is None       # resolved in train()
    assert finetune.parse_args(["--output-dir", str(tmp_path), "--lr", "2e-4"]).lr == 2e-4
    with pytest.raises(SystemExit):
        finetune.parse_args(["--help"])
    text = capsys.readouterr().out.split("\noptions:", 1)[1]
    entries = {e.split()[0]: " ".join(e.split()) for e in text.split("\n  --")[1:]}
    assert "1e-03" in entries["lr"] or "0.001" in entries["lr"]
    assert "5e-05" in entries["lr"]
    for option in ("epochs", "warmup-ratio", "weight-decay", "grad-accum", "hidden", "schedule"):
        assert "(default:" in entries[option], entries[option]


def test_gradient_accumulation_matches_larger_batch(tmp_path):
    """batch 8 x accumulation 2 == batch 16: num_items_in_batch reaches the loss.

    Compared under SGD without clipping, where the weights are a smooth function of the
    gradients: two summation orders differ by float rounding (~1e-7 relative), and so do the
    weights. Under Adam a parameter whose true gradient is exactly 0 (the key bias of
    cross-attention: softmax is shift-invariant) moves by +-lr on the sign of that rounding
    noise, which differs between CPUs (AVX2 / AVX-512) and thread counts; clipping to norm 1
    would hide a wrongly scaled loss. A per-micro-batch mean instead of the token mean changes
    the update by ~lr * |g| * 1e-1, far above the tolerance (checked below).
    """
    run = dict(max_steps=3, loss="prsl", k=6, optim="sgd", max_grad_norm=0.0, lr=0.5, weight_decay=0.0)
    a = finetune.train(tiny(tmp_path / "a", batch_size=16, **run))
    b = finetune.train(tiny(tmp_path / "b", batch_size=8, grad_accum=2, **run))
    c = finetune.train(tiny(tmp_path / "c", batch_size=8, **run))       # the negative control: other data
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-6, msg=name)
    # The tolerance is tight enough to see training on other data (so also a mis-weighted loss).
    assert max((wc[n] - wa[n]).abs().max().item() for n in wa) > 1e-3


def test_resume_equals_uninterrupted(tmp_path):
    """Stopped after step 4 (a checkpoint), resumed to 6 == 6 steps in one go: same weights and log."""
    run = dict(max_steps=6, save_steps=2, loss="prsl", k=6)
    full = finetune.train(tiny(tmp_path / "full", **run))
    finetune.train(tiny(tmp_path / "part", stop_at_step=4, **run))
    assert not (tmp_path / "part" / "model.safetensors").exists()
    assert finetune.last_checkpoint(tmp_path / "part").name == "checkpoint-4"
    # Every checkpoint can be loaded (and attacked) on its own.
    assert (tmp_path / "part" / "checkpoint-4" / "preprocessor_config.json").is_file()
    assert checkpoints.processor_dir(tmp_path / "part" / "checkpoint-4") == tmp_path / "part" / "checkpoint-4"
    with pytest.raises(FileExistsError, match="--resume"):
        finetune.train(tiny(tmp_path / "part", **run))
    resumed = finetune.train(tiny(tmp_path / "part", resume=True, **run))
    wf, wr = _weights(full), _weights(resumed)
    assert wf.keys() == wr.keys()
    for name in wf:
        torch.testing.assert_close(wr[name], wf[name], rtol=1e-5, atol=1e-6, msg=name)
    lf, lr = _train_losses(full), _train_losses(resumed)
    assert [s for s, _ in lf] == [s for s, _ in lr] == [2, 4, 6]  # no lost or repeated steps
    np.testing.assert_allclose([v for _, v in lr], [v for _, v in lf], rtol=1e-5)
    ce_full = [r["ce"] for r in _log(full) if "ce" in r]
    ce_resumed = [r["ce"] for r in _log(resumed) if "ce" in r]
    np.testing.assert_allclose(ce_resumed, ce_full, rtol=1e-5)


def test_coco_and_visual_genome_files(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    images, anns, vg = [], [], []
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg"})
        anns += [{"image_id": i, "caption": f"a photo number {i} with noise"},
                 {"image_id": i, "caption": f"random pixels picture {i}"}]
        vg.append({"id": i, "qas": [{"question": "what is it?", "answer": f"noise {i}"}]})
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    (tmp_path / "question_answers.json").write_text(json.dumps(vg))
    out = finetune.train(tiny(tmp_path / "coco", data=str(tmp_path / "captions.json"), max_steps=2,
                              train_references="all", loss="prsl", k=6))
    info = json.loads((out / finetune.RUN_INFO).read_text())
    assert info["data"]["train_images"] == 11 and info["data"]["eval_images"] == 1
    assert info["data"]["train_examples"] == 22
    # The held-out image is recorded (the attack picks it); no synthetic-only fields.
    assert info["data"]["held_out_ids"] == ["coco-9"]        # ids sort as strings: 0, 1, 10, 11, 2, ..., 9
    for key in ("data_seed", "n_captions", "max_objects", "image_size"):
        assert key not in info["data"], key
    for key in finetune.SYNTHETIC_ONLY:
        assert key not in info["config"], key
    out = finetune.train(tiny(tmp_path / "vg", task="vqa", data=str(tmp_path / "question_answers.json"),
                              max_steps=2, loss="ce"))
    assert json.loads((out / finetune.RUN_INFO).read_text())["data"]["train_examples"] == 11


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("argv, message", [
    (["--loss", "focal"], "invalid choice"),
    (["--k", "-1"], "--k must be >= 0"),
    (["--loss", "prsl-released", "--k", "4", "--window-start", "4"], "window-start"),
    (["--model", "/nonexistent/ckpt"], "neither"),
    (["--data", "/nonexistent/ann.json"], "does not exist"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--lr", "-1"], "--lr must be > 0"),
    ([], "--output-dir"),
])
def test_bad_arguments(tmp_path, capsys, argv, message):
    base = [] if not argv else ["--output-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as err:
        finetune.parse_args(base + argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_k_larger_than_vocabulary(tmp_path, capsys):
    rc = finetune.main(["--output-dir", str(tmp_path), "--k", "100000", "--train-images", "8", "--hidden", "32",
                        "--heads", "2", "--layers", "1", "--max-steps", "1"])
    assert rc == 2 and "exceeds the vocabulary" in capsys.readouterr().err


def test_malformed_data_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "captions.json"
    bad.write_text('{"images": [], "annotations": 3}')
    rc = finetune.main(["--output-dir", str(tmp_path / "out"), "--data", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and "captions.json" in err and "annotations" in err


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        finetune.train(tiny(tmp_path, resume=True))


# --------------------------------------------------------------------------- data parallel



def test_torchrun_two_processes(tmp_path):
    """Two CPU processes (gloo) through torchrun: Trainer handles the data parallelism.

    ce / penalty / tokens in log.jsonl are global (all-reduced), like "loss": the two
    processes' batches of 4 are the single process's batch of 8 (same sampler order), so step 1
    (computed with the initial weights) logs the same token count and CE. Only rank 0 reports.
    """
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "prsl_kernels.drivers.finetune", "--output-dir", str(out), "--train-images", "32",
           "--eval-images", "4", "--eval-samples", "4", "--hidden", "32", "--layers", "1", "--heads", "2",
           "--batch-size", "4", "--max-steps", "2", "--logging-steps", "1", "--vocab-size", "300",
           "--train-references", "first", "--loss", "prsl", "--k", "6", "--no-progress", "--max-new-tokens", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((out / finetune.RUN_INFO).read_text())
    assert info["world_size"] == 2 and info["steps"] == 2 and info["completed"]
    assert (out / "model.safetensors").is_file()
    reports = [ln for ln in proc.stdout.splitlines() if ln.startswith("prsl-finetune:")]
    assert len(reports) == 1 and "None" not in reports[0], proc.stdout

    single = finetune.train(tiny(tmp_path / "single", train_images=32, eval_images=4, eval_samples=4, batch_size=8,
                                 max_steps=2, logging_steps=1, loss="prsl", k=6))
    ddp_log = [r for r in _log(out) if "loss" in r]
    one_log = [r for r in _log(single) if "loss" in r]
    assert [r["tokens"] for r in ddp_log] == [r["tokens"] for r in one_log]   # rank 0 alone: about half
    # 1e-5: two processes sum their halves in another order than one process sums the batch.
    assert ddp_log[0]["ce"] == pytest.approx(one_log[0]["ce"], rel=1e-5)
    assert ddp_log[0]["penalty"] == pytest.approx(one_log[0]["penalty"], rel=1e-4)


def test_loss_option_flags(tmp_path):
    """--label-smoothing / --z-loss / --softcap reach the loss (fused linear and logits paths); bad
    values are refused by the parser; a short run with all three trains and logs accuracy."""
    cfg = finetune.parse_args(["--output-dir", str(tmp_path), "--label-smoothing", "0.1", "--z-loss", "1e-4",
                               "--softcap", "30"])
    assert (cfg.label_smoothing, cfg.z_loss, cfg.softcap) == (0.1, 1e-4, 30.0)
    assert finetune.parse_args(["--output-dir", str(tmp_path)]).softcap is None
    for bad in (["--label-smoothing", "1.5"], ["--z-loss", "-1"], ["--softcap", "0"],
                ["--loss", "prsl-released", "--k", "6", "--softcap", "30"]):
        with pytest.raises(SystemExit):
            finetune.parse_args(["--output-dir", str(tmp_path), *bad])
    out = finetune.train(tiny(tmp_path / "opts", loss="prsl", k=6, b=1.0, max_steps=4, label_smoothing=0.1,
                              z_loss=1e-4, softcap=30.0))
    rec = [r for r in _log(out) if "accuracy" in r]
    assert rec and all(r["penalty"] > 0 and 0.0 <= r["accuracy"] <= 1.0 for r in rec)
