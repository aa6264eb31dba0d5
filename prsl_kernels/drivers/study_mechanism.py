"""``prsl-study --design mechanism``: does the penalty change the model, and does that change robustness?

The two earlier designs (``docs/study-run``, ``docs/study-dose``) never checked the treatment and
paired two bases with five data orders. This design, pre-registered in
``docs/study-mechanism/preregistration.md``, runs in four phases, each resumable:

1. **Bases.** ``bases`` tiny ViT-GPT2 captioners trained with CE from different init seeds for
   different lengths, so that their clean exact match spans a range (no gate: the spread is the point).
2. **Treatment check.** From base 0, CE and PRSL k=20 at b = 1 and 64 fine-tune at a constant learning
   rate; at each of ``treatment_steps`` the checkpoint is measured on held-out tokens (teacher-forced on
   the first reference of the held-out images): mean D, the top-k spread S, the target logit margin, CE,
   and ``||grad_x CE||_1`` over [0, 1] pixels. The main study uses the shortest length at which b = 64
   cuts held-out D by at least ``min_cut`` against CE (:func:`choose_steps`).
3. **Main comparison.** Every base x seed is fine-tuned with CE and with PRSL k=20 b=64 at that length
   (constant learning rate, a data order per (base, seed)); each model is measured as in 2 and attacked.
4. **Attacks** on the same held-out images (:mod:`.study_mechanism_attacks`): the paper's BIM, APGD-CE at
   4/255 in pixel space, APGD on a margin (CW-style) objective at 4/255, and per image the smallest eps at
   which the caption changes under the margin attack (bisection).

The analysis and report are in :mod:`.study_mechanism_report`. Work goes to ``--output-dir``
(default ``outputs/study-mechanism``), the report to ``--report-dir`` (``docs/study-mechanism``). The run
records ``git rev-parse HEAD``, the dirty files of the tree, and the diff against HEAD of every package
file it imported (``run_diff.patch``), so a run on a tree with uncommitted edits says what it ran.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

#: PRSL's k and the doses of the treatment check; the main study's PRSL arm is the largest b.
K, TREATMENT_B, MAIN_B = 20, (1.0, 64.0), 64.0

SIZES = {
    # The test suite's: every phase in well under a minute.
    "smoke": dict(
        base_steps=(4, 3, 2), seeds=1, gate_images=6, heldout_images=6,
        base=dict(train_images=48, hidden=32, layers=1, heads=2, patch=16, batch_size=16, logging_steps=1,
                  max_new_tokens=12),
        treatment_steps=(1, 2), min_cut=0.30, budget_steps=2,
        finetune=dict(lr=5e-4, logging_steps=1),
        attack=dict(images=4, batch_size=4, max_new_tokens=12, bim_rounds=2, apgd_steps=2, eps=4 / 255,
                    eps_max=16 / 255, eps_min=1 / 255, bisect_probes=2, bisect_steps=2)),
    # About 1 h on one CPU core (see the pre-registration for the measured sizes).
    "default": dict(
        base_steps=(3000, 2400, 1900, 1500, 1200, 900, 700, 500), seeds=2, gate_images=200, heldout_images=200,
        base=dict(train_images=2000, hidden=64, layers=2, heads=4, patch=8, batch_size=32, logging_steps=100,
                  max_new_tokens=24),
        treatment_steps=(150, 600, 2000), min_cut=0.30, budget_steps=600,
        finetune=dict(lr=5e-4, logging_steps=25),
        attack=dict(images=48, batch_size=48, max_new_tokens=24, bim_rounds=5, apgd_steps=10, eps=4 / 255,
                    eps_max=16 / 255, eps_min=1 / 16 / 255, bisect_probes=6, bisect_steps=10)),
}


# --------------------------------------------------------------------------- configs


def base_config(out, size, index):
    """Base ``index``: CE from scratch, init seed 10 + index, ``base_steps[index]`` steps (linear decay)."""
    from . import finetune

    spec = SIZES[size]
    return finetune.demo_config(Path(out) / "bases" / f"base{index}", loss="ce", k=6, b=0.0, seed=10 + index,
                                max_steps=spec["base_steps"][index], eval_samples=0, **spec["base"])


def arm_kw(b):
    return {"loss": "ce", "k": 6, "b": 0.0} if b == 0 else {"loss": "prsl", "k": K, "b": float(b)}


def arm_label(b):
    return "ce" if b == 0 else f"prsl-k{K}-b{b:g}"


def finetune_config(base_dir, path, size, b, seed, steps):
    """A fine-tune of ``base_dir`` at a constant learning rate (no warm-up, no decay), so that the
    first N steps of a longer run are the N-step run: the treatment check's checkpoints are the
    models the main study would train at that length."""
    from . import finetune

    spec = SIZES[size]
    keep = {k: v for k, v in spec["base"].items() if k not in finetune.PRESET_ONLY}
    cfg = finetune.demo_config(path, model=str(Path(base_dir).resolve()), seed=seed, eval_samples=0,
                               **{**keep, **spec["finetune"], "max_steps": steps})
    return dataclasses.replace(cfg, schedule="constant", warmup_ratio=0.0, save_total_limit=None,
                               window_start=0, **arm_kw(b))


def heldout_samples(size):
    from .data import synthetic_dataset

    return synthetic_dataset(SIZES[size]["heldout_images"], 0, split="study-gate", image_size=64)


def attack_samples(size):
    from .data import synthetic_dataset

    return synthetic_dataset(SIZES[size]["attack"]["images"], 0, split="eval", image_size=64)


# --------------------------------------------------------------------------- measurements


def treatment_measures(bundle, samples, k=K, batch_size=50):
    """What the penalty acts on, per held-out image's first reference (teacher-forced), averaged over
    tokens (D, S, margin, CE, accuracy) and over images (the gradient norm):

    - ``held_out_D_mean``: D = sqrt(sum_{j in A} (p_j - p_min)^2), the spec's distance, per token;
    - ``spread``: S = sum_{j in A} (p_j - p_min), the top-k spread above the k-th probability;
    - ``margin``: z_s - max_{j != s} z_j, the target logit margin;
    - ``grad_l1``: ||grad_x CE||_1 with x the image in [0, 1] pixels and CE the image's mean token CE.
    """
    import torch
    import torch.nn.functional as F

    from ..loss import prsl_loss
    from ..spec import IGNORE_INDEX

    model = bundle.model
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    mean, std = bundle.image_mean, bundle.image_std
    sums = dict(D=0.0, S=0.0, margin=0.0, ce=0.0, correct=0.0, tokens=0, grad_l1=0.0, images=0)
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        pix = (bundle.pixel_values([s.image for s in chunk]) * std + mean).requires_grad_(True)
        text = bundle.text_inputs([""] * len(chunk), [s.captions[0] for s in chunk])
        labels = text.pop("labels")
        logits = model(**bundle.image_inputs((pix - mean) / std), **text).logits
        logits, targets = bundle.align(logits, labels)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none").view(targets.shape)
        per_image = ce.sum(1) / (targets != IGNORE_INDEX).sum(1).clamp_min(1)
        (grad,) = torch.autograd.grad(per_image.sum(), pix)
        with torch.no_grad():
            keep = targets.flatten() != IGNORE_INDEX
            z, t = logits.flatten(0, 1).float()[keep], targets.flatten()[keep]
            _, stats = prsl_loss(z, t, k, 1.0, reduction="none", backend="reference", return_stats=True)
            zs = z.gather(1, t[:, None]).squeeze(1)
            other = z.scatter(1, t[:, None], float("-inf")).amax(1)
            sums["D"] += float(stats.dist.sum())
            sums["S"] += float(stats.spread_sum.sum())
            sums["margin"] += float((zs - other).sum())
            sums["ce"] += float(ce.sum())
            sums["correct"] += float(stats.correct.sum())
            sums["tokens"] += int(t.numel())
            sums["grad_l1"] += float(grad.abs().flatten(1).sum(1).sum())
            sums["images"] += len(chunk)
    n, m = max(sums["tokens"], 1), max(sums["images"], 1)
    return {"held_out_D_mean": sums["D"] / n, "spread": sums["S"] / n, "margin": sums["margin"] / n,
            "ce": sums["ce"] / n, "token_accuracy": sums["correct"] / n, "grad_l1": sums["grad_l1"] / m,
            "tokens": sums["tokens"], "images": sums["images"]}


def choose_steps(treatment, steps, min_cut, budget_steps):
    """The pre-registered rule: the shortest length at which PRSL b=64's held-out D is at most
    (1 - min_cut) x CE's at the same length. If none, the longest length, capped at ``budget_steps``
    (the session's budget; a stated deviation). Returns (chosen, reason)."""
    by = {(r["b"], r["steps"]): r["held_out_D_mean"] for r in treatment}
    for s in steps:
        ce, pr = by.get((0.0, s)), by.get((MAIN_B, s))
        if ce is not None and pr is not None and pr <= (1 - min_cut) * ce:
            return s, f"b={MAIN_B:g} cuts held-out D by {1 - pr / ce:.0%} at {s} steps (rule: >= {min_cut:.0%})"
    longest = min(max(steps), budget_steps)
    return longest, (f"no length cuts held-out D by {min_cut:.0%}; the longest that fits the budget, {longest} "
                     "steps")


# --------------------------------------------------------------------------- provenance


def _git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=30,
                              cwd=Path(__file__).resolve().parents[2]).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def provenance(out):
    """HEAD, the tree's dirty paths, and the diff against HEAD of the package files this process has
    imported (written to ``run_diff.patch``): what the run ran, even on a tree with uncommitted edits.

    The first invocation's record is kept (``provenance.json``); a later one (resuming, or only
    rebuilding the report) is appended under ``"reruns"`` with its diff in ``run_diff.rerun.patch``."""
    path = Path(out) / "provenance.json"
    first = json.loads(path.read_text()) if path.is_file() else None
    root = Path(__file__).resolve().parents[2]
    pkg = root / "prsl_kernels"
    imported = sorted({str(Path(m.__file__).resolve().relative_to(root)) for m in list(sys.modules.values())
                       if getattr(m, "__file__", None) and Path(m.__file__).resolve().is_relative_to(pkg)})
    diff = _git("diff", "HEAD", "--", *imported) if imported else ""
    (Path(out) / ("run_diff.patch" if first is None else "run_diff.rerun.patch")).write_text(diff)
    dirty = [ln[3:] for ln in _git("status", "--porcelain").splitlines() if ln.strip()]
    now = {"commit": _git("rev-parse", "HEAD").strip() or "unknown", "imported_files": imported,
           "dirty_imported_files": sorted({ln.split(" b/")[-1] for ln in diff.splitlines()
                                           if ln.startswith("diff --git")}),
           "imported_diff_sha256": hashlib.sha256(diff.encode()).hexdigest(), "dirty_tree_paths": dirty,
           "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    if first is None:
        record = {**now, "reruns": []}
    else:
        record = {**first, "reruns": first.get("reruns", []) + [
            {k: now[k] for k in ("commit", "dirty_imported_files", "imported_diff_sha256", "started")}]}
    path.write_text(json.dumps(record, indent=1))
    return record


# --------------------------------------------------------------------------- phases


def _json(path, make):
    """``path``'s JSON if present, else ``make()`` written there (the unit of resumption)."""
    path = Path(path)
    if path.is_file():
        return json.loads(path.read_text()), False
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)
    return value, True


