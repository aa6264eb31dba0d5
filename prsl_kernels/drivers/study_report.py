"""The report of ``prsl-study``: per-model CSV, statistics, figures, ``report.md`` and ``summary.json``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from . import stats as st
from .report import THRESHOLDS, attack_loss, load_run, relative_path, run_value
from .stats import mean_ci
from .tables import fmt, fmt_interval, fmt_mean_ci, fmt_p, group_curve, pyplot, save_figure, table

ARM_LABELS = {"ce": "CE", "prsl-k6": "PRSL k=6", "prsl-k20": "PRSL k=20", "prsl-released": "PRSL released"}
SECONDARY = ("prsl-k6", "prsl-released")
ARM_COLOURS = {"ce": "C0", "prsl-k6": "C1", "prsl-k20": "C2", "prsl-released": "C3"}


def paper_bertscore_baseline():
    """bert_score's published baseline F1 of roberta-large (its default layer 17) for English: the
    score of unrelated sentence pairs on the paper's BERTScore scale."""
    import bert_score

    path = Path(bert_score.__file__).parent / "rescale_baseline" / "en" / "roberta-large.tsv"
    for line in path.read_text().splitlines()[1:]:
        layer, _p, _r, f = line.split(",")
        if int(layer) == 17:
            return float(f)
    raise ValueError(f"no layer 17 in {path}")


def here_bertscore_baseline(references):
    """The embedded MiniLM's F1 between captions of different images (each first reference against
    the next image's): the score of unrelated captions on this run's scale."""
    from .metrics import CaptionScorer

    firsts = [r[0] for r in references]
    shifted = firsts[1:] + firsts[:1]
    with CaptionScorer(metrics=("bertscore_f1",)) as scorer:
        _, per = scorer.score(firsts, [[s] for s in shifted])
    return float(np.mean([p["bertscore_f1"] for p in per]))


def model_rows(plan):
    spec = plan["spec"]
    rows = []
    for m in plan["models"]:
        run = load_run(m["attack_dir"])
        rounds = sorted(run["rounds"])
        jpeg_path = Path(m["attack_dir"]) / "jpeg_round_trip.json"
        jpeg = json.loads(jpeg_path.read_text()) if jpeg_path.is_file() else {}
        row = dict(arm=m["arm"], pair=m["pair"], steps=m["steps"], train_loss=m["train_loss"],
                   clean_exact_match=run_value(run, 0, "reference", "exact_match"),
                   clean_bertscore_ref=run_value(run, 0, "reference", "bertscore_f1"),
                   endpoint=float(np.mean([run_value(run, r, "clean", "bertscore_f1")
                                           for r in spec["endpoint_rounds"]])))
        for r in rounds:
            row[f"bertscore_clean_r{r}"] = run_value(run, r, "clean", "bertscore_f1")
            row[f"attack_loss_r{r}"] = attack_loss(run, r)
        for r in rounds[1:]:
            row[f"cider_clean_r{r}"] = run_value(run, r, "clean", "cider")
        for variant, vals in jpeg.items():
            for key in ("bertscore_f1_vs_clean", "unchanged", "psnr_db", "linf_normalised"):
                row[f"jpeg_{variant}_{key}"] = vals[key]
        row["_run"] = run
        rows.append(row)
    return rows


def write_models_csv(rows, path):
    """One row per model, floats to 6 significant digits (the loaded runs left out)."""
    cols = [c for c in rows[0] if c != "_run"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items() if k != "_run"})


def by_arm(rows, key):
    out = {}
    for r in rows:
        if isinstance(r.get(key), float) and math.isfinite(r[key]):
            out.setdefault(r["arm"], {})[r["pair"]] = r[key]
    return out


