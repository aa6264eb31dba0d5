"""Cross-model report of ``prsl-attack`` results: summary CSV, ``report.md`` and PNG figures.

Models are compared side by side; models sharing a *group* (e.g. the same loss over
several seeds) are aggregated: the mean over seeds of the per-model scores with a
95% Student-t confidence interval, and each group is compared to the baseline group
(CE) by Welch's t-test on the per-seed values. Only numpy is needed for the
statistics (``stats.py``: the t distribution through the regularised incomplete beta).

``python3 -m prsl_kernels.drivers.report DIR [DIR ...] --output-dir OUT`` rebuilds a
report from finished attack folders.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from .metrics import METRICS, UNIT_METRICS
from .stats import mean_ci, welch_test
from .tables import fmt_mean_ci, group_curve, pyplot, save_figure, table

THRESHOLDS = (0.90, 0.80, 0.75, 0.70)
AGAINST = ("clean", "reference")
METRIC_LABELS = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4", "meteor": "METEOR",
                 "rouge_l": "ROUGE-L", "cider": "CIDEr-D", "bertscore_f1": "BERTScore F1",
                 "exact_match": "Exact match", "vqa_accuracy": "VQA accuracy"}
#: Metrics in the threshold table / figure (the paper's Figs. 2 and 5 use BERTScore).
THRESHOLD_METRICS = ("bertscore_f1", "meteor", "rouge_l", "bleu4")
ALPHA = 0.05


# --------------------------------------------------------------------------- loading


def load_run(model_dir, group=None):
    """One attacked model: its config, per-round records and corpus scores, and image grid."""
    d = Path(model_dir)
    cfg_path = d / "attack_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{d} is not a prsl-attack model folder (no attack_config.json)")
    config = json.loads(cfg_path.read_text())
    rounds = {}
    for path in sorted((d / "rounds").glob("round_*.json")):
        r = int(path.stem.split("_")[1])
        records_path = path.with_suffix(".jsonl")
        if not records_path.is_file():
            continue
        rounds[r] = {"summary": json.loads(path.read_text()),
                     "records": [json.loads(line) for line in records_path.read_text().splitlines() if line]}
    if not rounds:
        raise FileNotFoundError(f"{d} has no finished rounds")
    grid = None
    if (d / "grid.npz").is_file():
        with np.load(d / "grid.npz") as z:
            grid = {k: z[k] for k in z.files}
    name = config.get("name", d.name)
    return {"name": name, "group": group or name, "dir": d, "config": config, "rounds": rounds, "grid": grid}


def _per_sample(run, rnd, against, metric):
    return [r["scores"][against][metric] for r in run["rounds"][rnd]["records"] if metric in r["scores"][against]]


def run_value(run, rnd, against, metric, kind="mean"):
    """A model's score at a round: ``kind`` = "mean" (of per-sample scores), "corpus", or "below@T"."""
    if rnd not in run["rounds"]:
        return float("nan")
    if kind == "corpus":
        return float(run["rounds"][rnd]["summary"]["corpus"][against].get(metric, float("nan")))
    vals = _per_sample(run, rnd, against, metric)
    if not vals:
        return float("nan")
    if kind == "mean":
        return float(np.mean(vals))
    threshold = float(kind.split("@")[1])
    return float(np.mean([v < threshold for v in vals]))


def attack_loss(run, rnd):
    return float(run["rounds"][rnd]["summary"]["attack_loss"]) if rnd in run["rounds"] else float("nan")


def _attack_words(cfg):
    name = {"bim": "BIM", "pgd": "PGD", "apgd": "APGD"}[cfg.get("attack", "bim")]
    return f"{'targeted' if cfg.get('target_text') is not None else 'untargeted'} {name}"


def _objective_words(cfg):
    if cfg.get("target_text") is not None:
        return f"descending the teacher-forced CE of the target text {cfg['target_text']!r}"
    if cfg.get("worst_case"):
        return "ascending the teacher-forced CE of each reference in turn, the worst-scoring result kept per input"
    return (f"ascending the teacher-forced CE of the "
            f"{'clean output' if cfg['target'] == 'clean' else 'first reference'}")


def target_success(run, rnd):
    """A targeted attack's success rate at a round (NaN for an untargeted one)."""
    summary = run["rounds"].get(rnd, {}).get("summary", {})
    return float(summary.get("target_success_rate", float("nan")))


