"""``prsl-study`` (``make study``): does fine-tuning with PRSL change BIM robustness at embedded scale?

Separate from the ~10-minute demo and sized for about an hour on 2 CPU cores:

1. **Competent bases.** Tiny ViT-GPT2 captioners are trained with CE on the synthetic scenes
   until a quality gate holds on a held-out gate split (exact match and the shape, colour and
   size accuracies each >= the gate), training longer while it does not.
2. **Calibration.** PRSL's weight b is chosen per k on base 0, seed 0: the largest b of a grid
   whose clean exact match stays within a margin of the CE fine-tune from the same base.
3. **Arms.** Every base is fine-tuned with each arm's loss (CE; PRSL k=6 and k=20 at the
   calibrated b; the authors' released loss at their b) for the same steps and seeds, so an arm
   and CE differ only by the loss and form pairs (base, seed).
4. **Attack as the paper.** Untargeted BIM, eps 0.5 / alpha 0.01 in normalised space with the
   valid-range clamp, one signed step per round for 10 rounds, on the same held-out images for
   every model; BERTScore (embedded MiniLM), CIDEr-D, ROUGE-L, BLEU and METEOR per round.
5. **Statistics** fixed in ``preregistration.md`` before any model is trained (paired t-test,
   Holm, equivalence test, adjustment for clean quality), and the released code's JPEG round
   trip measured on its own.

``--design mechanism`` (``study_mechanism.py``) first checks that the penalty changes what it
penalises, then compares CE with PRSL over many bases with the base as the unit, under an attack
adapted to PRSL.

``--design dose`` asks the next question, whether any b buys robustness: the same gated bases,
seeds and pairing, with arms CE and PRSL k=20 at b in {1, 4, 16, 64} (no calibration: b is the
dose), each model attacked by the paper's BIM and by APGD (AutoAttack's schedule) in [0, 1] pixel
space at eps 4/255; the slope of the endpoint against log2 b is the primary analysis.

Work goes to ``--output-dir`` (models, attack rounds; resumable: a killed study continues where
it stopped); the committed report (``report.md``, figures, ``models.csv``, ``summary.json``) to
``--report-dir``. Models train and are attacked by ``--workers`` processes of one thread each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .cli import cpu_accelerator_without_gpu
from .study_jobs import TRAINED_HERE, add_wall_time, clean_quality, scorer, train_model, worker_init

#: The paper's BIM for captioning, one signed step per round as the authors' released code.
ATTACK = dict(eps=0.5, alpha=0.01, steps_per_round=1, space="normalized", target="clean")
#: The dose design's second attack: RobustVLM's radius in [0, 1] pixels, one round of APGD steps.
APGD = dict(attack="apgd", eps=4 / 255, space="pixel", target="clean", rounds=1)
#: The dose design's arms: PRSL at k=20 with these b (the dose), beside CE.
DOSE_K, DOSE_B = 20, (1.0, 4.0, 16.0, 64.0)
DESIGNS = ("default", "dose", "mechanism")
#: The authors' released loss and weight for ViT-GPT2 (docs/spec.md, "Note on the authors' released code").
RELEASED = dict(loss="prsl-released", k=20, window_start=0, b=1e-5)
#: CLIP's normalisation, which the released attack code un-normalises with before saving a JPEG.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
JPEG_QUALITY = 75  # PIL's default, what ``Image.save("x.jpg")`` writes

SIZES = {
    # The test suite's: every phase (gate failure and extension included) in well under a minute.
    "smoke": dict(
        bases=1, seeds=2, gate=1.01, max_extensions=1, gate_images=6,
        base=dict(train_images=48, eval_images=4, eval_samples=0, max_steps=3, hidden=32, layers=1, heads=2,
                  patch=16, batch_size=16, logging_steps=1, max_new_tokens=12),
        extend=dict(max_steps=2, lr=1e-3),
        finetune=dict(max_steps=2, lr=1e-3, logging_steps=1), calib_b=(0.5, 2.0), margin=0.05,
        attack=dict(num_samples=4, rounds=2, batch_size=4, max_new_tokens=12), endpoint_rounds=(1, 2),
        threshold_round=1, equivalence_margin=0.03, apgd_steps=2),
    # The smallest scale the study was specified at: 2 bases x 5 seeds = 10 pairs per arm, 200 images, 10 rounds.
    "default": dict(
        bases=2, seeds=5, gate=0.6, max_extensions=2, gate_images=200,
        base=dict(train_images=4000, eval_images=200, eval_samples=200, max_steps=4000, hidden=128, patch=8,
                  logging_steps=100),
        extend=dict(max_steps=1000, lr=1e-3),
        finetune=dict(max_steps=150, lr=5e-4, logging_steps=25), calib_b=(1.0, 4.0), margin=0.05,
        attack=dict(num_samples=200, rounds=10, batch_size=100, max_new_tokens=24), endpoint_rounds=(1, 2, 3, 4, 5),
        threshold_round=2, equivalence_margin=0.03, apgd_steps=10),
}
PRIMARY = ("prsl-k20", "ce")


# --------------------------------------------------------------------------- plan


def base_config(out, size, index, extension=0):
    """The FinetuneConfig of base ``index`` (extension 0: from scratch; j > 0: j-th longer run)."""
    from . import finetune

    spec = SIZES[size]
    path = Path(out) / "bases" / (f"base{index}" if extension == 0 else f"base{index}-x{extension}")
    if extension == 0:
        return finetune.demo_config(path, loss="ce", k=6, b=0.0, seed=10 + index, **spec["base"])
    parent = base_config(out, size, index, extension - 1)
    return dataclasses.replace(parent, output_dir=str(path), model=str(Path(parent.output_dir).resolve()),
                               **spec["extend"])


def arm_config(base_dir, out, size, arm, loss_kw, base_index, seed):
    """Fine-tune of ``base_dir`` with ``loss_kw``; the same seed for every arm of a pair."""
    from . import finetune

    spec = SIZES[size]
    keep = {k: v for k, v in spec["base"].items() if k not in finetune.PRESET_ONLY and k != "max_steps"}
    cfg = finetune.demo_config(Path(out) / "models" / arm / f"base{base_index}-s{seed}",
                               model=str(Path(base_dir).resolve()), seed=100 + seed,
                               **{**keep, "eval_samples": 0, **spec["finetune"]})
    return dataclasses.replace(cfg, **{"k": 6, "b": 0.0, "window_start": 0, **loss_kw})


def arm_name(loss_kw):
    if loss_kw["loss"] == "ce":
        return "ce"
    if loss_kw["loss"] == "prsl-released":
        return "prsl-released"
    return f"prsl-k{loss_kw['k']}-b{loss_kw['b']:g}"


def gate_samples(size, data_seed=0, image_size=64):
    from .data import synthetic_dataset

    return synthetic_dataset(SIZES[size]["gate_images"], data_seed, split="study-gate", image_size=image_size)


# --------------------------------------------------------------------------- worker side


def jpeg_round_trip(bundle, items, clean_outputs, scorer, *, max_new_tokens, batch_size=100):
    """The released attack's image round trip with no gradient step: un-normalise (with CLIP's
    statistics, and for contrast with the model's own), 8-bit, JPEG, reload, the model's processor.
    Returns per variant the pixel change and how far the outputs move from the clean ones."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    x0 = torch.cat([bundle.pixel_values([it.image for it in items[i:i + batch_size]])
                    for i in range(0, len(items), batch_size)])
    mean, std = bundle.image_mean, bundle.image_std
    pix0 = (x0 * std + mean).clamp(0, 1)
    out = {}
    for variant, (m, s) in {"clip_stats": (CLIP_MEAN, CLIP_STD), "model_stats": (None, None)}.items():
        m = mean if m is None else torch.tensor(m).view(3, 1, 1)
        s = std if s is None else torch.tensor(s).view(3, 1, 1)
        arrays = (x0 * s + m).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        images = []
        for a in arrays:
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="JPEG", quality=JPEG_QUALITY)
            images.append(np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
        x = torch.cat([bundle.pixel_values(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
        outputs = []
        for i in range(0, len(items), batch_size):
            outputs += bundle.generate(x[i:i + batch_size], None, max_new_tokens=max_new_tokens, num_beams=1)
        pix = (x * std + mean).clamp(0, 1)
        mse = float(((pix - pix0) ** 2).mean())
        _, per = scorer.score(outputs, [[c] for c in clean_outputs])
        out[variant] = {"linf_normalised": float((x - x0).abs().max()),
                        "mean_abs_normalised": float((x - x0).abs().mean()),
                        "psnr_db": float(10 * np.log10(1.0 / mse)) if mse > 0 else float("inf"),
                        "bertscore_f1_vs_clean": float(np.mean([p["bertscore_f1"] for p in per])),
                        "unchanged": float(np.mean([p["exact_match"] for p in per]))}
    return out


def model_job(job):
    """One unit of work in a worker: train (or reuse) a model, then optionally measure its
    clean quality on the gate split and attack it. Returns a small JSON-able dict."""
    worker_init()
    cfg = job["config"]
    info, reused = train_model(cfg)
    res = {"name": job["name"], "dir": cfg.output_dir, "reused": reused, "steps": info.get("steps"),
           "train_loss": info.get("train_loss"), "wall_s": info.get("wall_s"), "worked": not reused,
           "outside": not (Path(cfg.output_dir) / TRAINED_HERE).is_file()}
    if job.get("quality"):
        path = Path(cfg.output_dir) / "study_quality.json"
        if path.is_file() and reused:
            q = json.loads(path.read_text())
        else:
            q = clean_quality(cfg.output_dir, gate_samples(job["size"]))
            path.write_text(json.dumps(q, indent=1))
            res["worked"] = True
        res["quality"] = q
    if job.get("attack"):
        res["attack"], attacked = attack_model(job)
        res["worked"] |= attacked
    if job.get("apgd"):
        res["apgd"], attacked = attack_model(job, kind="apgd")
        res["worked"] |= attacked
    return res


def _attack_samples(size):
    from .data import synthetic_dataset

    return synthetic_dataset(SIZES[size]["attack"]["num_samples"], 0, split="eval", image_size=64)


def _attack_references(size):
    return [s.captions for s in _attack_samples(size)]


def attack_model(job, kind="bim"):
    """Attack a trained model: ``kind`` "bim" (the paper's rounds, into ``job["attack"]``, then
    the released code's JPEG round trip unless ``job["jpeg"]`` is false) or "apgd" (one round of
    ``apgd_steps`` APGD steps in pixel space, into ``job["apgd"]``, random starts from seed 0)."""
    from .attack import AttackConfig, ModelAttack, SettingsMismatch, attack_items
    from .checkpoints import load_bundle, read_run_info

    cfg, spec = job["config"], SIZES[job["size"]]
    items = attack_items(_attack_samples(job["size"]), "caption")
    common = dict(task="caption", max_new_tokens=spec["attack"]["max_new_tokens"],
                  batch_size=spec["attack"]["batch_size"], device="cpu", num_beams=1)
    if kind == "bim":
        out, jpeg = Path(job["attack"]), job.get("jpeg", True)
        acfg = AttackConfig(rounds=spec["attack"]["rounds"], **common, **ATTACK)
    else:
        out, jpeg = Path(job["apgd"]), False
        acfg = AttackConfig(steps_per_round=spec["apgd_steps"], seed=0, **common, **APGD)
    jpeg_path = out / "jpeg_round_trip.json"
    finished = (jpeg_path.is_file() or not jpeg) and all((out / "rounds" / f"round_{r:03d}.jsonl").is_file()
                                                         for r in range(acfg.rounds + 1))
    bundle = load_bundle(cfg.output_dir)

    def attack():
        return ModelAttack(bundle, items, out, acfg, scorer(), model_path=str(Path(cfg.output_dir).resolve()),
                           name=job["name"], run_info=read_run_info(cfg.output_dir), progress=False).run()
    try:
        attack()
    except SettingsMismatch:
        shutil.rmtree(out)
        attack()
    if jpeg and not jpeg_path.is_file():
        clean = [json.loads(line)["output"] for line in (out / "rounds" / "round_000.jsonl").open()]
        trip = jpeg_round_trip(bundle, items, clean, scorer(), max_new_tokens=spec["attack"]["max_new_tokens"])
        jpeg_path.write_text(json.dumps(trip, indent=1))
    return str(out), not finished


# --------------------------------------------------------------------------- driver side


class Runner:
    """Runs jobs inline (``workers == 1``) or in a pool of single-thread processes."""

    def __init__(self, workers, log, progress):
        self.workers, self.log, self.progress = workers, log, progress
        self.pool = None
        if workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))

    def map(self, jobs, desc):
        from tqdm.auto import tqdm

        results = {}
        bar = tqdm(total=len(jobs), desc=desc, unit="model", disable=not self.progress, file=sys.stderr, leave=False)
        if self.pool is None:
            for job in jobs:
                results[job["name"]] = model_job(job)
                self._done(results[job["name"]], bar)
        else:
            from concurrent.futures import as_completed

            futures = {self.pool.submit(model_job, job): job["name"] for job in jobs}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                self._done(results[futures[fut]], bar)
        bar.close()
        return [results[job["name"]] for job in jobs]

    def _done(self, res, bar):
        self.log(f"{res['name']}: {json.dumps({k: v for k, v in res.items() if k != 'name'})}")
        bar.update(1)

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


def _gate_ok(q, gate):
    return all(q[k] >= gate for k in ("exact_match", "shape", "colour", "size"))


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_preregistration(path, size, spec, design="default"):
    """The analysis plan, written once, before the first model of a study is trained."""
    if path.is_file():
        return
    rounds = spec["endpoint_rounds"]
    when = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    if design == "dose":
        path.write_text(_dose_preregistration(size, spec, when))
        return
    text = f"""# Pre-registered analysis (written {when}, commit {_git_commit()}, before any result)

- **Primary endpoint**: per model, the mean per-image BERTScore F1 (embedded MiniLM) of the attacked
  caption against the model's own clean caption, averaged over BIM rounds {rounds[0]}-{rounds[-1]}.
- **Primary comparison**: PRSL k=20 (calibrated b) minus CE, paired by (base, seed); {spec['bases']} bases x
  {spec['seeds']} seeds = {spec['bases'] * spec['seeds']} pairs. Reported: mean difference, 95% t confidence
  interval, two-sided paired t-test p, effect size d_z. Significance at 0.05.
- **Secondary comparisons**: PRSL k=6 (calibrated b) and the authors' released loss (b=1e-5, window 0_20),
  each minus CE on the same pairs, p-values Holm-corrected over the two.
- **Equivalence**: when the primary test is not significant, two one-sided tests with margin
  +/-{spec['equivalence_margin']} BERTScore F1 (the difference the issue asked to resolve); equivalence is claimed when
  the 90% CI lies inside the margin.
- **Clean quality**: clean exact match against the references on the attacked images, per arm; the primary
  difference is also reported adjusted for it (paired differences regressed on the clean exact-match
  difference, intercept = difference at equal clean quality).
- **Calibration of b** (per k, on base 0 / seed 0, on a separate held-out gate split): the largest b in
  {list(spec['calib_b'])} whose clean exact match is at least CE's minus {spec['margin']}; else the smallest.
- **Also reported, not tested**: the attack loss (teacher-forced CE of the clean caption) per round; the
  shares of images with BERTScore below the paper's thresholds 0.90/0.80/0.75/0.70 after round
  {spec['threshold_round']}, with the thresholds mapped onto the MiniLM scale; the JPEG round trip of the released code.
- **Study size** `{size}`; gate: exact match and shape, colour and size accuracies each >= {spec['gate']}
  on the gate split.
"""
    path.write_text(text)


def _dose_preregistration(size, spec, when):
    rounds = spec["endpoint_rounds"]
    doses = ", ".join(f"{b:g}" for b in DOSE_B)
    return f"""# Pre-registered analysis of the dose design (written {when}, commit {_git_commit()}, before any result)

- **Question**: is there any b at which PRSL (k={DOSE_K}) changes robustness, and what does it cost in clean quality?
- **Arms**: CE and PRSL k={DOSE_K} at b in {{{doses}}}; every arm fine-tunes the same {spec['bases']} gated bases with
  seeds 0-{spec['seeds'] - 1} ({spec['bases'] * spec['seeds']} pairs (base, seed) per arm); b is fixed by the design,
  not calibrated.
- **Primary endpoint**: per model, the mean per-image BERTScore F1 (embedded MiniLM) of the attacked caption
  against the model's own clean caption, averaged over BIM rounds {rounds[0]}-{rounds[-1]} (the paper's BIM: eps 0.5 /
  alpha 0.01 in normalised space, one signed step per round).
- **Primary analysis**: the dose-response slope. Per pair, the least-squares slope of the endpoint of the PRSL
  arms against log2 b; reported: the mean slope over pairs (BERTScore F1 per doubling of b), its 95% t
  confidence interval and the two-sided one-sample t-test p. Alongside, each b minus CE (paired t-test,
  95% CI), p-values Holm-corrected over the {len(DOSE_B)} doses. Significance at 0.05.
- **Secondary endpoint**: per model, the BERTScore F1 against the clean caption after {spec['apgd_steps']} APGD steps
  (AutoAttack's APGD-CE schedule, random start per image from seed 0) in [0, 1] pixel space at eps 4/255,
  ascending the teacher-forced CE of the clean caption; the same slope and per-b analysis, reported as
  secondary.
- **Clean quality**: clean exact match against the references on the attacked images, per b (each b minus CE,
  paired); the endpoint at matched clean exact match (per b: paired differences regressed on the clean
  exact-match difference, intercept = difference at equal clean quality); and the robustness-accuracy frontier
  (clean exact match against the endpoint, one point per model) as a figure.
- **Equivalence** (reported, as in the first study): per b, TOST with margin +/-{spec['equivalence_margin']} BERTScore F1.
- **Study size** `{size}`; gate: exact match and shape, colour and size accuracies each >= {spec['gate']}
  on the gate split.
"""


def _calibrate(runner, bases, out, size, spec, say):
    """The default design's b per k on base 0, seed 0 (these runs are the pair's arm models when chosen).
    Returns the arms, the chosen b, the calibration rows and whether anything was trained."""
    base0 = bases[0][1]
    calib_jobs = [dict(name="ce-calib", config=arm_config(base0, out, size, "ce", {"loss": "ce"}, 0, 0),
                       quality=True, size=size)]
    for k in (6, 20):
        for b in spec["calib_b"]:
            kw = {"loss": "prsl", "k": k, "b": b}
            calib_jobs.append(dict(name=f"{arm_name(kw)}-calib", config=arm_config(base0, out, size, arm_name(kw),
                                                                                 kw, 0, 0), quality=True, size=size))
    calib_results = runner.map(calib_jobs, "2/4 calibration of b")
    calib = {job["name"]: r["quality"]["exact_match"] for job, r in zip(calib_jobs, calib_results)}
    ce_em = calib["ce-calib"]
    chosen, calib_rows = {}, []
    for k in (6, 20):
        rows = [(b, calib[f"{arm_name({'loss': 'prsl', 'k': k, 'b': b})}-calib"]) for b in spec["calib_b"]]
        ok = [b for b, em in rows if em >= ce_em - spec["margin"]]
        chosen[k] = max(ok) if ok else min(spec["calib_b"])
        calib_rows += [{"k": k, "b": b, "exact_match": em, "ce_exact_match": ce_em, "chosen": b == chosen[k]}
                       for b, em in rows]
        say(f"  PRSL k={k}: b={chosen[k]:g} (clean exact match {dict(rows)} vs CE {ce_em:.2f})")
    arms = {"ce": {"loss": "ce"}, "prsl-k6": {"loss": "prsl", "k": 6, "b": chosen[6]},
            "prsl-k20": {"loss": "prsl", "k": 20, "b": chosen[20]}, "prsl-released": dict(RELEASED)}
    return arms, chosen, calib_rows, any(r["worked"] for r in calib_results)


def run(args):
    import torch

    from .study_report import write_study_report

    design = getattr(args, "design", "default")
    if design == "mechanism":  # its own phases and sizes: study_mechanism.py
        from .study_mechanism import run_mechanism

        return run_mechanism(args)
    spec = SIZES[args.size]
    args.design = design
    out = Path(args.output_dir or ("outputs/study" if design == "default" else f"outputs/study-{design}"))
    report_dir = Path(args.report_dir or ("docs/study-run" if design == "default" else f"docs/study-{design}"))
    if args.overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    report_dir.mkdir(parents=True, exist_ok=True)
    write_preregistration(out / "preregistration.md", args.size, spec, args.design)
    log_file = open(out / "study.log", "a", encoding="utf-8")
    t0 = time.time()

    def log(msg):
        log_file.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
        log_file.flush()

    def say(msg):
        from tqdm.auto import tqdm

        log(msg)
        tqdm.write(msg, file=sys.stdout)

    workers = args.workers or min(2, os.cpu_count() or 1)
    old_threads = torch.get_num_threads()
    runner = Runner(workers, log, not args.no_progress)
    n_arms = 1 + len(DOSE_B) if args.design == "dose" else 4
    say(f"prsl-study ({args.design}, {args.size}): {spec['bases']} bases x {spec['seeds']} seeds x {n_arms} arms, "
        f"{workers} worker(s) "
        f"-> {out} (log: {out / 'study.log'})")
    try:
        # 1. bases, trained longer until the gate holds
        gate_log, bases, worked = [], [], False
        stage = {i: 0 for i in range(spec["bases"])}
        pending = list(range(spec["bases"]))
        while pending:
            jobs = [dict(name=f"base{i}-x{stage[i]}", config=base_config(out, args.size, i, stage[i]), quality=True,
                         size=args.size) for i in pending]
            results = runner.map(jobs, f"1/4 bases (stage {min(stage[i] for i in pending)})")
            worked |= any(r["worked"] for r in results)
            nxt = []
            for i, res in zip(pending, results):
                ok = _gate_ok(res["quality"], spec["gate"])
                gate_log.append({"base": i, "stage": stage[i], "steps": res["steps"], "train_s": res["wall_s"],
                                 "outside": res["outside"], "passed": ok, **res["quality"]})
                say(f"  base{i} stage {stage[i]}: exact match {res['quality']['exact_match']:.2f} (shape "
                    f"{res['quality']['shape']:.2f}, colour {res['quality']['colour']:.2f}, size "
                    f"{res['quality']['size']:.2f}) -> {'gate passed' if ok else 'below the gate'}")
                if ok or stage[i] >= spec["max_extensions"]:
                    bases.append((i, res["dir"]))
                else:
                    stage[i] += 1
                    nxt.append(i)
            pending = nxt
        bases.sort()

        if args.design == "dose":
            arms = {"ce": {"loss": "ce"}}
            arms.update({arm_name(kw): kw for kw in ({"loss": "prsl", "k": DOSE_K, "b": b} for b in DOSE_B)})
            chosen, calib_rows = {}, []
        else:
            arms, chosen, calib_rows, did = _calibrate(runner, bases, out, args.size, spec, say)
            worked |= did

        # 3. arms: fine-tune every (base, seed) with each loss, and attack
        dose = args.design == "dose"
        jobs = []  # pair by pair: a study stopped half-way has whole pairs
        for i, bdir in bases:
            for s in range(spec["seeds"]):
                for arm, kw in arms.items():
                    cfg = arm_config(bdir, out, args.size, arm_name(kw), kw, i, s)
                    pair = f"base{i}-s{s}"
                    jobs.append(dict(name=f"{arm}-{pair}", config=cfg, size=args.size, arm=arm, pair=pair,
                                     attack=str(out / "attack" / arm / pair), jpeg=not dose,
                                     apgd=str(out / "attack-apgd" / arm / pair) if dose else None))
        results = runner.map(jobs, "3/4 fine-tune, BIM, APGD" if dose else "3/4 fine-tune, BIM, JPEG round trip")
        worked |= any(r["worked"] for r in results)
    finally:
        runner.close()
        torch.set_num_threads(old_threads)
    say("4/4 report")
    wall = add_wall_time(out, time.time() - t0, worked)
    models = [dict(arm=j["arm"], pair=j["pair"], attack_dir=r["attack"], apgd_dir=r.get("apgd"), model_dir=r["dir"],
                   steps=r["steps"], train_loss=r["train_loss"]) for j, r in zip(jobs, results)]
    plan = dict(size=args.size, spec=spec, gate=gate_log, calibration=calib_rows, chosen_b=chosen, arms=arms,
                workers=workers, wall_s=wall, cpus=os.cpu_count(), models=models,
                preregistration=(out / "preregistration.md").read_text(), primary=PRIMARY, attack=ATTACK,
                jpeg_quality=JPEG_QUALITY, references=_attack_references(args.size), design=args.design,
                apgd=dict(APGD, steps_per_round=spec["apgd_steps"]), dose_k=DOSE_K)
    from .models import quiet_transformers

    with quiet_transformers():
        if dose:
            from .study_dose import write_dose_report

            summary = write_dose_report(plan, report_dir)
            sl = summary["slope"]
            say(f"dose-response slope: {sl['estimate']:+.4f} BERTScore F1 per doubling of b (95% CI "
                f"{sl['ci95'][0]:+.4f} to {sl['ci95'][1]:+.4f}, p = {sl['p']:.3g}, n = {sl['n']} pairs); report: "
                f"{report_dir / 'report.md'} ({time.time() - t0:.0f} s)")
        else:
            summary = write_study_report(plan, report_dir)
            p = summary["primary"]
            say(f"primary: {p['arm']} - {p['vs']} = {p['diff']:+.4f} BERTScore F1 (95% CI {p['ci95'][0]:+.4f} to "
                f"{p['ci95'][1]:+.4f}, p = {p['p']:.3g}, n = {p['n']} pairs); report: {report_dir / 'report.md'} "
                f"({time.time() - t0:.0f} s)")
    log_file.close()
    return summary


def build_parser():
    p = argparse.ArgumentParser(prog="prsl-study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default="default")
    p.add_argument("--design", choices=DESIGNS, default="default",
                   help="default: the first study (CE, PRSL k=6 / k=20 at the calibrated b, the released loss); "
                        "dose: CE and PRSL k=20 at b = 1, 4, 16, 64, attacked by BIM and by APGD at 4/255; "
                        "mechanism: a treatment check (held-out D, margin, gradient norm over fine-tuning length), "
                        "then CE vs PRSL k=20 b=64 on 8 bases x 2 seeds, attacked by BIM, APGD-CE, an adaptive "
                        "margin APGD and a bisection of the smallest eps that changes a caption")
    p.add_argument("--output-dir", default=None,
                   help="models and attack rounds (large; resumable); default outputs/study[-dose]")
    p.add_argument("--report-dir", default=None,
                   help="report.md, figures, models.csv, summary.json; default docs/study-run or docs/study-dose")
    p.add_argument("--workers", type=int, default=0, help="processes of one thread each (0: min(2, CPUs))")
    p.add_argument("--overwrite", action="store_true", help="start afresh instead of continuing")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None):
    cpu_accelerator_without_gpu()
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        raise SystemExit(f"prsl-study: {err}") from err
    return 0


if __name__ == "__main__":
    sys.exit(main())
