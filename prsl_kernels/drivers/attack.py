"""``prsl-attack``: multi-round BIM, PGD and APGD against fine-tuned vision-language models.

BIM (Kurakin et al., 2017), ascending the teacher-forced cross-entropy of a fixed
target text (by default the model's own clean output; option: the first reference)::

    x_{n+1} = clip_{x0, eps}( x_n + alpha * sign(grad_x CE(model(x_n), target)) )

in the model's *normalised* pixel space (the paper's setting: eps=0.5, alpha=0.01 for
captioning, eps=1.0, alpha=0.5 for VQA), or in ``[0, 1]`` pixel space. In both spaces every
step is also clamped to the valid image range (pixels in [0, 1], mapped through the
processor's mean and std in normalised space), so every adversarial input is an image that
exists; in pixel space this is torchattacks' ``BIM`` update exactly. The attacker always
uses plain ``torch.nn.functional.cross_entropy``, whatever loss trained the model.

``--attack pgd`` (Madry et al.: a random start in the eps-ball, then projected signed steps)
and ``--attack apgd`` (Croce and Hein 2020, AutoAttack's APGD-CE schedule: step-size halving at
the checkpoints, momentum 0.75, the best point kept; ``attack_steps.py``) run ``--steps`` steps
per round, in ``[0, 1]`` pixel space by default: the perturbation is applied to the image before
the processor's normalisation, ``|x - x0| <= eps`` and ``0 <= x <= 1`` hold exactly in floating
point, and ``--eps`` / ``--alpha`` take fractions (``4/255``). The random start is drawn per
image from ``--seed``, so it does not depend on the batch size. ``--target-text TEXT`` makes any
attack targeted: it descends the teacher-forced CE of TEXT, and each round reports the success
rate (the output equals TEXT after the exact-match normalisation).
``--worst-case-over-references`` (the RobustVLM protocol): each round attacks the CE of every
reference in turn, from the same point, and keeps per image the candidate whose output scores
worst against the references (on CIDEr-D if scored, else the first metric). Only the pixels get
gradients: the model's parameters are frozen.

Decoding follows the checkpoint's generation config (``num_beams``, ``max_new_tokens``,
and e.g. ``no_repeat_ngram_size``) unless ``--num-beams`` / ``--max-new-tokens`` are given;
it is always deterministic (no sampling).

After every round (``--steps-per-round`` BIM steps, default 1) outputs are generated
(greedy, or ``--num-beams``) and scored against the references and against the
model's clean output. Each finished round is written to disk (its JSONL records, then
the adversarial images), so a rerun with the same arguments resumes after the last
finished round and gives exactly what an uninterrupted run gives.

Under ``torchrun --nproc_per_node N`` or ``accelerate launch`` the images are split over the
processes (image ``i`` to rank ``i % N``), each attacked once through all its rounds; each finished
batch goes to ``partial/``, so a rerun resumes per image (with any N). Rank 0 merges the partials,
scores every round on all images at once (CIDEr-D's document frequencies span the whole set) and
writes the same files and report as one process; it alone shows a progress bar, with the global
count. ``--worst-case-over-references`` stays single-process: its choice scores every image.

Layout of ``--output-dir`` (one folder per model, then the cross-model report)::

    <name>/attack_config.json     what was run (a resume must match it)
    <name>/rounds/round_NNN.jsonl per-sample records of round NNN (0 = clean)
    <name>/rounds/round_NNN.json  corpus scores of round NNN
    <name>/state.pt               adversarial images after the last finished round
    <name>/grid.npz               first few clean / adversarial images with outputs
    <name>/samples.jsonl          all rounds' records (id, round, output, scores)
    <name>/partial/part-NNNNNN.pt several processes: finished batches not yet merged
    summary.csv, report.md, figures/*.png  (see report.py)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..spec import IGNORE_INDEX
from .attack_steps import bim
from .cli import cpu_accelerator_without_gpu, show_defaults

#: (eps, alpha) per task in normalised pixel space, as in the paper (ViT-GPT2 / BLIP-2).
TASK_DEFAULTS = {"caption": (0.5, 0.01), "vqa": (1.0, 0.5)}
GRID_SAMPLES = 6


ATTACKS = ("bim", "pgd", "apgd")
#: pgd / apgd: RobustVLM's smaller radius in [0, 1] pixels when --eps is not given.
PIXEL_EPS = 4 / 255


@dataclass
class AttackConfig:
    """Attack and evaluation settings (CLI flags with ``-`` -> ``_``)."""
    task: str = "caption"
    rounds: int = 3
    eps: float | None = None            # None -> TASK_DEFAULTS (bim; scaled by the std in pixel space), 4/255
    alpha: float | None = None          # None -> TASK_DEFAULTS (bim), 2.5 eps / steps (pgd); apgd sets its own
    steps_per_round: int = 1
    space: str | None = None            # "normalized" | "pixel"; None -> normalized for bim, pixel for pgd / apgd
    target: str = "clean"               # "clean" (own clean output) | "reference"
    attack: str = "bim"                 # "bim" | "pgd" | "apgd"
    target_text: str | None = None      # a targeted attack: descend the CE of this text
    worst_case: bool = False            # attack every reference, keep the worst-scoring result per image
    seed: int = 0                       # pgd / apgd random starts
    num_beams: int | None = None        # None -> the checkpoint's generation config, else 1
    max_new_tokens: int | None = None   # None -> the checkpoint's generation config, else 24
    batch_size: int = 16
    device: str = "cpu"

    def validate(self):
        if self.task not in TASK_DEFAULTS:
            raise ValueError(f"task must be one of {sorted(TASK_DEFAULTS)}, got {self.task!r}")
        if self.attack not in ATTACKS:
            raise ValueError(f"attack must be one of {ATTACKS}, got {self.attack!r}")
        if self.space is None:
            self.space = "normalized" if self.attack == "bim" else "pixel"
        if self.target_text is not None and self.worst_case:
            raise ValueError("--target-text and --worst-case-over-references exclude each other: a targeted "
                             "attack descends one text, the worst case ascends every reference")
        if self.target_text is not None and not self.target_text.strip():
            raise ValueError("--target-text must not be empty")
        if self.attack == "apgd" and self.alpha is not None:
            raise ValueError("apgd chooses its own step sizes (2 eps, halved at its checkpoints): leave --alpha unset")
        if self.space not in ("normalized", "pixel"):
            raise ValueError(f"space must be 'normalized' or 'pixel', got {self.space!r}")
        if self.target not in ("clean", "reference"):
            raise ValueError(f"target must be 'clean' or 'reference', got {self.target!r}")
        for name in ("rounds", "steps_per_round", "num_beams", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "rounds" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'rounds' else 1}, got {value}")
        for name in ("eps", "alpha"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        return self


@dataclass
class AttackItem:
    """One attacked input: an image, a prompt ("" for captioning) and the texts it is scored against."""
    id: str
    image: object                       # PIL image or HxWx3 uint8 array
    prompt: str
    references: list[str] = field(default_factory=list)


def attack_items(samples, task, questions_per_image=1):
    """Items from ``data.Sample`` records: one per image (caption) or per (image, question) (vqa)."""
    items = []
    for s in samples:
        image = s.image if s.image is not None else s.load_image()
        if task == "caption":
            if not s.captions:
                raise ValueError(f"sample {s.id!r} has no captions (caption task)")
            items.append(AttackItem(s.id, image, "", list(s.captions)))
        else:
            from .data import vqa_prompt

            if not s.qa:
                raise ValueError(f"sample {s.id!r} has no question-answer pairs (vqa task)")
            for j, (q, a) in enumerate(s.qa[:questions_per_image]):
                answers = [aa for qq, aa in s.qa if qq == q]
                items.append(AttackItem(f"{s.id}-q{j}", image, vqa_prompt(q), answers or [a]))
    return items


class TeacherForcedCE:
    """Per-sample teacher-forced CE of fixed texts for one batch of a :class:`models.ModelBundle`.

    ``to_model`` maps attack-space pixels to the model's normalised input.
    """

    def __init__(self, bundle, prompts, targets, to_model, device):
        self.bundle, self.to_model = bundle, to_model
        text = bundle.text_inputs(list(prompts), list(targets))
        self.labels = text.pop("labels").to(device)
        self.text = {k: v.to(device) for k, v in text.items()}

    def per_sample(self, x):
        logits = self.bundle.model(**self.bundle.image_inputs(self.to_model(x)), **self.text).logits
        logits, targets = self.bundle.align(logits, self.labels)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none").view(targets.shape)
        # Mean over each sample's tokens: samples stay independent, so batching never changes a result.
        return ce.sum(1) / (targets != IGNORE_INDEX).sum(1).clamp_min(1)

    def __call__(self, x):
        return self.per_sample(x).sum()


# --------------------------------------------------------------------------- one model


def _atomic_write(path, write):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_text(path, text):
    _atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def _to_uint8(x_pixel):
    return (x_pixel.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class SettingsMismatch(RuntimeError):
    """An output folder holds rounds of an attack with other settings (or of an earlier version)."""


class ModelAttack:
    """Attacks one model on ``items``, writing under ``out_dir``; :meth:`run` resumes where it stopped."""

    def __init__(self, bundle, items, out_dir, config: AttackConfig, scorer, *, model_path="", name=None,
                 run_info=None, progress=True):
        self.bundle, self.items, self.cfg, self.scorer = bundle, list(items), config.validate(), scorer
        # Each item's place in the whole run: seeds its random start, whichever process attacks it.
        self.index = list(range(len(self.items)))
        self.out = Path(out_dir)
        self.name = name or self.out.name
        self.model_path, self.run_info, self.progress = str(model_path), dict(run_info or {}), progress
        self.device = torch.device(config.device)
        bundle.model.to(self.device).eval()
        for p in bundle.model.parameters():
            p.requires_grad_(False)
        self.mean = bundle.image_mean.to(self.device)
        self.std = bundle.image_std.to(self.device)
        gen = bundle.generation_settings()
        self.num_beams = config.num_beams if config.num_beams is not None else gen["num_beams"]
        self.max_new_tokens = config.max_new_tokens if config.max_new_tokens is not None else gen["max_new_tokens"]
        eps0, alpha0 = TASK_DEFAULTS[config.task]
        # In pixel space the task defaults keep the same step in image units: scale by the std.
        scale = float(self.std.mean()) if config.space == "pixel" else 1.0
        if config.attack == "bim":
            self.eps = config.eps if config.eps is not None else eps0 * scale
            self.alpha = config.alpha if config.alpha is not None else alpha0 * scale
        else:
            self.eps = config.eps if config.eps is not None else PIXEL_EPS * (1.0 if config.space == "pixel"
                                                                             else 1.0 / float(self.std.mean()))
            # PGD: Madry et al.'s 2.5 eps / steps; APGD chooses its own step sizes (2 eps, halved).
            self.alpha = None if config.attack == "apgd" else (
                config.alpha if config.alpha is not None else 2.5 * self.eps / config.steps_per_round)

    # ---- spaces
    def _to_model(self, x):
        return (x - self.mean) / self.std if self.cfg.space == "pixel" else x

    def _to_pixel(self, x):
        return x if self.cfg.space == "pixel" else x * self.std + self.mean

    def _bounds(self):
        """Valid images: pixels in [0, 1]; in normalised space that range through mean and std."""
        if self.cfg.space == "pixel":
            return 0.0, 1.0
        lo, hi = self.bundle.pixel_range()
        return lo.to(self.device), hi.to(self.device)

    def _clean_inputs(self):
        chunks = []
        for i in range(0, len(self.items), self.cfg.batch_size):
            batch = self.items[i:i + self.cfg.batch_size]
            chunks.append(self.bundle.pixel_values([it.image for it in batch]).to(self.device))
        x0 = torch.cat(chunks)
        return x0 * self.std + self.mean if self.cfg.space == "pixel" else x0

    # ---- persistence
    def describe(self):
        return {"name": self.name, "model_path": self.model_path, "run_info": self.run_info,
                "attack": {**asdict(self.cfg), "eps": self.eps, "alpha": self.alpha, "num_beams": self.num_beams,
                           "max_new_tokens": self.max_new_tokens, "valid_range": True},
                "ids": [it.id for it in self.items]}

    def _check_or_write_config(self, write=True):
        path = self.out / "attack_config.json"
        mine = self.describe()
        if path.is_file():
            old = json.loads(path.read_text())
            # Only the settings that change results must match; device and batch size do not.
            keys = ("eps", "alpha", "space", "target", "steps_per_round", "num_beams", "max_new_tokens", "task",
                    "valid_range", "attack", "target_text", "worst_case", "seed")
            if old.get("ids") != mine["ids"] or any(old["attack"].get(k) != mine["attack"][k] for k in keys) \
                    or old.get("model_path") != mine["model_path"]:
                raise SettingsMismatch(f"{self.out} holds an attack with other settings or data; use another "
                                       "--output-dir or --overwrite")
            old["attack"]["rounds"] = max(old["attack"]["rounds"], self.cfg.rounds)
            mine = old
        if write:
            _write_text(path, json.dumps(mine, indent=1))

    def _load_state(self):
        path = self.out / "state.pt"
        if not path.is_file():
            return -1, None, None
        state = torch.load(path, map_location=self.device, weights_only=True)
        return int(state["round"]), state["x"], state["clean"]

    # ---- rounds
    def _generate(self, x):
        outs = []
        for i in range(0, len(self.items), self.cfg.batch_size):
            batch = self.items[i:i + self.cfg.batch_size]
            outs += self.bundle.generate(self._to_model(x[i:i + len(batch)]), [it.prompt for it in batch],
                                         max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)
        return outs

    def _targets(self, clean):
        if self.cfg.target_text is not None:
            return [self.cfg.target_text] * len(self.items)
        if self.cfg.target == "clean":
            return clean
        return [it.references[0] for it in self.items]

    def _random_start(self, x0):
        """pgd / apgd: the first round's start, drawn per image from ``--seed`` (so it does not
        depend on how images are batched)."""
        from .attack_steps import random_start

        starts = [random_start(x0[i:i + 1], self.eps, self.cfg.attack, bounds=self._bounds(),
                               generator=torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.index[i]))
                  for i in range(len(x0))]
        return torch.cat(starts)

    def _attack_batch(self, ce, x, x0):
        """One round of the configured attack on one batch, from ``x``; ascends the CE of the
        targets (descends it for ``--target-text``)."""
        sign = -1.0 if self.cfg.target_text is not None else 1.0
        if self.cfg.attack == "bim":
            return bim(lambda z: sign * ce(z), x, x0, self.eps, self.alpha, self.cfg.steps_per_round,
                       self._bounds())
        from .attack_steps import apgd, pgd

        def loss_fn(z):
            return sign * ce.per_sample(z)
        if self.cfg.attack == "pgd":
            return pgd(loss_fn, x0, self.eps, self.alpha, self.cfg.steps_per_round, bounds=self._bounds(),
                       random_start=False, start=x)
        return apgd(loss_fn, x0, self.eps, self.cfg.steps_per_round, bounds=self._bounds(), random_start=False,
                    start=x)

    def _step_all(self, x, x0, targets, bar):
        new, losses = [], []
        for i in range(0, len(self.items), self.cfg.batch_size):
            sl = slice(i, i + self.cfg.batch_size)
            batch = self.items[sl]
            ce = TeacherForcedCE(self.bundle, [it.prompt for it in batch], targets[sl], self._to_model, self.device)
            xb = self._attack_batch(ce, x[sl], x0[sl])
            with torch.no_grad():
                losses += ce.per_sample(xb).tolist()
            new.append(xb)
            if bar is not None:
                bar.update(len(batch))
        return torch.cat(new), losses

    def _worst_metric(self, per_sample):
        names = list(per_sample[0]) if per_sample else []
        for preferred in ("cider", "vqa_accuracy"):
            if preferred in names:
                return preferred
        if not names:
            raise ValueError("--worst-case-over-references needs at least one metric")
        return names[0]

    def _worst_case_round(self, x, x0, bar):
        """Attack each reference's CE from ``x``; keep per image the candidate scoring worst."""
        refs = [it.references for it in self.items]
        best = None  # per image: (score, candidate index)
        candidates = []
        for j in range(max(len(r) for r in refs)):
            targets = [r[min(j, len(r) - 1)] for r in refs]
            xj, losses = self._step_all(x, x0, targets, bar)
            outputs = self._generate(xj)
            (_, per_ref), = self.scorer.score_sets([(outputs, refs)])
            metric = self._worst_metric(per_ref)
            scores = [p[metric] for p in per_ref]
            candidates.append((xj, outputs, losses))
            best = [(s, j) for s in scores] if best is None else \
                [(s, j) if s < b[0] else b for s, b in zip(scores, best)]
        pick = torch.tensor([j for _, j in best])
        stacked = torch.stack([c[0] for c in candidates])  # (candidates, N, ...)
        x_new = stacked[pick.to(stacked.device), torch.arange(len(pick), device=stacked.device)]
        outputs = [candidates[j][1][i] for i, (_, j) in enumerate(best)]
        losses = [candidates[j][2][i] for i, (_, j) in enumerate(best)]
        return x_new, outputs, losses

    def _round(self, rnd, x, x0, targets, bar):
        """Round ``rnd`` from ``x``: the adversarial images, their outputs and attack losses."""
        if rnd == 1 and self.cfg.attack != "bim":
            x = self._random_start(x0)
        if self.cfg.worst_case:
            return self._worst_case_round(x, x0, bar)
        x, losses = self._step_all(x, x0, targets, bar)
        return x, self._generate(x), losses

    def _attack_loss(self, x, targets):
        losses = []
        with torch.no_grad():
            for i in range(0, len(self.items), self.cfg.batch_size):
                sl = slice(i, i + self.cfg.batch_size)
                ce = TeacherForcedCE(self.bundle, [it.prompt for it in self.items[sl]], targets[sl],
                                     self._to_model, self.device)
                losses += ce.per_sample(x[sl]).tolist()
        return losses

    def _score_and_write(self, rnd, outputs, clean, losses):
        refs = [it.references for it in self.items]
        (corpus_ref, per_ref), (corpus_clean, per_clean) = self.scorer.score_sets(
            [(outputs, refs), (outputs, [[c] for c in clean])])
        lines = []
        success = self._target_success(outputs)
        for i, it in enumerate(self.items):
            rec = {"model": self.name, "id": it.id, "round": rnd, "output": outputs[i],
                   "attack_loss": losses[i], "scores": {"reference": per_ref[i], "clean": per_clean[i]}}
            if it.prompt:
                rec["prompt"] = it.prompt
            if success is not None:
                rec["target_success"] = success[i]
            lines.append(json.dumps(rec))
        rounds_dir = self.out / "rounds"
        _write_text(rounds_dir / f"round_{rnd:03d}.jsonl", "\n".join(lines) + "\n")
        summary = {"model": self.name, "round": rnd, "n": len(outputs),
                   "attack_loss": float(np.mean(losses)) if losses else float("nan"),
                   "corpus": {"reference": corpus_ref, "clean": corpus_clean}}
        if success is not None:
            summary["target_success_rate"] = float(np.mean(success))
        _write_text(rounds_dir / f"round_{rnd:03d}.json", json.dumps(summary, indent=1))

    def _target_success(self, outputs):
        """Per output: does it equal ``--target-text`` after the exact-match normalisation? (None
        for an untargeted attack)."""
        if self.cfg.target_text is None:
            return None
        from .data import normalize_text

        want = normalize_text(self.cfg.target_text)
        return [normalize_text(o) == want for o in outputs]

    def _save_state(self, rnd, x, clean):
        _atomic_write(self.out / "state.pt", lambda p: torch.save({"round": rnd, "x": x.cpu(), "clean": clean}, p))

    def _save_grid(self, x0, x, clean, outputs, rnd):
        n = min(GRID_SAMPLES, len(self.items))
        np.savez_compressed(self.out / "grid.npz", ids=np.array([it.id for it in self.items[:n]]),
                            clean_images=_to_uint8(self._to_pixel(x0[:n])), adv_images=_to_uint8(self._to_pixel(x[:n])),
                            clean_outputs=np.array(clean[:n]), adv_outputs=np.array(outputs[:n]),
                            references=np.array([it.references[0] for it in self.items[:n]]),
                            prompts=np.array([it.prompt for it in self.items[:n]]), round=rnd)

    def run(self, stop_after=None):
        """Run (or resume) rounds ``0..rounds``. ``stop_after``: stop once that round is written
        (used to test resuming). Returns the path of the model's ``samples.jsonl``."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "rounds").mkdir(exist_ok=True)
        self._check_or_write_config()
        done, x, clean = self._load_state()
        x0 = self._clean_inputs()
        if done < 0:
            clean = self._generate(x0)
            targets = self._targets(clean)
            self._score_and_write(0, clean, clean, self._attack_loss(x0, targets))
            x, done = x0.clone(), 0
            self._save_state(0, x, clean)
        x = x.to(self.device)
        targets = self._targets(clean)
        outputs = clean
        todo = self.cfg.rounds - done
        bar = None
        if todo > 0 and self.progress:
            from tqdm.auto import tqdm

            per_round = max(len(it.references) for it in self.items) if self.cfg.worst_case else 1
            bar = tqdm(total=todo * per_round * len(self.items), desc=f"{self.cfg.attack.upper()} {self.name}",
                       unit="img", file=sys.stderr)
        for rnd in range(done + 1, self.cfg.rounds + 1):
            if stop_after is not None and rnd > stop_after:
                break
            x, outputs, losses = self._round(rnd, x, x0, targets, bar)
            self._score_and_write(rnd, outputs, clean, losses)
            self._save_state(rnd, x, clean)
            done = rnd
        if bar is not None:
            bar.close()
        if done >= 1 and outputs is clean:  # resumed after the last round: reload its outputs for the grid
            outputs = [json.loads(l)["output"] for l in (self.out / "rounds" / f"round_{done:03d}.jsonl").open()]
        self._save_grid(x0, x, clean, outputs, done)
        return self._collect(done)

    def _collect(self, last):
        path = self.out / "samples.jsonl"
        parts = [(self.out / "rounds" / f"round_{r:03d}.jsonl").read_text() for r in range(last + 1)]
        _write_text(path, "".join(parts))
        return path

    # ---- several processes
    #
    # Every image's rounds depend on that image alone (per-sample losses, per-image random starts),
    # so the images can be split over processes and each attacked through all its rounds at once.
    # Only the scores need the whole set (CIDEr-D's document frequencies come from every image's
    # references): the processes write outputs and losses, and rank 0 scores the merged rounds.

    def _view(self, index):
        """This attack restricted to the items at ``index`` (positions in the whole run)."""
        view = copy.copy(self)
        view.items, view.index = [self.items[i] for i in index], list(index)
        return view

    def _partials(self, done):
        """Batches finished by any process since the last merge: ``{index: (partial, position)}``.
        A partial of another start or round count (an older, interrupted run) is ignored."""
        found = {}
        for path in sorted((self.out / "partial").glob("part-*.pt")):
            part = torch.load(path, map_location="cpu", weights_only=True)
            if part["start"] != done or part["rounds"] != self.cfg.rounds:
                continue
            if len(part["outputs"]) != self.cfg.rounds - done:   # rounds 0..R fresh, done+1..R resumed
                raise RuntimeError(f"{path} holds {len(part['outputs'])} rounds, expected {self.cfg.rounds - done}")
            for j, (i, item_id) in enumerate(zip(part["index"], part["ids"])):
                if i < len(self.items) and self.items[i].id == item_id:
                    found[i] = (part, j)
        return found

    def _attack_batch_rounds(self, index, done, state_x, state_clean):
        """Every round after ``done`` for the items at ``index``; written to one partial file."""
        view = self._view(index)
        x0 = view._clean_inputs()
        outputs, losses = [], []
        if done < 0:
            clean = view._generate(x0)
            losses.append(view._attack_loss(x0, view._targets(clean)))
            outputs.append(clean)
            x = x0.clone()
        else:
            clean = [state_clean[i] for i in index]
            x = state_x[index].to(self.device)
        targets = view._targets(clean)
        for rnd in range(max(done, 0) + 1, self.cfg.rounds + 1):
            x, out, loss = view._round(rnd, x, x0, targets, None)
            outputs.append(out)
            losses.append(loss)
        part = {"start": done, "rounds": self.cfg.rounds, "index": list(index), "ids": [it.id for it in view.items],
                "clean": clean, "outputs": outputs, "losses": losses, "x": x.cpu()}
        _atomic_write(self.out / "partial" / f"part-{index[0]:06d}.pt", lambda p: torch.save(part, p))
        self.attacked.extend(it.id for it in view.items)

    def _merge(self, done):
        """Rank 0: the partials in item order, scored and written as a single-process run writes them."""
        found = self._partials(done)
        missing = [it.id for i, it in enumerate(self.items) if i not in found]
        if missing:
            raise RuntimeError(f"{self.out}: no process attacked {len(missing)} image(s), e.g. {missing[:3]}")
        at = [found[i] for i in range(len(self.items))]
        clean = [part["clean"][j] for part, j in at]
        # A fresh run's partials start with round 0 (the clean outputs); a resumed one's after ``done``.
        for k, rnd in enumerate(range(0 if done < 0 else done + 1, self.cfg.rounds + 1)):
            self._score_and_write(rnd, [part["outputs"][k][j] for part, j in at], clean,
                                  [part["losses"][k][j] for part, j in at])
        self._save_state(self.cfg.rounds, torch.stack([part["x"][j] for part, j in at]), clean)

    def run_sharded(self, world, stop_after_batches=None):
        """Run (or resume) the attack as one of ``world.size`` processes (see ``distributed.World``).

        Process ``r`` attacks the items ``i`` with ``i % size == r``, ``batch_size`` at a time,
        each batch through every round, and writes each finished batch to ``partial/``; a rerun
        skips every item a partial holds, whichever process wrote it. Rank 0 then merges the
        partials into the files :meth:`run` writes (rounds, state, grid, samples) and scores them
        there, on every image at once, so scores equal a single-process run's.
        ``stop_after_batches``: stop after that many batches, unmerged (used to test resuming).
        Returns the path of ``samples.jsonl`` on rank 0, else None."""
        if self.cfg.worst_case and world.size > 1:
            raise ValueError("--worst-case-over-references runs in one process only: its per-round choice "
                             "scores every image at once")
        self.attacked = []
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "rounds").mkdir(exist_ok=True)
        (self.out / "partial").mkdir(exist_ok=True)
        self._check_or_write_config(write=False)
        world.barrier()                     # every process has read the old config before rank 0 updates it
        if world.main:
            self._check_or_write_config()
        done, state_x, state_clean = self._load_state()
        if done >= self.cfg.rounds:
            todo = []
        else:
            finished = self._partials(done)
            todo = [i for i in range(world.rank, len(self.items), world.size) if i not in finished]
        bs = self.cfg.batch_size
        batches = [todo[i:i + bs] for i in range(0, len(todo), bs)]
        total, steps = world.sum(len(todo)), world.max(len(batches))
        bar = None
        if world.main and self.progress and total:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=f"{self.cfg.attack.upper()} {self.name} ({world.size} processes)",
                       unit="img", file=sys.stderr)
        # In step: the global count for rank 0's bar is one sum per batch (a process with fewer
        # batches adds zeros), so no process waits for another's files.
        for k in range(steps):
            if stop_after_batches is not None and k >= stop_after_batches:
                return None
            mine = 0
            if k < len(batches):
                self._attack_batch_rounds(batches[k], done, state_x, state_clean)
                mine = len(batches[k])
            n = world.sum(mine)
            if bar is not None:
                bar.update(n)
        if bar is not None:
            bar.close()
        world.barrier()                     # every partial is written
        if not world.main:
            return None
        if done < self.cfg.rounds:
            self._merge(done)
        shutil.rmtree(self.out / "partial", ignore_errors=True)
        # The merged state is a finished single-process run: run() writes the grid and samples.jsonl.
        return self.run()


# --------------------------------------------------------------------------- CLI


SUBSETS = ("held-out", "first")


def fraction(text):
    """A float written as a number or a fraction: ``0.5``, ``4/255``."""
    num, slash, den = str(text).partition("/")
    try:
        value = float(num) / float(den) if slash else float(num)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction like 4/255, got {text!r}") from None
    return value


def build_parser():
    p = argparse.ArgumentParser(prog="prsl-attack", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", nargs="+", required=True,
                   help="checkpoint directories (prsl-finetune outputs, their checkpoint-N folders, or compatible "
                        "HF checkpoints)")
    p.add_argument("--name", nargs="+", default=None, help="display names, one per --model (default: dir names)")
    p.add_argument("--processor", default=None,
                   help="folder with the tokenizer and image processor, when --model has none (default: the "
                        "checkpoint, else the run folder above a checkpoint-N)")
    p.add_argument("--task", choices=sorted(TASK_DEFAULTS), default=None,
                   help="default: from the checkpoints' prsl_finetune.json, else their architecture (BLIP-2: vqa, "
                        "VisionEncoderDecoder: caption)")
    p.add_argument("--data", default="synthetic", help="'synthetic', a COCO captions JSON or a VG question_answers.json")
    p.add_argument("--image-dir", nargs="+", default=None,
                   help="image folder(s) of file data, searched in order (Visual Genome: VG_100K VG_100K_2, or "
                        "their parent; default: the JSON's folder)")
    p.add_argument("--split", default="eval", help="synthetic split (salts the seed)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--subset", choices=SUBSETS, default="held-out",
                   help="held-out: when --data is the file the checkpoints were fine-tuned on, attack the images "
                        "they held out (recorded in prsl_finetune.json), never training images; first: the first "
                        "N images of --data, whatever they were used for")
    p.add_argument("--ids-file", default=None,
                   help="attack exactly these sample ids (one per line, e.g. coco-139 or vg-1); overrides --subset")
    p.add_argument("--num-samples", type=int, default=64, help="images attacked (the first N of the chosen subset)")
    p.add_argument("--questions-per-image", type=int, default=1, help="vqa: questions attacked per image")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--attack", choices=ATTACKS, default="bim",
                   help="bim: the paper's; pgd: random start + projected steps; apgd: AutoAttack's APGD-CE")
    p.add_argument("--steps-per-round", "--steps", dest="steps_per_round", type=int, default=1,
                   help="attack steps between two evaluations (RobustVLM: --attack apgd --steps 100 --rounds 1)")
    p.add_argument("--eps", type=fraction, default=None,
                   help="L-inf radius, e.g. 4/255 (default: bim per task, caption 0.5, vqa 1.0 in normalised space, "
                        "times the processor std in pixel space; pgd / apgd 4/255 in pixel space)")
    p.add_argument("--alpha", type=fraction, default=None,
                   help="step size, e.g. 1/255 (default: bim per task, caption 0.01, vqa 0.5; pgd 2.5 eps / steps; "
                        "apgd sets its own)")
    p.add_argument("--space", choices=("normalized", "pixel"), default=None,
                   help="normalized: the paper's setting (bim's default); pixel: [0,1] pixels before the processor's "
                        "normalisation (pgd / apgd's default). Both clamp every step to valid images")
    p.add_argument("--target-text", default=None,
                   help="targeted attack: descend the teacher-forced CE of this text; reports the success rate")
    p.add_argument("--worst-case-over-references", dest="worst_case", action="store_true",
                   help="attack each reference's CE in turn and keep, per image, the result scoring worst (RobustVLM)")
    p.add_argument("--seed", type=int, default=0, help="pgd / apgd random starts")
    p.add_argument("--target", choices=("clean", "reference"), default="clean",
                   help="text whose teacher-forced CE is ascended: the clean output or the first reference")
    p.add_argument("--num-beams", type=int, default=None,
                   help="default: the checkpoint's generation config, else 1 (greedy)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the checkpoint's generation config, else 24")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bertscore-model", default=None,
                   help="local encoder dir for BERTScore (default: the embedded MiniLM; t5-base / deberta-xlarge "
                        "dirs get bert_score's layer counts)")
    p.add_argument("--bertscore-layers", type=int, default=None)
    p.add_argument("--metrics", nargs="+", default=None,
                   help="subset of the metrics (default: all; captioning leaves out vqa_accuracy). bleu1-4, meteor, "
                        "rouge_l and cider need Java; bertscore_f1, exact_match and vqa_accuracy do not")
    p.add_argument("--output-dir", default="outputs/attack")
    p.add_argument("--overwrite", action="store_true", help="discard earlier results instead of resuming")
    p.add_argument("--no-report", action="store_true", help="skip report.md and figures")
    p.add_argument("--no-progress", action="store_true")
    return show_defaults(p)


def _task_for(model_dirs, task):
    from .checkpoints import checkpoint_task

    if task is not None:
        return task
    tasks = {checkpoint_task(m) for m in model_dirs} - {None}
    if len(tasks) > 1:
        raise ValueError(f"checkpoints were trained for different tasks {sorted(tasks)}: pass --task")
    if not tasks:
        raise ValueError("cannot tell the task from the checkpoints (no prsl_finetune.json, unknown architecture): "
                         "pass --task caption or --task vqa")
    return tasks.pop()


def _names(model_dirs, names):
    if names is not None:
        if len(names) != len(model_dirs):
            raise ValueError(f"--name needs one name per --model ({len(model_dirs)}), got {len(names)}")
        if len(set(names)) != len(names):
            raise ValueError("--name values must be distinct")
        return list(names)
    out = []
    for m in model_dirs:
        base = Path(m).resolve().name or "model"
        name, n = base, 2
        while name in out:
            name, n = f"{base}-{n}", n + 1
        out.append(name)
    return out


def _run_info(model_dir):
    """The model's prsl_finetune.json, or for a checkpoint-N folder its run's."""
    from .checkpoints import read_run_info

    return read_run_info(model_dir) or read_run_info(Path(model_dir).parent)


def _same_file(a, b):
    try:
        return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def select_samples(samples, args, model_dirs):
    """The samples to attack, per ``--ids-file`` / ``--subset`` (see :func:`build_parser`), and a
    sentence saying which they are."""
    by_id = {s.id: s for s in samples}
    if args.ids_file:
        ids = [ln.strip() for ln in Path(args.ids_file).read_text().splitlines() if ln.strip()]
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ValueError(f"--ids-file: {len(missing)} id(s) not in {args.data}, e.g. {missing[:3]}")
        return [by_id[i] for i in ids][:args.num_samples], f"the {min(len(ids), args.num_samples)} ids of {args.ids_file}"
    if args.data == "synthetic" or args.subset == "first":
        return samples[:args.num_samples], f"the first {min(len(samples), args.num_samples)} images of {args.data}"
    held_out = None
    for m in model_dirs:
        data = _run_info(m).get("data", {})
        if _same_file(data.get("source_path") or data.get("source"), args.data):
            if data.get("eval_data"):
                continue            # held out in a separate file: nothing of this one was held out
            ids = data.get("held_out_ids")
            if ids is None:
                raise ValueError(f"{m} was fine-tuned on {args.data} but its prsl_finetune.json records no held-out "
                                 "image ids (an older run): pass --subset first or --ids-file")
            if not ids:
                raise ValueError(f"{m} was fine-tuned on every image of {args.data} (none held out): attack "
                                 "another file, or pass --subset first to attack training images anyway")
            held_out = set(ids) if held_out is None else held_out & set(ids)
    if held_out is None:
        return samples[:args.num_samples], (f"the first {min(len(samples), args.num_samples)} images of {args.data} "
                                            "(not the checkpoints' training file)")
    chosen = [s for s in samples if s.id in held_out]
    if not chosen:
        raise ValueError(f"the checkpoints share no held-out image of {args.data}: pass --subset first or --ids-file")
    return chosen[:args.num_samples], f"{min(len(chosen), args.num_samples)} images of {args.data} held out from fine-tuning"


def run(args, world=None):
    """Attack every model of ``args`` (parsed by :func:`build_parser`); returns the output dir.

    Under ``torchrun`` / ``accelerate launch`` (``world``, see ``distributed.init_world``) the
    images are split over the processes and rank 0 writes the merged results and the report."""
    from . import data as data_mod
    from .distributed import World
    from .metrics import CAPTION_METRICS, METRICS, CaptionScorer
    from .checkpoints import load_bundle

    for m in args.model:
        if not any((Path(m) / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise SystemExit(f"prsl-attack: {m} is not a checkpoint directory (no config.json) nor a LoRA adapter "
                             "(no adapter_config.json)")
    world = world or World()
    task = _task_for(args.model, args.task)
    names = _names(args.model, args.name)
    config = AttackConfig(task=task, rounds=args.rounds, eps=args.eps, alpha=args.alpha,
                          steps_per_round=args.steps_per_round, space=args.space, target=args.target,
                          attack=args.attack, target_text=args.target_text, worst_case=args.worst_case,
                          seed=args.seed, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size, device=world.device(args.device)).validate()
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    metrics = args.metrics or (CAPTION_METRICS if task == "caption" else METRICS)
    out = Path(args.output_dir)
    # The scorer first: a missing Java or BERTScore model is reported before any model loads.
    with CaptionScorer(args.bertscore_model, args.bertscore_layers, metrics=metrics, device=args.device) as scorer:
        file_data = args.data != "synthetic"
        samples = data_mod.load_samples(args.data, split=args.split, task=task, seed=args.data_seed,
                                        n_images=args.num_samples, image_dir=args.image_dir,
                                        limit=None if file_data else args.num_samples)
        samples, which = select_samples(samples, args, args.model)
        if not args.no_progress and world.main:
            print(f"prsl-attack: {task}, {which}" + (f", over {world.size} processes" if world.size > 1 else ""),
                  file=sys.stderr)
        items = attack_items(samples, task, args.questions_per_image)
        for model_dir, name in zip(args.model, names):
            model_out = out / name
            if args.overwrite and model_out.exists() and world.main:
                shutil.rmtree(model_out)
            world.barrier()
            bundle = load_bundle(model_dir, processor_path=args.processor)
            attack = ModelAttack(bundle, items, model_out, config, scorer, model_path=str(Path(model_dir).resolve()),
                                 name=name, run_info=_run_info(model_dir), progress=not args.no_progress)
            attack.run() if world.size == 1 else attack.run_sharded(world)
    if not args.no_report and world.main:
        from .report import write_report

        write_report([out / n for n in names], out)
    return out


def main(argv=None):
    cpu_accelerator_without_gpu()
    from .distributed import init_world, leave_process_group

    args = build_parser().parse_args(argv)
    world = init_world(args.device)
    try:
        out = run(args, world)
    except (ValueError, RuntimeError, FileNotFoundError, OSError) as err:
        if world.size > 1:
            print(f"prsl-attack (rank {world.rank}): {err}", file=sys.stderr)
            leave_process_group(1)
        raise SystemExit(f"prsl-attack: {err}") from err
    if world.main:
        print(f"prsl-attack: results in {out}")
    leave_process_group(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