def _groups(runs):
    out = {}
    for run in runs:
        out.setdefault(run["group"], []).append(run)
    return out


def _metrics_present(runs):
    rec = runs[0]["rounds"][0]["records"][0]["scores"]["reference"]
    return [m for m in METRICS if m in rec]


# --------------------------------------------------------------------------- CSV


def write_summary_csv(runs, path):
    """One row per (model, round, against, metric): corpus score, mean of per-sample, proportions below."""
    cols = ["model", "group", "round", "against", "metric", "n", "corpus", "mean"] + \
           [f"below_{t:.2f}" for t in THRESHOLDS]
    metrics = _metrics_present(runs)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for run in runs:
            for rnd in sorted(run["rounds"]):
                n = run["rounds"][rnd]["summary"]["n"]
                w.writerow([run["name"], run["group"], rnd, "target", "attack_ce", n, "",
                            f"{attack_loss(run, rnd):.6g}"] + [""] * len(THRESHOLDS))
                for against in AGAINST:
                    for m in metrics:
                        below = [f"{run_value(run, rnd, against, m, f'below@{t}'):.4f}" if m in UNIT_METRICS else ""
                                 for t in THRESHOLDS]
                        w.writerow([run["name"], run["group"], rnd, against, m, n,
                                    f"{run_value(run, rnd, against, m, 'corpus'):.6g}",
                                    f"{run_value(run, rnd, against, m):.6g}"] + below)


# --------------------------------------------------------------------------- figures


def plot_score_vs_round(runs, against, path):
    plt = pyplot()
    metrics = _metrics_present(runs)
    rounds = sorted(set().union(*(r["rounds"] for r in runs)))
    cols = 4
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        for group, gr in _groups(runs).items():
            mean, half = group_curve(gr, rounds, lambda run, r: run_value(run, r, against, m))
            line, = ax.plot(rounds, mean, marker="o", label=f"{group} (n={len(gr)})" if len(gr) > 1 else group)
            if len(gr) > 1:
                ax.fill_between(rounds, mean - half, mean + half, color=line.get_color(), alpha=0.2)
        ax.set_title(METRIC_LABELS[m])
        ax.set_xlabel("BIM round")
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    what = "the clean output" if against == "clean" else "the references"
    fig.suptitle(f"Mean per-sample score against {what} vs attack round (bands: 95% CI over seeds)")
    save_figure(fig, path)


def plot_below_thresholds(runs, rnd, path, against="clean"):
    """The threshold figure; False (nothing drawn) when no threshold metric was scored
    (e.g. ``--metrics exact_match vqa_accuracy``)."""
    metrics = [m for m in THRESHOLD_METRICS if m in _metrics_present(runs)]
    if not metrics:
        return False
    plt = pyplot()
    groups = _groups(runs)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    width = 0.8 / max(len(groups), 1)
    x = np.arange(len(THRESHOLDS))
    for ax, m in zip(axes.flat, metrics):
        for gi, (group, gr) in enumerate(groups.items()):
            stats = [mean_ci([run_value(run, rnd, against, m, f"below@{t}") for run in gr]) for t in THRESHOLDS]
            mean = np.array([s[0] for s in stats])
            err = np.array([s[1] if math.isfinite(s[1]) else 0.0 for s in stats])
            ax.bar(x + gi * width - 0.4 + width / 2, mean, width, yerr=err if len(gr) > 1 else None,
                   capsize=2, label=group)
        ax.set_xticks(x, [f"< {t:.2f}" for t in THRESHOLDS])
        ax.set_ylim(0, 1)
        ax.set_title(METRIC_LABELS[m])
        ax.grid(axis="y", alpha=0.3)
    axes.flat[0].set_ylabel("proportion of outputs")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Outputs scoring below each threshold against the clean output after round {rnd}")
    save_figure(fig, path)
    return True


def plot_attack_loss(runs, path):
    plt = pyplot()
    rounds = sorted(set().union(*(r["rounds"] for r in runs)))
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for group, gr in _groups(runs).items():
        mean, half = group_curve(gr, rounds, attack_loss)
        line, = ax.plot(rounds, mean, marker="o", label=group)
        if len(gr) > 1:
            ax.fill_between(rounds, mean - half, mean + half, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("BIM round")
    ax.set_ylabel("attacked CE (per token)")
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _wrap(text, width=28, lines=3):
    import textwrap

    text = "".join(ch if ch.isprintable() else "?" for ch in str(text))
    out = textwrap.wrap(text, width) or [""]
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1][: width - 3] + "..."
    return "\n".join(out)