def _measure(model_dir, samples):
    from .checkpoints import load_bundle

    return treatment_measures(load_bundle(model_dir), samples)


def train_bases(out, size, log):
    from .study_jobs import clean_quality, train_model

    spec = SIZES[size]
    gate = heldout_samples(size)[:spec["gate_images"]]
    bases = []
    for i in range(len(spec["base_steps"])):
        cfg = base_config(out, size, i)
        info, reused = train_model(cfg)
        q, _ = _json(Path(cfg.output_dir) / "mechanism_quality.json", lambda: clean_quality(cfg.output_dir, gate))
        bases.append({"base": i, "dir": cfg.output_dir, "init_seed": cfg.seed, "steps": info.get("steps"),
                      "train_s": info.get("wall_s"), **q})
        log(f"base{i}: {info.get('steps')} steps, clean exact match {q['exact_match']:.3f}"
            f"{' (reused)' if reused else ''}")
    return bases


def _train_to(cfg, step, final):
    """Bring the run of ``cfg`` to ``step`` (a checkpoint-``step``, or the finished run when ``final``),
    resuming from its last checkpoint. Returns the directory holding the model at ``step``."""
    from . import finetune
    from .checkpoints import read_run_info

    out = Path(cfg.output_dir)
    if final:
        if read_run_info(out).get("completed"):
            return out
        stop = None
    else:
        ckpt = out / f"checkpoint-{step}"
        if (ckpt / "trainer_state.json").is_file():
            return ckpt
        stop = step
    last = finetune.last_checkpoint(out)
    if last is not None and int(last.name.split("-")[-1]) > step:
        raise RuntimeError(f"{out}: checkpoint-{step} is missing but later checkpoints exist; delete the folder")
    finetune.train(dataclasses.replace(cfg, resume=last is not None, stop_at_step=stop, progress=False))
    return out if final else out / f"checkpoint-{step}"