def write_study_report(plan, report_dir):
    report_dir = Path(report_dir)
    fig_dir = report_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    spec = plan["spec"]
    rows = model_rows(plan)
    arms = [a for a in ARM_LABELS if any(r["arm"] == a for r in rows)]
    rounds = sorted(rows[0]["_run"]["rounds"])

    write_models_csv(rows, report_dir / "models.csv")

    endpoint, clean_em = by_arm(rows, "endpoint"), by_arm(rows, "clean_exact_match")
    arm, vs = plan["primary"]
    primary = st.paired(endpoint.get(arm, {}), endpoint.get(vs, {}))
    secondary = {a: st.paired(endpoint.get(a, {}), endpoint.get(vs, {})) for a in SECONDARY if a in endpoint}
    holm = st.holm({a: r["p"] for a, r in secondary.items()})
    equiv = st.tost(endpoint.get(arm, {}), endpoint.get(vs, {}), spec["equivalence_margin"])
    adjusted = st.adjusted_difference(endpoint.get(arm, {}), endpoint.get(vs, {}), clean_em.get(arm, {}),
                                      clean_em.get(vs, {}))
    clean_diff = st.paired(clean_em.get(arm, {}), clean_em.get(vs, {}))
    detectable = st.detectable_difference(primary["sd"], primary["n"])

    # thresholds of the paper, mapped onto the MiniLM scale
    first_run = rows[0]["_run"]
    b_paper, b_here = paper_bertscore_baseline(), here_bertscore_baseline(plan["references"])
    mapped = {t: st.recalibrated_threshold(t, b_paper, b_here) for t in THRESHOLDS}
    tr = spec["threshold_round"]
    below = {}
    for a in arms:
        for t in THRESHOLDS:
            vals = [run_value(r["_run"], tr, "clean", "bertscore_f1", f"below@{mapped[t]}")
                    for r in rows if r["arm"] == a]
            raw = [run_value(r["_run"], tr, "clean", "bertscore_f1", f"below@{t}") for r in rows if r["arm"] == a]
            below[(a, t)] = tuple(fmt(m, 2, half=h) for m, h in (mean_ci(vals), mean_ci(raw)))

    figures = _figures(rows, arms, rounds, endpoint, vs, fig_dir, spec)

    # summary.json
    arm_summary = {}
    for a in arms:
        ms = [r for r in rows if r["arm"] == a]
        arm_summary[a] = {"n_models": len(ms),
                          "clean_exact_match_mean": float(np.mean([r["clean_exact_match"] for r in ms])),
                          "endpoint_mean": float(np.mean([r["endpoint"] for r in ms])), "loss": plan["arms"][a]}
    summary = {
        "size": plan["size"], "arms": arm_summary, "n_images": len(first_run["rounds"][0]["records"]),
        "rounds": max(rounds), "steps_per_round": plan["attack"]["steps_per_round"],
        "endpoint": "BERTScore F1 vs clean output, mean over rounds "
                    f"{spec['endpoint_rounds'][0]}-{spec['endpoint_rounds'][-1]}",
        "primary": {"arm": arm, "vs": vs, "diff": primary["diff"], "ci95": primary["ci95"], "p": primary["p"],
                    "n": primary["n"], "dz": primary["dz"]},
        "secondary": {a: {"diff": r["diff"], "ci95": r["ci95"], "p": r["p"], "p_holm": holm[a], "n": r["n"]}
                      for a, r in secondary.items()},
        "equivalence": equiv, "adjusted_for_clean_exact_match": adjusted,
        "clean_exact_match_diff": {"diff": clean_diff["diff"], "ci95": clean_diff["ci95"], "p": clean_diff["p"]},
        "detectable_difference_80pct": detectable,
        "calibration": {"chosen_b": {str(k): v for k, v in plan["chosen_b"].items()}, "runs": plan["calibration"]},
        "gate": plan["gate"], "wall_s": plan["wall_s"],
        "thresholds": {"paper_baseline_roberta_large": b_paper, "minilm_baseline": b_here,
                       "mapped": {f"{t:.2f}": v for t, v in mapped.items()}},
    }
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    summary["primary"]["sentence"] = _sentence(summary, equiv)
    text = _markdown(plan, rows, arms, rounds, summary, below, mapped, figures, report_dir, secondary, holm)
    (report_dir / "report.md").write_text(text)
    return summary


def damage_bound(margin, upper, ce_endpoint):
    """The equivalence margin against the attack's whole effect on CE (1 - CE's endpoint), and the
    informative bound: the share of that damage the upper confidence limit could recover."""
    damage = 1.0 - ce_endpoint
    if not damage > 0:
        return f"and the attack did not move CE's captions (endpoint {ce_endpoint:.3f})"
    return (f"a margin about {margin / damage:.0%} of the attack's whole effect on CE (1 - {ce_endpoint:.3f} = "
            f"{damage:.3f}); the informative bound is the upper CI, {fmt(upper, 4, True)}: at most about "
            f"{upper / damage:.0%} of the attack's damage recovered")