def plot_image_grid(runs, path, n_rows=4):
    """Rows: samples; columns: the clean image, then one adversarial image per group (its first run)."""
    plt = pyplot()
    shown = [gr[0] for gr in _groups(runs).values() if gr[0]["grid"] is not None]
    if not shown:
        return False
    base = shown[0]["grid"]
    n = min(n_rows, len(base["ids"]))
    cols = 1 + len(shown)
    fig, axes = plt.subplots(n, cols, figsize=(2.6 * cols, 3.1 * n), squeeze=False)
    for i in range(n):
        ax = axes[i, 0]
        ax.imshow(base["clean_images"][i], interpolation="nearest")
        prompt = str(base["prompts"][i])
        ax.set_title(_wrap((prompt + " " if prompt else "") + "ref: " + str(base["references"][i])), fontsize=7)
        if i == 0:
            ax.set_ylabel("clean")
        for j, run in enumerate(shown, start=1):
            g = run["grid"]
            ax = axes[i, j]
            ax.imshow(g["adv_images"][i], interpolation="nearest")
            ax.set_title(_wrap(f"clean: {g['clean_outputs'][i]}", lines=2) + "\n" +
                         _wrap(f"round {int(g['round'])}: {g['adv_outputs'][i]}", lines=2), fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for j, run in enumerate(shown, start=1):
        axes[-1, j].set_xlabel(run["group"], fontsize=9)
    axes[-1, 0].set_xlabel("clean image", fontsize=9)
    save_figure(fig, path)
    return True


# --------------------------------------------------------------------------- markdown


def _group_cell(gr, fn, digits=3):
    """A group's mean with its 95% interval of ``fn(run)`` over its runs, as a table cell."""
    return fmt_mean_ci([fn(run) for run in gr], digits)


def significance(runs, baseline, rnd, against, metrics):
    """Rows (group, metric, diff, t, df, p) comparing each group with ``baseline`` at round ``rnd``."""
    groups = _groups(runs)
    rows = []
    if baseline not in groups:
        return rows
    for group, gr in groups.items():
        if group == baseline:
            continue
        for m in metrics:
            a = [run_value(run, rnd, against, m) for run in gr]
            b = [run_value(run, rnd, against, m) for run in groups[baseline]]
            t, df, p = welch_test(a, b)
            rows.append((group, m, float(np.mean(a) - np.mean(b)), t, df, p))
    return rows


def _score_table(runs, rounds, against, metrics, kind="mean"):
    rows = []
    for group, gr in _groups(runs).items():
        for rnd in rounds:
            cells = [_group_cell(gr, lambda run, m=m: run_value(run, rnd, against, m, kind)) for m in metrics]
            rows.append([group, len(gr), rnd] + cells)
    return table(["model", "runs", "round"] + [METRIC_LABELS[m] for m in metrics], rows)


def relative_path(path, start):
    """``path`` relative to ``start`` (the report's folder), so a committed report names no machine's
    directories; paths on another drive (Windows) stay as they are."""
    if not path:
        return ""
    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()
    except ValueError:
        return str(path)


def write_markdown(runs, path, figures, *, title="BIM robustness report", baseline=None, notes=""):
    metrics = _metrics_present(runs)
    rounds = sorted(set().union(*(r["rounds"] for r in runs)))
    last = rounds[-1]
    thr_round = min(2, last)
    groups = _groups(runs)
    cfg = runs[0]["config"]["attack"]
    lines = [f"# {title}", ""]
    if notes:
        lines += [notes, ""]
    lines += [f"Attack: {_attack_words(cfg)}, task `{cfg['task']}`, {'[0, 1]' if cfg['space'] == 'pixel' else 'normalised'} pixel space (adversarial images "
              f"clamped to the valid pixel range), eps={cfg['eps']:g}, "
              + (f"alpha={cfg['alpha']:g}, " if cfg.get("alpha") is not None else "step size by APGD's schedule, ")
              + f"{cfg['steps_per_round']} step(s) per round, {last} round(s), {_objective_words(cfg)}; "
              f"{'greedy decoding' if cfg['num_beams'] == 1 else str(cfg['num_beams']) + '-beam search'}"
              + (f", at most {cfg['max_new_tokens']} new tokens" if cfg.get("max_new_tokens") else "")
              + f"; {runs[0]['rounds'][0]['summary']['n']} inputs per model.",
              "",
              "Scores are the mean of per-sample scores unless marked *corpus*. Models sharing a name are the "
              "same configuration over several seeds: the cell is the mean over seeds ± the half width of a "
              "95% Student-t confidence interval. CIDEr-D is on its 0-10 scale; all other metrics on 0-1. An output "
              "identical to its reference (after lower-casing and trimming) scores the maximum on every metric, so "
              "an output the attack left unchanged is never counted below a threshold.",
              ""]
    lines += ["## Models", "", table(["model", "group", "training loss", "checkpoint"],
                                      [[r["name"], r["group"], _loss_label(r["config"].get("run_info", {})),
                                        f"`{relative_path(r['config'].get('model_path', ''), Path(path).parent)}`"]
                                       for r in runs]), ""]

    lines += ["## Clean quality (round 0) against the references", "",
              _score_table(runs, [0], "reference", metrics), "",
              "*Corpus* scores (pooled n-gram / alignment statistics; identical to the mean for ROUGE-L, CIDEr-D "
              "and BERTScore):", "", _score_table(runs, [0], "reference", metrics, "corpus"), ""]
    lines += ["## Robustness: scores against each model's clean output, per round", "",
              _score_table(runs, rounds, "clean", metrics), "",
              "## Scores against the references, per round", "", _score_table(runs, rounds, "reference", metrics), "",
              f"*Corpus* scores against the clean output after the last round ({last}):", "",
              _score_table(runs, [last], "clean", metrics, "corpus"), ""]

    thr_metrics = [m for m in THRESHOLD_METRICS if m in metrics]
    rows = []
    for group, gr in groups.items():
        for m in thr_metrics:
            rows.append([group, METRIC_LABELS[m]] +
                        [_group_cell(gr, lambda run, t=t, m=m: run_value(run, thr_round, "clean", m, f"below@{t}"),
                                     digits=2)
                         for t in THRESHOLDS])
    if thr_metrics:
        lines += [f"## Proportion of outputs below each threshold after round {thr_round} (against the clean "
                  f"output)", "", table(["model", "metric"] + [f"< {t:.2f}" for t in THRESHOLDS], rows), ""]

    rows = [[group] + [_group_cell(gr, lambda run, r=r: attack_loss(run, r)) for r in rounds]
            for group, gr in groups.items()]
    lines += ["## Attacked cross-entropy per token (what the attack ascends; descends for a targeted one)", "",
              table(["model"] + [f"round {r}" for r in rounds], rows), ""]
    if any("target_success_rate" in rd["summary"] for run in runs for rd in run["rounds"].values()):
        rows = [[group] + [_group_cell(gr, lambda run, r=r: target_success(run, r), digits=2)
                           for r in rounds] for group, gr in groups.items()]
        lines += ["## Targeted attack: share of outputs equal to the target text (after normalisation)", "",
                  table(["model"] + [f"round {r}" for r in rounds], rows), ""]

    lines += _significance_section(runs, baseline, last, metrics)
    lines += ["## Figures", ""] + [f"- {desc}: `{p}`" for desc, p in figures] + [""]
    lines += ["Per-sample outputs and scores: `<model>/samples.jsonl`; all numbers: `summary.csv`.", ""]
    Path(path).write_text("\n".join(lines), encoding="utf-8")


def _loss_label(info):
    loss = info.get("loss") if isinstance(info, dict) else None
    if not isinstance(loss, dict):
        return "n/a"
    name = loss.get("name", "?")
    if name == "ce":
        return "CE"
    if name == "prsl-released":
        return f"PRSL released (window {loss.get('window_start', 0)}_{loss.get('k')}, b={loss.get('b')})"
    return f"PRSL k={loss.get('k')}, b={loss.get('b')}"


def _significance_section(runs, baseline, rnd, metrics):
    groups = _groups(runs)
    out = [f"## CE vs PRSL: is the difference significant? (round {rnd})", ""]
    if baseline is None or baseline not in groups:
        return out + ["No baseline group was named, so no test was run.", ""]
    if len(groups[baseline]) < 2 or all(len(gr) < 2 for g, gr in groups.items() if g != baseline):
        return out + ["Each configuration has a single run: no between-seed variance, so no significance test is "
                      "possible. Treat differences between single runs as anecdotal.", ""]
    out += [f"Welch's t-test on the per-seed mean scores of each group against `{baseline}` "
            f"(two-sided, alpha = {ALPHA}). Positive differences mean the group scores higher (is more robust, "
            "against the clean output) than the baseline.", ""]
    verdicts = []
    for against in AGAINST:
        rows = significance(runs, baseline, rnd, against, metrics)
        cells = [[g, METRIC_LABELS[m], f"{d:+.4f}", f"{t:.2f}" if math.isfinite(t) else "n/a",
                  f"{df:.1f}" if math.isfinite(df) else "n/a", f"{p:.3f}" if math.isfinite(p) else "n/a",
                  "yes" if math.isfinite(p) and p < ALPHA else "no"] for g, m, d, t, df, p in rows]
        out += [f"Against the {'clean output' if against == 'clean' else 'references'}:", "",
                table(["group", "metric", "difference", "t", "df", "p", "significant"], cells), ""]
        for g in groups:
            if g == baseline:
                continue
            sig = [METRIC_LABELS[m] for gg, m, d, t, df, p in rows if gg == g and math.isfinite(p) and p < ALPHA]
            verdicts.append((g, against, sig))
    out += ["**Verdict.**", ""]
    for g, against, sig in verdicts:
        what = "the clean output" if against == "clean" else "the references"
        if sig:
            out.append(f"- `{g}` vs `{baseline}` against {what}: significant at {ALPHA} for {', '.join(sig)} "
                       f"(uncorrected for the {len(metrics)} metrics tested); not significant for the others.")
        else:
            out.append(f"- `{g}` vs `{baseline}` against {what}: **no significant difference** on any metric "
                       f"(p >= {ALPHA}).")
    out.append("")
    return out


# --------------------------------------------------------------------------- entry points


def write_report(model_dirs, out_dir, *, groups=None, baseline=None, title="BIM robustness report", notes=""):
    """Summary CSV, ``report.md`` and figures under ``out_dir`` for the attacked ``model_dirs``.

    ``groups``: optional ``{model name: group}`` (seeds of one configuration share a group);
    ``baseline``: the group the others are tested against. Returns the report path.
    """
    runs = [load_run(d) for d in model_dirs]
    groups = groups or {}
    for run in runs:
        run["group"] = groups.get(run["name"], run["name"])
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    write_summary_csv(runs, out / "summary.csv")
    last = max(max(r["rounds"]) for r in runs)
    figures = []
    for against in AGAINST:
        p = fig_dir / f"score_vs_round_{against}.png"
        plot_score_vs_round(runs, against, p)
        figures.append((f"score vs round against the {'clean output' if against == 'clean' else 'references'}",
                        p.relative_to(out)))
    p = fig_dir / "below_thresholds.png"
    if plot_below_thresholds(runs, min(2, last), p):
        figures.append((f"proportion below 0.90/0.80/0.75/0.70 after round {min(2, last)}", p.relative_to(out)))
    p = fig_dir / "attack_loss.png"
    plot_attack_loss(runs, p)
    figures.append(("attacked CE vs round", p.relative_to(out)))
    p = fig_dir / "image_grid.png"
    if plot_image_grid(runs, p):
        figures.append(("clean / adversarial images with outputs", p.relative_to(out)))
    report = out / "report.md"
    write_markdown(runs, report, figures, title=title, baseline=baseline, notes=notes)
    return report


def main(argv=None):
    p = argparse.ArgumentParser(prog="python3 -m prsl_kernels.drivers.report", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dirs", nargs="+", help="prsl-attack model folders (<output-dir>/<name>)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--group", nargs="*", default=None, metavar="NAME=GROUP", help="aggregate models into groups")
    p.add_argument("--baseline", default=None, help="group the others are tested against (e.g. the CE models)")
    args = p.parse_args(argv)
    groups = dict(g.split("=", 1) for g in args.group or [])
    try:
        report = write_report(args.model_dirs, args.output_dir, groups=groups, baseline=args.baseline)
    except FileNotFoundError as err:
        raise SystemExit(f"report: {err}") from err
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