def treatment_check(out, size, base_dir, log):
    spec = SIZES[size]
    samples = heldout_samples(size)
    steps = spec["treatment_steps"]
    rows = []
    for b in (0.0, *TREATMENT_B):
        cfg = finetune_config(base_dir, Path(out) / "treatment" / arm_label(b), size, b, seed=100, steps=max(steps))
        for s in steps:
            def make(s=s):
                t0 = time.time()
                where = _train_to(cfg, s, final=s == max(steps))
                return {**_measure(where, samples), "train_and_measure_s": time.time() - t0}
            m, fresh = _json(Path(out) / "treatment" / f"{arm_label(b)}-{s}.json", make)
            rows.append({"arm": arm_label(b), "b": b, "k": K if b else 0, "steps": s, **m})
            log(f"treatment {arm_label(b)} {s} steps: D {m['held_out_D_mean']:.4f}, spread {m['spread']:.4f}, "
                f"margin {m['margin']:.3f}, CE {m['ce']:.3f}, |grad|_1 {m['grad_l1']:.3f}"
                f"{'' if fresh else ' (reused)'}")
    return rows


def main_models(out, size, bases, chosen, log):
    """Every base x seed fine-tuned with CE and PRSL b=64 for ``chosen`` steps, measured and attacked."""
    from .checkpoints import read_run_info
    from .study_jobs import train_model
    from .study_mechanism_attacks import attack_model

    spec = SIZES[size]
    samples, items = heldout_samples(size), attack_samples(size)
    models = []
    for base in bases:
        for s in range(spec["seeds"]):
            for b in (0.0, MAIN_B):
                name = f"{arm_label(b)}-base{base['base']}-s{s}"
                path = Path(out) / "models" / f"steps{chosen}" / arm_label(b) / f"base{base['base']}-s{s}"
                # A data order per (base, seed): seed s of one base shares nothing with seed s of another.
                cfg = finetune_config(base["dir"], path, size, b, seed=1000 + 10 * base["base"] + s, steps=chosen)
                info, reused = train_model(cfg)
                m, _ = _json(path / "mechanism_measures.json", lambda: _measure(path, samples))
                att, fresh = _json(path / "mechanism_attacks.json",
                                   lambda: attack_model(path, items, spec["attack"], name))
                models.append({"model": name, "arm": arm_label(b), "b": b, "base": base["base"], "seed": s,
                               "dir": str(path), "steps": info.get("steps"),
                               "train_loss": read_run_info(path).get("train_loss"), "measures": m, "attacks": att})
                log(f"{name}: D {m['held_out_D_mean']:.4f}, margin {m['margin']:.3f}, |grad|_1 {m['grad_l1']:.3f}, "
                    f"min eps (margin) {att['summary']['margin_min_eps_mean'] * 255:.2f}/255, changed at 4/255: "
                    f"APGD-CE {att['summary']['apgd_ce_changed']:.2f}, APGD-margin "
                    f"{att['summary']['apgd_margin_changed']:.2f}{'' if fresh or not reused else ' (reused)'}")
    return models


