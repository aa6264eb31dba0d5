"""``prsl-finetune``: fine-tune a vision-language model for captioning or VQA with CE or PRSL: a
chat VLM from a local checkpoint (LLaVA, LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL, PaliGemma, Idefics3 /
SmolVLM, Gemma 3), ViT-GPT2 or BLIP-2 OPT from a local checkpoint, or a tiny preset of the last two.

Built on Hugging Face ``Trainer``: ``torchrun`` / ``accelerate launch`` run it
data-parallel with no code here. The loss enters through
``Trainer(compute_loss_func=...)`` (``prsl_kernels.hf``), so gradient
accumulation and multi-process token counts are exact.

    prsl-finetune --task caption --model tiny-vit-gpt2 --data synthetic --loss prsl --k 20 --b 1.0 \\
        --output-dir runs/prsl-k20
    prsl-finetune --task vqa --model /ckpt/blip2-opt-2.7b --data vg/question_answers.json \\
        --image-dir vg/images --loss prsl --k 6 --b 0.5 --bf16 --output-dir runs/blip2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoints
from . import data as data_mod
from . import models
from .cli import cpu_accelerator_without_gpu, show_defaults
from .distributed import leave_process_group

LOSSES = ("ce", "prsl", "prsl-released")
SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
RUN_INFO = "prsl_finetune.json"
LOG_FILE = "log.jsonl"
#: Default peak learning rate per model kind: the tiny presets train from scratch; a local
#: checkpoint is fine-tuned (5e-5, as the authors' released code).
LR_DEFAULTS = {"preset": 1e-3, "checkpoint": 5e-5}


def default_lr(model: str) -> float:
    return LR_DEFAULTS["preset" if model in models.PRESETS else "checkpoint"]


@dataclass
class FinetuneConfig:
    output_dir: str
    task: str = "caption"
    model: str = "tiny-vit-gpt2"
    data: str = "synthetic"
    image_dir: str | list[str] | None = None      # one folder or several, searched in order
    eval_data: str | None = None
    eval_image_dir: str | list[str] | None = None
    # synthetic data / held-out sizes
    train_images: int = 4000
    eval_images: int = 200
    data_seed: int = 0
    image_size: int = models.TinySize.image_size
    n_captions: int = 5
    max_objects: int = 1
    train_references: str = "all"
    limit: int | None = None
    # loss
    loss: str = "prsl"
    k: int = 20
    b: float = 1.0
    window_start: int = 0
    backend: str = "auto"
    fused_linear: bool = True  # ce / prsl: loss from the hidden states (hf.apply_prsl), no logits
    lora: int = 0               # > 0: train a LoRA adapter of this rank (peft) instead of every weight
    lora_targets: list[str] | None = None  # None: the family's (chat_models.FAMILIES), else q_proj / v_proj
    label_smoothing: float = 0.0  # the loss options (spec, "Options"); ce and prsl only
    z_loss: float = 0.0
    softcap: float | None = None
    # tiny preset dimensions (defaults: models.TinySize)
    hidden: int = models.TinySize.hidden
    layers: int = models.TinySize.encoder_layers
    heads: int = models.TinySize.heads
    patch: int = models.TinySize.patch
    num_query_tokens: int = models.TinySize.num_query_tokens
    vocab_size: int = models.TINY_VOCAB_SIZE
    # optimisation
    epochs: float = 1.0
    max_steps: int = -1
    lr: float | None = None      # None: default_lr(model)
    schedule: str = "linear"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    batch_size: int = 32
    grad_accum: int = 1
    bf16: bool = False
    seed: int = 0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"  # a transformers optimizer name (TrainingArguments.optim)
    # bookkeeping
    logging_steps: int = 10
    eval_steps: int = 0
    eval_samples: int = 200
    save_steps: int = 0
    save_total_limit: int | None = 2
    resume: bool = False
    progress: bool = True
    max_new_tokens: int = 24
    stop_at_step: int | None = None  # testing: stop as if interrupted after this step (a checkpoint is written)


def demo_config(output_dir, loss="ce", k=6, b=1.0, seed=0, **overrides) -> FinetuneConfig:
    """The demo-size tiny captioner: ~40 s on an idle 2-core machine (600 steps; see the README)."""
    # Patch 16 (16 image tokens) is ~3x cheaper per step than patch 8 and learned faster in our
    # runs; lr 3e-3 beat 2e-3 and 1e-2 (see the finetune helper's report).
    cfg = dict(output_dir=str(output_dir), task="caption", model="tiny-vit-gpt2", data="synthetic",
               train_images=800, eval_images=100, n_captions=5, train_references="first",
               hidden=64, layers=2, heads=4, patch=16,
               loss=loss, k=k, b=b, seed=seed, lr=3e-3, batch_size=32, max_steps=600, schedule="linear",
               warmup_ratio=0.05, logging_steps=25, eval_samples=100, progress=False)
    cfg.update(overrides)
    return FinetuneConfig(**cfg)


# --------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    d = FinetuneConfig(output_dir="")
    p = argparse.ArgumentParser(prog="prsl-finetune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("task, model, data")
    g.add_argument("--task", choices=("caption", "vqa"), default=d.task)
    g.add_argument("--model", default=d.model,
                   help=f"a local HF checkpoint directory, or a preset: {', '.join(models.PRESETS)}")
    g.add_argument("--data", default=d.data,
                   help="'synthetic', a COCO captions JSON (caption) or a Visual Genome question_answers.json (vqa)")
    g.add_argument("--image-dir", nargs="+", default=None,
                   help="image folder(s) of --data, searched in order (Visual Genome: VG_100K VG_100K_2, or their "
                        "parent; default: the JSON's folder)")
    g.add_argument("--eval-data", default=None, help="held-out annotation file (default: hold out from --data)")
    g.add_argument("--eval-image-dir", nargs="+", default=None)
    g.add_argument("--train-images", type=int, default=d.train_images, help="synthetic training images")
    g.add_argument("--eval-images", type=int, default=d.eval_images, help="synthetic / held-out eval images")
    g.add_argument("--data-seed", type=int, default=d.data_seed, help="seed of the synthetic data")
    g.add_argument("--image-size", type=int, default=d.image_size, help="synthetic image and tiny-model size")
    g.add_argument("--n-captions", type=int, default=d.n_captions, help="synthetic references per image")
    g.add_argument("--max-objects", type=int, default=d.max_objects, help="synthetic shapes per image (1-3)")
    g.add_argument("--train-references", choices=("all", "first"), default=d.train_references,
                   help="caption: train on every reference, or only the first (canonical) one per image")
    g.add_argument("--limit", type=int, default=None, help="use at most this many images of a data file")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", choices=LOSSES, default=d.loss)
    g.add_argument("--k", type=int, default=d.k, help="PRSL top-k (prsl-released: window end)")
    g.add_argument("--b", type=float, default=d.b, help="PRSL penalty weight")
    g.add_argument("--window-start", type=int, default=d.window_start, help="prsl-released: window start")
    g.add_argument("--backend", default=d.backend, choices=("auto", "triton", "cpp", "reference"))
    g.add_argument("--lora", type=int, default=d.lora, metavar="R",
                   help="train a LoRA adapter of rank R (peft) on a local checkpoint; the adapter is saved, and "
                        "prsl-attack loads it onto its base model")
    g.add_argument("--lora-targets", nargs="+", default=None,
                   help="module names LoRA adapts (default: the model family's attention projections)")
    g.add_argument("--no-fused-linear", dest="fused_linear", action="store_false",
                   help="build the logits and compute the loss from them, instead of the fused linear + PRSL "
                        "loss from the decoder's hidden states (ce and prsl; prsl-released is never fused)")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing,
                   help="eps in [0, 1]: CE becomes (1-eps) CE + eps (lse - mean z), as torch's (ce and prsl)")
    g.add_argument("--z-loss", type=float, default=d.z_loss, help="lam >= 0: adds lam * lse^2 per token")
    g.add_argument("--softcap", type=float, default=d.softcap,
                   help="c > 0: logits become c * tanh(z / c) before the loss (default: off)")
    g = p.add_argument_group("tiny preset size")
    for name in ("hidden", "layers", "heads", "patch", "num_query_tokens", "vocab_size"):
        g.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=float, default=d.epochs)
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="overrides --epochs when > 0")
    # SUPPRESS: no '(default: None)' in --help; the per-kind defaults are in the help text.
    g.add_argument("--lr", type=float, default=argparse.SUPPRESS,
                   help=f"peak learning rate (default: {LR_DEFAULTS['preset']:g} for a tiny preset, "
                        f"{LR_DEFAULTS['checkpoint']:g} for a local checkpoint)")
    g.add_argument("--schedule", choices=SCHEDULES, default=d.schedule)
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum)
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    g.add_argument("--optim", default=d.optim, help="transformers optimizer name (adamw_torch, sgd, adafactor, ...)")
    g.add_argument("--bf16", action="store_true", help="bf16 mixed precision (CUDA only)")
    g.add_argument("--seed", type=int, default=d.seed, help="model init and data order")
    g = p.add_argument_group("bookkeeping")
    g.add_argument("--output-dir", required=True)
    g.add_argument("--logging-steps", type=int, default=d.logging_steps)
    g.add_argument("--eval-steps", type=int, default=d.eval_steps, help="0: evaluate only at the end")
    g.add_argument("--eval-samples", type=int, default=d.eval_samples)
    g.add_argument("--save-steps", type=int, default=d.save_steps, help="0: no intermediate checkpoints")
    g.add_argument("--save-total-limit", type=int, default=d.save_total_limit)
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    g.add_argument("--stop-at-step", type=int, default=None, help=argparse.SUPPRESS)
    return show_defaults(p)


def parse_args(argv=None) -> FinetuneConfig:
    parser = build_parser()
    ns = parser.parse_args(argv)
    cfg = FinetuneConfig(**vars(ns))
    try:
        validate_config(cfg)
    except ValueError as err:
        parser.error(str(err))
    return cfg


def validate_config(cfg: FinetuneConfig) -> None:
    """Clear errors for bad settings, before anything is built."""
    if cfg.task not in ("caption", "vqa"):
        raise ValueError(f"--task must be caption or vqa, got {cfg.task!r}")
    if cfg.loss not in LOSSES:
        raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}")
    if cfg.k < 0:
        raise ValueError(f"--k must be >= 0, got {cfg.k}")
    if not math.isfinite(cfg.b):
        raise ValueError(f"--b must be finite, got {cfg.b}")
    if not 0 <= cfg.label_smoothing <= 1:
        raise ValueError(f"--label-smoothing must be in [0, 1], got {cfg.label_smoothing}")
    if not cfg.z_loss >= 0 or not math.isfinite(cfg.z_loss):
        raise ValueError(f"--z-loss must be a finite number >= 0, got {cfg.z_loss}")
    if cfg.softcap is not None and (not cfg.softcap > 0 or not math.isfinite(cfg.softcap)):
        raise ValueError(f"--softcap must be a finite number > 0, got {cfg.softcap}")
    if cfg.loss == "prsl-released" and (cfg.label_smoothing or cfg.z_loss or cfg.softcap is not None):
        raise ValueError("--label-smoothing / --z-loss / --softcap need --loss ce or prsl")
    if cfg.loss == "prsl-released" and not 0 <= cfg.window_start < cfg.k:
        raise ValueError(f"prsl-released needs 0 <= --window-start < --k, got {cfg.window_start} and {cfg.k}")
    if cfg.model not in models.PRESETS and not Path(cfg.model).is_dir():
        raise ValueError(f"--model must be a preset ({', '.join(models.PRESETS)}) or a local checkpoint "
                         f"directory; {cfg.model!r} is neither")
    if cfg.data != "synthetic" and not Path(cfg.data).is_file():
        raise ValueError(f"--data must be 'synthetic' or an annotation JSON file; {cfg.data!r} does not exist")
    for name in ("batch_size", "grad_accum", "logging_steps", "train_images", "eval_images", "hidden",
                 "layers", "heads", "patch", "image_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("eval_steps", "save_steps", "eval_samples"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.lr is not None and cfg.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.max_steps <= 0 and cfg.epochs <= 0:
        raise ValueError("give --max-steps > 0 or --epochs > 0")
    if cfg.bf16 and not torch.cuda.is_available():
        raise ValueError("--bf16 needs a CUDA GPU (none is visible)")
    if cfg.lora < 0:
        raise ValueError(f"--lora must be >= 0 (0: off), got {cfg.lora}")
    if cfg.lora and cfg.resume:
        raise ValueError("--resume with --lora is not supported yet (a checkpoint holds only the adapter): "
                         "start a new run")
    if cfg.lora and cfg.model in models.PRESETS:
        raise ValueError("--lora adapts a saved checkpoint (the adapter records its base folder): give --model DIR")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")


# --------------------------------------------------------------------------- building blocks


class ExampleDataset(torch.utils.data.Dataset):
    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def _load_data(cfg: FinetuneConfig):
    """(train samples, eval samples); eval is a separate synthetic split, --eval-data, or held out."""
    if cfg.data == "synthetic":
        kw = dict(image_size=cfg.image_size, n_captions=cfg.n_captions, max_objects=cfg.max_objects)
        return (data_mod.synthetic_dataset(cfg.train_images, cfg.data_seed, split="train", **kw),
                data_mod.synthetic_dataset(cfg.eval_images, cfg.data_seed, split="eval", **kw))
    samples = data_mod.load_samples(cfg.data, task=cfg.task, image_dir=cfg.image_dir, limit=cfg.limit)
    if cfg.eval_data:
        return samples, data_mod.load_samples(cfg.eval_data, task=cfg.task, image_dir=cfg.eval_image_dir,
                                              limit=cfg.eval_images)
    n_eval = min(cfg.eval_images, len(samples) // 10)
    if n_eval == 0:
        return samples, []
    return samples[:-n_eval], samples[-n_eval:]


def _texts(samples, task):
    return [t for s in samples for t in (s.captions + [f"{data_mod.vqa_prompt(q)} {a}" for q, a in s.qa])]


def _build_bundle(cfg: FinetuneConfig, train_samples, resume_from: Path | None) -> models.ModelBundle:
    """The model to train.

    On --resume the model comes from the checkpoint through ``from_pretrained``: transformers 5.x
    renames some weights in memory (e.g. ViT's attention), and Trainer's own resume loads the
    checkpoint's names with ``strict=False``, silently skipping those (measured: the ViT encoder
    came back at its initial weights). Trainer then restores optimiser, scheduler and RNG state.
    """
    if resume_from is not None:
        bundle = checkpoints.load_bundle(resume_from, processor_path=cfg.output_dir)
    elif cfg.model in models.PRESETS:
        size = models.TinySize(hidden=cfg.hidden, encoder_layers=cfg.layers, decoder_layers=cfg.layers,
                               heads=cfg.heads, patch=cfg.patch, image_size=cfg.image_size,
                               num_query_tokens=cfg.num_query_tokens)
        texts = (data_mod.synthetic_corpus(cfg.data_seed) if cfg.data == "synthetic"
                 else _texts(train_samples, cfg.task))
        bundle = models.tiny_bundle(cfg.model, texts, size=size, seed=cfg.seed, vocab_size=cfg.vocab_size)
    else:
        # Resolved: a LoRA adapter records where its base lives.
        bundle = checkpoints.load_bundle(Path(cfg.model).resolve())
    _freeze_unused(bundle.model)
    if cfg.lora and resume_from is None:
        bundle.model = _with_lora(bundle, cfg)
    return bundle


def _with_lora(bundle, cfg: FinetuneConfig):
    """The model with a LoRA adapter of rank ``cfg.lora`` (peft) on the family's target modules;
    every other weight frozen, the LM head included (no V x H gradient)."""
    from peft import LoraConfig, get_peft_model

    from .chat_models import FAMILIES, family_of

    family = family_of(bundle.model.config.model_type)
    targets = cfg.lora_targets or (list(FAMILIES[family].lora_targets) if family else ["q_proj", "v_proj"])
    config = LoraConfig(r=cfg.lora, lora_alpha=2 * cfg.lora, lora_dropout=0.0, target_modules=targets)
    return get_peft_model(bundle.model, config)


def _freeze_unused(model) -> None:
    """A ViT encoder's pooler feeds nothing in VisionEncoderDecoderModel: freeze it, so DDP (which
    expects a gradient for every trainable parameter) needs no find_unused_parameters pass."""
    pooler = getattr(getattr(model, "encoder", None), "pooler", None)
    if pooler is not None:
        pooler.requires_grad_(False)


def _fused_linear(cfg: FinetuneConfig, bundle: models.ModelBundle):
    """The fused linear + loss patch on the bundle's model (its loss object), or None: opted out
    (--no-fused-linear) or prsl-released (reference PyTorch on the logits)."""
    from ..hf import apply_prsl

    if not cfg.fused_linear or cfg.loss not in ("ce", "prsl"):
        return None
    k, b = (0, 0.0) if cfg.loss == "ce" else (cfg.k, cfg.b)
    return apply_prsl(bundle.model, k, b, fused_linear=True, shift=bundle.shift_labels, backend=cfg.backend,
                      **_loss_options(cfg))


def _loss_options(cfg: FinetuneConfig) -> dict:
    return {"label_smoothing": cfg.label_smoothing, "z_loss": cfg.z_loss, "softcap": cfg.softcap}


def _loss_fn(cfg: FinetuneConfig, bundle: models.ModelBundle):
    from ..hf import CEComputeLoss, PRSLComputeLoss

    shift = bundle.shift_labels
    if cfg.loss == "ce":
        return CEComputeLoss(shift=shift, backend=cfg.backend, **_loss_options(cfg))
    vocab = bundle.model.get_output_embeddings().out_features
    if cfg.k > vocab - 1:
        raise ValueError(f"--k {cfg.k} exceeds the vocabulary: at most V-1 = {vocab - 1}")
    if cfg.loss == "prsl":
        return PRSLComputeLoss(cfg.k, cfg.b, shift=shift, backend=cfg.backend, **_loss_options(cfg))
    return PRSLComputeLoss(cfg.k, cfg.b, shift=shift, variant="released", start=cfg.window_start)


def last_checkpoint(output_dir) -> Path | None:
    ckpts = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
             and (p / "trainer_state.json").is_file()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1])) if ckpts else None


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines after the checkpoint we resume from: those steps are run again."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step and not json.loads(ln).get("final")
            and "train_runtime" not in ln]
    path.write_text("".join(ln + "\n" for ln in kept))


def evaluate(bundle: models.ModelBundle, examples, *, task="caption", batch_size=64, max_new_tokens=24) -> dict:
    """Greedy outputs on ``examples`` and the exact-match rate against their references."""
    model = bundle.model
    was_training = model.training
    model.eval()
    outputs, hits = [], 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        pv = bundle.pixel_values([e.sample.image if e.sample.image is not None else e.sample.load_image()
                                  for e in chunk])
        outs = bundle.generate(pv, [e.prompt for e in chunk] if task == "vqa" else None,
                               max_new_tokens=max_new_tokens)
        for e, o in zip(chunk, outs):
            refs = {data_mod.normalize_text(r) for r in data_mod.references(e, task)}
            hits += data_mod.normalize_text(o) in refs
        outputs += outs
    model.train(was_training)
    return {"exact_match": hits / max(len(examples), 1), "n": len(examples), "outputs": outputs}


def _eval_examples(cfg, eval_samples):
    if cfg.task == "caption":
        ex = data_mod.caption_examples(eval_samples, all_references=False)
    else:
        ex = data_mod.vqa_examples(eval_samples)
    return ex[:cfg.eval_samples]


# --------------------------------------------------------------------------- callbacks


def _make_callbacks(cfg, bundle, loss_fn, eval_examples, log_path):
    from transformers import TrainerCallback

    class JsonlLogger(TrainerCallback):
        """Adds CE, the penalty (b*D), the token accuracy and the mean entropy to the Trainer's logs; writes
        JSONL (rank 0)."""

        def on_log(self, args, state, control, logs=None, **kw):
            # Every rank logs at the same steps (Trainer gathers the loss there), so the all-reduce
            # below is safe; it makes ce / penalty / tokens global like Trainer's "loss".
            stats = _global_stats(loss_fn.pop_stats(), args.device)
            if logs is None or not state.is_world_process_zero:
                return
            # "train_loss": the end-of-training line, the only one when --logging-steps > --max-steps.
            if stats is not None and ("loss" in logs or "train_loss" in logs):
                logs["ce"], logs["penalty"], logs["tokens"] = stats["ce"], stats["penalty"], stats["tokens"]
                logs["accuracy"], logs["entropy"] = stats["accuracy"], stats["entropy"]
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    class GenerativeEval(TrainerCallback):
        """Exact match of greedy outputs every ``eval_steps`` (rank 0)."""

        def on_step_end(self, args, state, control, model=None, **kw):
            if cfg.eval_steps and state.global_step % cfg.eval_steps == 0 and state.is_world_process_zero \
                    and eval_examples:
                res = evaluate(bundle, eval_examples, task=cfg.task, max_new_tokens=cfg.max_new_tokens)
                rec = {"step": state.global_step, "eval_exact_match": res["exact_match"], "eval_n": res["n"],
                       "eval_sample_output": res["outputs"][0]}
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if cfg.stop_at_step is not None and state.global_step >= cfg.stop_at_step:
                control.should_save = True
                control.should_training_stop = True

    class SaveProcessor(TrainerCallback):
        """Every checkpoint-N gets the image processor (Trainer saves only the tokenizer), so a
        checkpoint can be attacked or loaded on its own."""

        def on_save(self, args, state, control, **kw):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and ckpt.is_dir():
                bundle.save_processor(ckpt)

    return [JsonlLogger(), GenerativeEval(), StopAt(), SaveProcessor()]


def _global_stats(stats, device):
    """``pop_stats()`` summed over all processes (token-weighted); as is without torch.distributed."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    s = stats or {"ce": 0.0, "penalty": 0.0, "tokens": 0, "accuracy": 0.0, "entropy": 0.0}
    sums = torch.tensor([s["ce"] * s["tokens"], s["penalty"] * s["tokens"], float(s["tokens"]),
                         s["accuracy"] * s["tokens"], s["entropy"] * s["tokens"]], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    ce, penalty, tokens, correct, entropy = sums.tolist()
    if tokens == 0:
        return None
    return {"ce": ce / tokens, "penalty": penalty / tokens, "tokens": int(round(tokens)), "accuracy": correct / tokens,
            "entropy": entropy / tokens}


def _quiet_console(trainer, progress: bool) -> None:
    """Console for people: Trainer prints every log dict (PrinterCallback without a progress bar,
    ProgressCallback under it); those go to log.jsonl. Keep one bar showing the latest loss."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class BarOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(BarOnly)


# --------------------------------------------------------------------------- training


def train(cfg: FinetuneConfig) -> Path:
    """Fine-tune per ``cfg``; returns the output directory (model, tokenizer, processor, run JSON, logs)."""
    from transformers import Trainer, TrainingArguments, set_seed
    from transformers.utils import logging as hf_logging

    validate_config(cfg)
    if cfg.lr is None:
        cfg = dataclasses.replace(cfg, lr=default_lr(cfg.model))
    start = time.time()
    out = Path(cfg.output_dir)
    resume_from = last_checkpoint(out) if cfg.resume else None
    if cfg.resume and resume_from is None:
        raise FileNotFoundError(f"--resume: no checkpoint-* directory in {out} to continue from")
    if not cfg.resume and last_checkpoint(out) is not None:
        raise FileExistsError(f"{out} already holds checkpoints: pass --resume to continue, or a new --output-dir")
    hf_logging.set_verbosity_error()
    set_seed(cfg.seed)

    train_samples, eval_samples = _load_data(cfg)
    if cfg.task == "caption":
        train_examples = data_mod.caption_examples(train_samples, all_references=cfg.train_references == "all")
    else:
        train_examples = data_mod.vqa_examples(train_samples)
    eval_examples = _eval_examples(cfg, eval_samples)
    bundle = _build_bundle(cfg, train_samples, resume_from)
    loss_fn = _loss_fn(cfg, bundle)
    fused = _fused_linear(cfg, bundle)
    if fused is not None:
        loss_fn = fused

    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume and (out / LOG_FILE).exists():
            (out / LOG_FILE).unlink()
        if resume_from is not None:
            _truncate_log(out / LOG_FILE, int(resume_from.name.split("-")[-1]))
    log_path = out / LOG_FILE

    try:
        import tensorboard  # noqa: F401
        report_to = ["tensorboard"]
    except ImportError:
        report_to = "none"
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, lr_scheduler_type=cfg.schedule,
        warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps, max_grad_norm=cfg.max_grad_norm, bf16=cfg.bf16, seed=cfg.seed,
        data_seed=cfg.seed, logging_steps=cfg.logging_steps, save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500, save_total_limit=cfg.save_total_limit, eval_strategy="no",
        report_to=report_to, remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=not cfg.progress, label_names=["labels"],
        save_only_model=False, ddp_find_unused_parameters=False, use_cpu=not torch.cuda.is_available(),
        optim=cfg.optim)
    # The epoch's shuffle draws from the global RNG when the loader starts: reseed after building the
    # model (a fresh init and a from_pretrained load consume different amounts of it), so a resumed
    # run sees the same order as the uninterrupted one.
    set_seed(cfg.seed)
    trainer = Trainer(model=bundle.model, args=args, train_dataset=ExampleDataset(train_examples),
                      data_collator=bundle.batch, processing_class=bundle.tokenizer,
                      compute_loss_func=None if fused is not None else loss_fn,
                      callbacks=_make_callbacks(cfg, bundle, loss_fn, eval_examples, log_path))
    # num_items_in_batch goes to our loss, not into the model's own forward (VisionEncoderDecoder
    # would hand it to the encoder): to compute_loss_func, or, fused, to the patched forward, which
    # takes the labels and num_items_in_batch for the loss and passes neither on.
    trainer.model_accepts_loss_kwargs = fused is not None
    _quiet_console(trainer, cfg.progress)
    if rank0:
        # The image processor is not the Trainer's processing_class: keep it with the run (and so
        # with --resume) from the start.
        bundle.save_processor(out)
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    interrupted = cfg.stop_at_step is not None and trainer.state.global_step < trainer.state.max_steps
    if trainer.is_world_process_zero():
        final = {} if interrupted or not eval_examples else evaluate(
            bundle, eval_examples, task=cfg.task, max_new_tokens=cfg.max_new_tokens)
        if not interrupted:
            bundle.save(out)
        info = {
            "task": cfg.task, "model": cfg.model, "kind": bundle.kind,
            "loss": {"name": cfg.loss, "k": cfg.k if cfg.loss != "ce" else 0, "b": cfg.b if cfg.loss != "ce" else 0.0,
                     "window_start": cfg.window_start, "backend": cfg.backend},
            "data": _data_info(cfg, train_samples, train_examples, eval_samples),
            "config": recorded_config(cfg),
            "world_size": trainer.args.world_size,
            "steps": trainer.state.global_step, "train_loss": result.training_loss,
            "wall_s": time.time() - start, "completed": not interrupted,
            "final_eval": {k: v for k, v in final.items() if k != "outputs"},
            "final_eval_sample_outputs": final.get("outputs", [])[:5],
        }
        if final:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": trainer.state.global_step, "eval_exact_match": final["exact_match"],
                                    "eval_n": final["n"], "final": True}) + "\n")
        (out / RUN_INFO).write_text(json.dumps(info, indent=2))
    return out


#: Settings that only mean something for the synthetic data, or for a tiny preset model.
SYNTHETIC_ONLY = ("train_images", "data_seed", "n_captions", "max_objects")
PRESET_ONLY = ("hidden", "layers", "heads", "patch", "num_query_tokens", "vocab_size", "image_size")


def recorded_config(cfg: FinetuneConfig) -> dict:
    """The config as run, without the settings that did not apply to this run."""
    out = dataclasses.asdict(cfg)
    drop = (() if cfg.data == "synthetic" else SYNTHETIC_ONLY) + (() if cfg.model in models.PRESETS else PRESET_ONLY)
    if cfg.data == "synthetic":
        drop += ("image_dir", "eval_data", "eval_image_dir", "limit")
    if cfg.task != "caption":
        drop += ("train_references",)
    return {k: v for k, v in out.items() if k not in set(drop) or (k == "image_size" and cfg.data == "synthetic")}


def _data_info(cfg: FinetuneConfig, train_samples, train_examples, eval_samples) -> dict:
    """What was trained and held out. For a file split here, ``held_out_ids`` lists the held-out
    images, so ``prsl-attack`` attacks those and never training images."""
    info = {"source": cfg.data, "train_images": len(train_samples), "train_examples": len(train_examples),
            "eval_images": len(eval_samples)}
    if cfg.data == "synthetic":
        info.update(data_seed=cfg.data_seed, image_size=cfg.image_size, n_captions=cfg.n_captions,
                    max_objects=cfg.max_objects)
    else:
        info.update(source_path=str(Path(cfg.data).resolve()), image_dir=cfg.image_dir, limit=cfg.limit,
                    eval_data=cfg.eval_data, eval_image_dir=cfg.eval_image_dir,
                    held_out_ids=None if cfg.eval_data else [s.id for s in eval_samples])
    if cfg.task == "caption":
        info["train_references"] = cfg.train_references
    return info


def main(argv=None) -> int:
    cpu_accelerator_without_gpu()
    cfg = parse_args(argv)
    code = _main(cfg)
    leave_process_group(code)
    return code


def _main(cfg: FinetuneConfig) -> int:
    try:
        out = train(cfg)
    except (data_mod.DataError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"prsl-finetune: error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:
        return 0        # rank 0 writes the run and reports it
    info = checkpoints.read_run_info(out)
    ev = info.get("final_eval", {})
    msg = f"prsl-finetune: {info.get('steps')} steps in {info.get('wall_s', 0):.1f}s -> {out}"
    if "exact_match" in ev:
        msg += f" (eval exact match {ev['exact_match']:.3f} on {ev['n']})"
    print(msg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