def _sentence(summary, equiv):
    p = summary["primary"]
    lab = f"{ARM_LABELS[p['arm']]} minus {ARM_LABELS[p['vs']]}"
    core = (f"{lab}: {fmt(p['diff'], 4, True)} BERTScore F1 against the clean caption over the endpoint rounds "
            f"(95% CI {fmt_interval(p['ci95'], 4)}, paired t-test p = {fmt_p(p['p'])}, {p['n']} pairs)")
    if math.isfinite(p["p"]) and p["p"] < 0.05:
        return core + ": PRSL changed robustness at this scale."
    if math.isfinite(equiv["p"]) and equiv["p"] < 0.05:
        return core + (f": no difference, and within the ±{equiv['margin']} equivalence margin (TOST p = "
                       f"{fmt_p(equiv['p'])}), " + damage_bound(equiv["margin"], p["ci95"][1],
                                                               summary["arms"][p["vs"]]["endpoint_mean"]) + ".")
    return core + f": no significant difference, and equivalence within ±{equiv['margin']} is not shown either " \
                  f"(TOST p = {fmt_p(equiv['p'])})."


def _figures(rows, arms, rounds, endpoint, vs, fig_dir, spec):
    plt = pyplot()
    out = {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for a in arms:
        runs = [r["_run"] for r in rows if r["arm"] == a]
        for ax, fn in zip(axes, (lambda run, rr: run_value(run, rr, "clean", "bertscore_f1"), attack_loss)):
            m, h = group_curve(runs, rounds, fn)
            h = np.nan_to_num(h)
            line, = ax.plot(rounds, m, marker="o", color=ARM_COLOURS[a], label=f"{ARM_LABELS[a]} (n={len(runs)})")
            ax.fill_between(rounds, m - h, m + h, color=line.get_color(), alpha=0.2)
    axes[0].set_title("BERTScore F1 (MiniLM) vs the clean caption")
    axes[1].set_title("attack loss (teacher-forced CE of the clean caption)")
    for ax in axes:
        ax.set_xlabel("BIM round (one step each)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Per round, mean over models (bands: 95% CI)")
    out["rounds"] = save_figure(fig, fig_dir / "rounds.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    others = [a for a in arms if a != vs]
    for j, a in enumerate(others):
        pairs = sorted(set(endpoint.get(a, {})) & set(endpoint.get(vs, {})))
        d = [endpoint[a][p] - endpoint[vs][p] for p in pairs]
        axes[0].scatter([j] * len(d), d, alpha=0.6, color=ARM_COLOURS[a])
        r = st.paired(endpoint.get(a, {}), endpoint.get(vs, {}))
        if math.isfinite(r["ci95"][0]):
            axes[0].errorbar([j + 0.15], [r["diff"]], yerr=[[r["diff"] - r["ci95"][0]], [r["ci95"][1] - r["diff"]]],
                             fmt="s", color="k", capsize=4)
    axes[0].axhline(0, color="grey", lw=1)
    for m in (-spec["equivalence_margin"], spec["equivalence_margin"]):
        axes[0].axhline(m, color="grey", lw=1, ls="--")
    axes[0].set_xticks(range(len(others)), [ARM_LABELS[a] for a in others])
    axes[0].set_title(f"endpoint, arm minus {ARM_LABELS[vs]} per (base, seed); mean ± 95% CI")
    for a in arms:
        ms = [r for r in rows if r["arm"] == a]
        axes[1].scatter([r["clean_exact_match"] for r in ms], [r["endpoint"] for r in ms], label=ARM_LABELS[a],
                        alpha=0.7, color=ARM_COLOURS[a])
    axes[1].set_xlabel("clean exact match (attacked images)")
    axes[1].set_ylabel("endpoint")
    axes[1].legend(fontsize=8)
    axes[1].set_title("clean quality vs robustness, per model")
    for ax in axes:
        ax.grid(alpha=0.3)
    out["paired"] = save_figure(fig, fig_dir / "paired.png")
    return out


def _markdown(plan, rows, arms, rounds, summary, below, mapped, figures, report_dir, secondary, holm):
    spec = plan["spec"]
    p = summary["primary"]
    L = [f"# PRSL robustness study (`prsl-study --size {plan['size']}`)", "",
         f"**Primary result.** {p['sentence']}", "",
         plan["preregistration"].replace("# Pre-registered", "## Pre-registered"), "## Setup", ""]
    base = spec["base"]
    L += [f"- Data: synthetic shape scenes (one object; shape, colour, size, position), {base.get('train_images')} "
          f"training images; the gate and the calibration use a separate held-out split of {spec['gate_images']} "
          f"images; the attack uses {summary['n_images']} other held-out images, the same for every model.",
          f"- Bases: tiny ViT-GPT2 (d={base.get('hidden', 64)}, patch {base.get('patch', 16)}), trained from scratch "
          f"with CE for {base.get('max_steps')} steps, then {spec['extend']['max_steps']} more steps at a time "
          f"(lr {spec['extend']['lr']:g}) while below the gate (at most {spec['max_extensions']} times).",
          f"- Fine-tunes: {spec['finetune']['max_steps']} steps at lr {spec['finetune']['lr']:g} (linear decay) from "
          f"each base, seeds 0-{spec['seeds'] - 1}, the same data order for every arm of a pair.",
          f"- Attack: untargeted BIM, eps 0.5 / alpha 0.01 in normalised space, clamped to the valid pixel range, "
          f"{summary['steps_per_round']} step per round, {summary['rounds']} rounds, ascending the teacher-forced CE "
          "of the clean caption; greedy decoding.",
          f"- Wall time: {plan['wall_s'] / 60:.1f} min on {plan['cpus']} CPU core(s) with {plan['workers']} worker "
          "process(es), summed over the invocations of `prsl-study` that trained or attacked anything"
          + (" (plus the bases marked *outside* in the gate table: trained with the same configuration before the "
             "study ran, in the `train s` shown, side by side)." if any(g.get("outside") for g in plan["gate"])
             else "."), "",
          "### Gate", "",
          table(["base", "stage", "steps", "train s", "exact match", "shape", "colour", "size", "passed"],
                 [[g["base"], g["stage"], g["steps"],
                   f"{g['train_s']:.0f}" + (" (*outside*)" if g.get("outside") else ""), fmt(g["exact_match"], 2),
                   fmt(g["shape"], 2), fmt(g["colour"], 2), fmt(g["size"], 2), "yes" if g["passed"] else "no"]
                  for g in plan["gate"]]),
          "", f"Gate: each of exact match, shape, colour and size accuracy >= {spec['gate']} on the gate split.", "",
          "### Calibration of b (base 0, seed 0, gate split)", "",
          table(["k", "b", "clean exact match", "CE's", "chosen"],
                 [[c["k"], f"{c['b']:g}", fmt(c["exact_match"], 3), fmt(c["ce_exact_match"], 3),
                   "yes" if c["chosen"] else ""] for c in plan["calibration"]]),
          "", f"Rule: the largest b whose clean exact match is at least CE's minus {spec['margin']} (one model per b: "
          "the rule guards against a b that visibly hurts clean quality; it cannot resolve small differences).", "",
          "### Arms", "",
          table(["arm", "loss", "models", "clean exact match (mean)", "train loss (mean)"],
                 [[ARM_LABELS[a], json.dumps(plan["arms"][a]), summary["arms"][a]["n_models"],
                   fmt(summary["arms"][a]["clean_exact_match_mean"]),
                   fmt(float(np.mean([r["train_loss"] for r in rows if r["arm"] == a])))] for a in arms]),
          "", "The released arm's train loss includes its own penalty (b=1e-5 times a log-softmax across rows), "
          "and PRSL's includes b*D: the train losses are not comparable across arms; the clean exact match is.", ""]

    L += ["## Results", "", "### Primary and secondary comparisons (endpoint, arm minus CE, paired)", ""]
    rows_t = [[ARM_LABELS[p["arm"]] + " (primary)", p["n"], fmt(p["diff"], 4, True), fmt_interval(p["ci95"], 4),
               fmt_p(p["p"]), "-", fmt(p["dz"], 2)]]
    for a, r in secondary.items():
        rows_t.append([ARM_LABELS[a], r["n"], fmt(r["diff"], 4, True), fmt_interval(r["ci95"], 4), fmt_p(r["p"]),
                       fmt_p(holm[a]), fmt(r["dz"], 2)])
    L += [table(["arm", "pairs", "diff", "95% CI", "p", "p (Holm)", "d_z"], rows_t), ""]
    eq, adj, cd = summary["equivalence"], summary["adjusted_for_clean_exact_match"], summary["clean_exact_match_diff"]
    L += [f"- Equivalence (TOST, margin ±{eq['margin']}): 90% CI {fmt_interval(eq['ci90'], 4)}, p = {fmt_p(eq['p'])}.",
          f"- Clean exact match, {ARM_LABELS[p['arm']]} minus CE: {fmt(cd['diff'], 3, True)} (95% CI "
          f"{fmt_interval(cd['ci95'])}, p = {fmt_p(cd['p'])}).",
          f"- Adjusted for clean exact match (paired difference at equal clean quality): {fmt(adj['diff'], 4, True)} "
          f"(95% CI {fmt_interval(adj['ci95'], 4)}, p = {fmt_p(adj['p'])}; slope {fmt(adj['slope'], 3, True)}).",
          f"- Power: with the observed SD of the paired differences, {p['n']} pairs detect "
          f"{fmt(summary['detectable_difference_80pct'], 4)} with 80% power (two-sided 5%).", ""]

    L += ["### Per round (mean over models ± 95% CI)", "",
          "BERTScore F1 against the clean caption:", "",
          table(["arm"] + [f"r{r}" for r in rounds[1:]],
                 [[ARM_LABELS[a]] + [fmt_mean_ci([r[f"bertscore_clean_r{rr}"] for r in rows if r["arm"] == a])
                                     for rr in rounds[1:]] for a in arms]), "",
          "Attack loss (teacher-forced CE of the clean caption; round 0 = clean image):", "",
          table(["arm"] + [f"r{r}" for r in rounds],
                 [[ARM_LABELS[a]] + [fmt_mean_ci([r[f"attack_loss_r{rr}"] for r in rows if r["arm"] == a], 2)
                                     for rr in rounds] for a in arms]), ""]

    th = summary["thresholds"]
    L += [f"### Shares below the paper's BERTScore thresholds after round {spec['threshold_round']}", "",
          f"The paper's thresholds are on roberta-large BERTScore; this run scores with the embedded MiniLM, whose "
          "scale differs. Both are anchored at 1 (identical) and at the encoder's score for unrelated text, and mapped "
          f"linearly (bert_score's rescaling): roberta-large's baseline {th['paper_baseline_roberta_large']:.3f} "
          f"(bert_score's file, from Common Crawl sentence pairs) and MiniLM's {th['minilm_baseline']:.3f} (measured "
          "here on the first references of different attacked images, which share templates: a different kind of "
          "unrelated text, so the mapped thresholds are approximate).", "",
          table(["arm"] + [f"< {t:.2f} -> {mapped[t]:.3f} (mapped)" for t in THRESHOLDS] +
                 [f"< {t:.2f} (raw)" for t in THRESHOLDS],
                 [[ARM_LABELS[a]] + [below[(a, t)][0] for t in THRESHOLDS] +
                  [below[(a, t)][1] for t in THRESHOLDS] for a in arms]), ""]

    jp = [r for r in rows if "jpeg_clip_stats_unchanged" in r]
    if jp:
        def avg(key):
            return fmt(float(np.mean([r[key] for r in jp])), 3)
        L += ["### The released code's image round trip (no gradient step)", "",
              "The authors' attack saves every round as an 8-bit JPEG after un-normalising with CLIP's mean/std, and "
              f"reloads it through the model's processor. Measured on the {summary['n_images']} clean images for all "
              f"{len(jp)} models (JPEG quality {plan['jpeg_quality']}, PIL's default):", "",
              table(["round trip", "PSNR dB", "L-inf (normalised)", "captions unchanged", "BERTScore vs clean"],
                     [["CLIP mean/std (as released)", avg("jpeg_clip_stats_psnr_db"),
                       avg("jpeg_clip_stats_linf_normalised"), avg("jpeg_clip_stats_unchanged"),
                       avg("jpeg_clip_stats_bertscore_f1_vs_clean")],
                      ["the model's own mean/std", avg("jpeg_model_stats_psnr_db"),
                       avg("jpeg_model_stats_linf_normalised"), avg("jpeg_model_stats_unchanged"),
                       avg("jpeg_model_stats_bertscore_f1_vs_clean")]]), "",
              "These models normalise with mean = std = 0.5 and the attack's budget is eps = 0.5 (normalised units). "
              "Un-normalising with CLIP's statistics instead shifts the colour and contrast of every image, and JPEG "
              "adds block artefacts; whatever that does to the captions (the table) happens before any gradient "
              "step, and the released pipeline would count it as attack damage in every round. This package keeps "
              "the adversarial images as float tensors in the model's own normalised space between rounds (no "
              "re-quantisation, no re-encoding), so every change it measures is the attack's; that is why it does "
              "not reproduce the round trip.", ""]

    L += ["## Figures", ""]
    for key, path in figures.items():
        L.append(f"![{key}]({relative_path(path, report_dir)})")
    L += ["", "Per-model values: `models.csv`; machine-readable summary: `summary.json`.", ""]
    return "\n".join(L)