def run_mechanism(args):
    import torch

    from .models import quiet_transformers
    from .study_jobs import add_wall_time, worker_init
    from .study_mechanism_report import write_mechanism_report

    size = args.size
    if size not in SIZES:
        raise ValueError(f"--design mechanism has sizes {sorted(SIZES)}, got {size!r}")
    threads = torch.get_num_threads()
    out = Path(args.output_dir or "outputs/study-mechanism")
    report_dir = Path(args.report_dir or "docs/study-mechanism")
    if args.overwrite and out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    report_dir.mkdir(parents=True, exist_ok=True)
    worker_init()  # one thread: the study is sized for one core
    from . import finetune, study_mechanism_attacks  # noqa: F401  (imported before the provenance is taken)
    from .. import hf, loss  # noqa: F401

    log_file = open(out / "study.log", "a", encoding="utf-8")

    def log(msg):
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        log_file.write(line + "\n")
        log_file.flush()
        if not args.no_progress:
            print(line, flush=True)

    prov = provenance(out)
    log(f"prsl-study (mechanism, {size}) at {prov['commit'][:12]}; imported files with uncommitted edits: "
        f"{prov['dirty_imported_files'] or 'none'} (diff in {out / 'run_diff.patch'})")
    t0 = time.time()
    worked = True
    with quiet_transformers():
        spec = SIZES[size]
        bases = train_bases(out, size, log)
        treatment = treatment_check(out, size, bases[0]["dir"], log)
        chosen, reason = choose_steps(treatment, spec["treatment_steps"], spec["min_cut"], spec["budget_steps"])
        log(f"chosen steps: {chosen} ({reason})")
        models = main_models(out, size, bases, chosen, log)
        wall = add_wall_time(out, time.time() - t0, worked)
        plan = dict(size=size, spec=spec, bases=bases, treatment=treatment, chosen_steps=chosen,
                    chosen_reason=reason, models=models, wall_s=wall, cpus=os.cpu_count(),
                    threads=torch.get_num_threads(), provenance=prov, out=str(out),
                    references=[s.captions for s in attack_samples(size)],
                    preregistration=_preregistration(report_dir))
        summary = write_mechanism_report(plan, report_dir)
    p = summary["primary"]
    log(f"primary: PRSL - CE = {p['estimate'] * 255:+.3f}/255 min eps (95% CI {p['ci95'][0] * 255:+.3f} to "
        f"{p['ci95'][1] * 255:+.3f}, p = {p['p']:.3g}, {p['n_bases']} bases); report {report_dir / 'report.md'}")
    log_file.close()
    torch.set_num_threads(threads)
    return summary


def _preregistration(report_dir):
    path = Path(report_dir) / "preregistration.md"
    return path.read_text() if path.is_file() else ""
