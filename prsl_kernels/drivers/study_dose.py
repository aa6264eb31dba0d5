"""The report of ``prsl-study --design dose``: the endpoint against b, the frontier, ``summary.json``.

The dose design's arms are CE and PRSL k=20 at several b. Its primary analysis is the paired
slope of the endpoint against log2 b over the PRSL arms (``stats.dose_slope``); each b is
also compared with CE (paired, Holm over the doses), on BIM (primary endpoint) and on APGD in
pixel space (secondary). CE is PRSL at b = 0, so ``dose`` lists it under "0"; the slope leaves it
out (log2 0 is not a dose).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from . import stats as st
from .report import THRESHOLDS, attack_loss, load_run, relative_path, run_value
from .stats import mean_ci
from .study_report import (by_arm, damage_bound, here_bertscore_baseline, model_rows, paper_bertscore_baseline,
                           write_models_csv)
from .tables import fmt, fmt_interval, fmt_mean_ci, fmt_p, group_curve, pyplot, save_figure, table


def _b_of(plan, arm):
    kw = plan["arms"][arm]
    return 0.0 if kw["loss"] == "ce" else float(kw["b"])


def _label(plan, arm):
    return "CE" if _b_of(plan, arm) == 0.0 else f"PRSL k={plan['arms'][arm]['k']} b={_b_of(plan, arm):g}"


def _rows(plan):
    rows = model_rows(plan)
    for row, m in zip(rows, plan["models"]):
        run = load_run(m["apgd_dir"])
        row["apgd_endpoint"] = run_value(run, 1, "clean", "bertscore_f1")
        row["apgd_attack_loss"] = attack_loss(run, 1)
        row["apgd_clean_exact_match"] = run_value(run, 0, "reference", "exact_match")
    return rows


def _versus_ce(endpoint, prsl_arms, vs="ce"):
    out = {a: st.paired(endpoint.get(a, {}), endpoint.get(vs, {})) for a in prsl_arms}
    holm = st.holm({a: r["p"] for a, r in out.items()})
    return {a: {"diff": r["diff"], "ci95": r["ci95"], "p": r["p"], "p_holm": holm[a], "n": r["n"], "dz": r["dz"]}
            for a, r in out.items()}


def _slope(endpoint, plan, prsl_arms):
    r = st.dose_slope(endpoint, {a: math.log2(_b_of(plan, a)) for a in prsl_arms})
    return {k: r[k] for k in ("estimate", "ci95", "p", "n", "sd")}


def write_dose_report(plan, report_dir):
    report_dir = Path(report_dir)
    fig_dir = report_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    spec = plan["spec"]
    rows = _rows(plan)
    arms = sorted({r["arm"] for r in rows}, key=lambda a: _b_of(plan, a))
    prsl_arms = [a for a in arms if _b_of(plan, a) > 0]
    top = prsl_arms[-1]
    rounds = sorted(rows[0]["_run"]["rounds"])

    write_models_csv(rows, report_dir / "models.csv")

    endpoint, apgd = by_arm(rows, "endpoint"), by_arm(rows, "apgd_endpoint")
    clean_em = by_arm(rows, "clean_exact_match")
    vs_ce, apgd_vs_ce = _versus_ce(endpoint, prsl_arms), _versus_ce(apgd, prsl_arms)
    slope, apgd_slope = _slope(endpoint, plan, prsl_arms), _slope(apgd, plan, prsl_arms)
    clean_slope = _slope(clean_em, plan, prsl_arms)

    dose = {}
    for a in arms:
        ms = [r for r in rows if r["arm"] == a]
        entry = {"arm": a, "n_models": len(ms),
                 "clean_exact_match_mean": float(np.mean([r["clean_exact_match"] for r in ms])),
                 "endpoint_mean": float(np.mean([r["endpoint"] for r in ms])),
                 "apgd_endpoint_mean": float(np.mean([r["apgd_endpoint"] for r in ms]))}
        if a != "ce":
            cd = st.paired(clean_em.get(a, {}), clean_em.get("ce", {}))
            entry.update(
                vs_ce=vs_ce[a], apgd_vs_ce=apgd_vs_ce[a],
                clean_exact_match_vs_ce={"diff": cd["diff"], "ci95": cd["ci95"], "p": cd["p"]},
                adjusted_for_clean_exact_match=st.adjusted_difference(endpoint.get(a, {}), endpoint.get("ce", {}),
                                                                      clean_em.get(a, {}), clean_em.get("ce", {})),
                equivalence=st.tost(endpoint.get(a, {}), endpoint.get("ce", {}), spec["equivalence_margin"]))
        dose[f"{_b_of(plan, a):g}"] = entry

    b_paper, b_here = paper_bertscore_baseline(), here_bertscore_baseline(plan["references"])
    primary = st.paired(endpoint.get(top, {}), endpoint.get("ce", {}))
    summary = {
        "design": "dose", "size": plan["size"],
        "arms": {a: {"n_models": dose[f"{_b_of(plan, a):g}"]["n_models"],
                     "clean_exact_match_mean": dose[f"{_b_of(plan, a):g}"]["clean_exact_match_mean"],
                     "endpoint_mean": dose[f"{_b_of(plan, a):g}"]["endpoint_mean"], "loss": plan["arms"][a]}
                 for a in arms},
        "n_images": len(rows[0]["_run"]["rounds"][0]["records"]), "rounds": max(rounds),
        "steps_per_round": plan["attack"]["steps_per_round"],
        "endpoint": "BERTScore F1 vs clean output, mean over rounds "
                    f"{spec['endpoint_rounds'][0]}-{spec['endpoint_rounds'][-1]}",
        # The schema of the first study: "primary" is the largest dose against CE; the pre-registered
        # primary analysis of this design is "slope" with the per-b comparisons in "dose".
        "primary": {"arm": top, "vs": "ce", "diff": primary["diff"], "ci95": primary["ci95"], "p": primary["p"],
                    "p_holm": vs_ce[top]["p_holm"], "n": primary["n"], "dz": primary["dz"]},
        "secondary": {a: vs_ce[a] for a in prsl_arms if a != top},
        "equivalence": dose[f"{_b_of(plan, top):g}"]["equivalence"],
        "adjusted_for_clean_exact_match": dose[f"{_b_of(plan, top):g}"]["adjusted_for_clean_exact_match"],
        "clean_exact_match_diff": dose[f"{_b_of(plan, top):g}"]["clean_exact_match_vs_ce"],
        "detectable_difference_80pct": st.detectable_difference(
            st.paired(endpoint.get(top, {}), endpoint.get("ce", {}))["sd"], primary["n"]),
        "calibration": {"chosen_b": {}, "runs": [], "note": "none: b is the dose, fixed by the design"},
        "gate": plan["gate"], "wall_s": plan["wall_s"],
        "thresholds": {"paper_baseline_roberta_large": b_paper, "minilm_baseline": b_here,
                       "mapped": {f"{t:.2f}": st.recalibrated_threshold(t, b_paper, b_here) for t in THRESHOLDS}},
        "dose": dose, "slope": slope,
        "clean_exact_match_slope": clean_slope,
        "apgd": {"attack": plan["apgd"], "endpoint": "BERTScore F1 vs clean output after the APGD steps",
                 "slope": apgd_slope},
    }
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    figures = _figures(plan, rows, arms, rounds, fig_dir)
    (report_dir / "report.md").write_text(_markdown(plan, rows, arms, prsl_arms, rounds, summary, figures,
                                                    report_dir))
    return summary


def sentence(summary):
    """The headline: the slope per doubling of b, and where the doses stand against CE."""
    sl = summary["slope"]
    # Four digits near the threshold: a p of 0.0503 must not read as 0.050.
    pv = f"{sl['p']:.4f}" if 0.04 <= sl["p"] < 0.06 else fmt_p(sl["p"])
    verdict = "" if not sl["p"] >= 0.05 else ": not significant at the pre-registered 0.05"
    core = (f"PRSL k=20's dose-response slope is {fmt(sl['estimate'], 5, True)} BERTScore F1 per doubling of b "
            f"(95% CI {fmt_interval(sl['ci95'], 5)}, p = {pv}, {sl['n']} pairs{verdict}) under BIM")
    sig = {b: d["vs_ce"] for b, d in summary["dose"].items() if "vs_ce" in d and d["vs_ce"]["p_holm"] < 0.05}
    if not sig:
        tail = "; no b differs from CE after Holm correction"
    else:
        tail = "; " + "; ".join(f"b = {b} differs from CE by {fmt(v['diff'], 4, True)} "
                                f"(95% CI {fmt_interval(v['ci95'], 4)}, Holm p = {fmt_p(v['p_holm'])})"
                                for b, v in sig.items())
    tests = [d["equivalence"] for d in summary["dose"].values() if "equivalence" in d]
    within = all(t["p"] < 0.05 for t in tests)
    upper = max(d["vs_ce"]["ci95"][1] for d in summary["dose"].values() if "vs_ce" in d)
    bound = damage_bound(tests[0]["margin"], upper, summary["dose"]["0"]["endpoint_mean"])
    return core + tail + (f"; every b lies within the ±{tests[0]['margin']} equivalence margin, {bound}"
                          if within else "") + "."


def _figures(plan, rows, arms, rounds, fig_dir):
    plt = pyplot()
    colours = {a: f"C{i}" for i, a in enumerate(arms)}
    out = {}

    # the frontier: clean quality against robustness, one point per model
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "endpoint", "BIM endpoint (rounds mean)"),
                           (axes[1], "apgd_endpoint", "APGD endpoint")):
        for a in arms:
            ms = [r for r in rows if r["arm"] == a]
            xs, ys = [r["clean_exact_match"] for r in ms], [r[key] for r in ms]
            ax.scatter(xs, ys, alpha=0.55, color=colours[a], label=_label(plan, a))
            (mx, hx), (my, hy) = mean_ci(xs), mean_ci(ys)
            ax.errorbar([mx], [my], xerr=[[np.nan_to_num(hx)], [np.nan_to_num(hx)]],
                        yerr=[[np.nan_to_num(hy)], [np.nan_to_num(hy)]], fmt="D", color=colours[a], mec="k",
                        capsize=3)
        ax.set_xlabel("clean exact match (attacked images)")
        ax.set_ylabel("BERTScore F1 vs the clean caption")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Robustness-accuracy frontier: one point per model; diamonds: arm mean ± 95% CI")
    out["frontier"] = save_figure(fig, fig_dir / "frontier.png")

    # the dose response as analysed: each b minus CE within pairs (the bases' spread cancels)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    prsl = [a for a in arms if _b_of(plan, a) > 0]
    xs = [math.log2(_b_of(plan, a)) for a in prsl]
    for ax, key, title in ((axes[0], "endpoint", "BIM endpoint"), (axes[1], "apgd_endpoint", "APGD endpoint")):
        ce = {r["pair"]: r[key] for r in rows if r["arm"] == "ce"}
        means, halves = [], []
        for x, a in zip(xs, prsl):
            d = [r[key] - ce[r["pair"]] for r in rows if r["arm"] == a and r["pair"] in ce]
            ax.scatter([x] * len(d), d, color=colours[a], alpha=0.5, s=14)
            m, h = mean_ci(d)
            means.append(m)
            halves.append(np.nan_to_num(h))
        ax.errorbar([x + 0.15 for x in xs], means, yerr=halves, fmt="s-", color="k", capsize=4,
                    label="mean ± 95% CI (paired)")
        ax.axhline(0, color="grey", lw=1)
        ax.set_xticks(xs, [f"{_b_of(plan, a):g}" for a in prsl])
        ax.set_xlabel("b (log scale)")
        ax.set_ylabel("PRSL minus CE, same (base, seed)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Dose response: BERTScore F1 vs the clean caption, PRSL k=20 minus CE per pair")
    out["dose"] = save_figure(fig, fig_dir / "dose.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for a in arms:
        runs = [r["_run"] for r in rows if r["arm"] == a]
        m, h = group_curve(runs, rounds, lambda run, rr: run_value(run, rr, "clean", "bertscore_f1"))
        line, = ax.plot(rounds, m, marker="o", color=colours[a], label=_label(plan, a))
        ax.fill_between(rounds, m - np.nan_to_num(h), m + np.nan_to_num(h), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("BIM round (one step each)")
    ax.set_title("BERTScore F1 vs the clean caption, per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out["rounds"] = save_figure(fig, fig_dir / "rounds.png")
    return out


def _markdown(plan, rows, arms, prsl_arms, rounds, summary, figures, report_dir):
    spec, dose = plan["spec"], summary["dose"]
    sl, asl, csl = summary["slope"], summary["apgd"]["slope"], summary["clean_exact_match_slope"]
    ap = plan["apgd"]
    L = [f"# PRSL dose-response study (`prsl-study --design dose --size {plan['size']}`)", "",
         f"**Primary result.** {sentence(summary)}", "",
         plan["preregistration"].replace("# Pre-registered", "## Pre-registered"), "## Setup", ""]
    base = spec["base"]
    L += [f"- Data, bases and fine-tuning as in the first study (`docs/study-run/`): synthetic shape scenes, "
          f"{base.get('train_images')} training images, tiny ViT-GPT2 bases (d={base.get('hidden', 64)}) gated on a "
          f"held-out split of {spec['gate_images']} images; fine-tunes of {spec['finetune']['max_steps']} steps at lr "
          f"{spec['finetune']['lr']:g}, seeds 0-{spec['seeds'] - 1}, the same data order for every arm of a pair.",
          f"- Attacks on the same {summary['n_images']} held-out images for every model: the paper's BIM (eps 0.5 / "
          f"alpha 0.01 normalised, {summary['rounds']} rounds of one step) and APGD (AutoAttack's APGD-CE schedule) "
          f"with {ap['steps_per_round']} steps at eps {ap['eps'] * 255:.0f}/255 in [0, 1] pixel space, random start "
          "per image; both ascend the teacher-forced CE of the model's clean caption; greedy decoding.",
          f"- Wall time: {plan['wall_s'] / 60:.1f} min on {plan['cpus']} CPU core(s) with {plan['workers']} worker "
          "process(es), summed over the invocations that trained or attacked anything.", "",
          "### Gate", "",
          table(["base", "stage", "steps", "train s", "exact match", "shape", "colour", "size", "passed"],
                 [[g["base"], g["stage"], g["steps"], f"{g['train_s']:.0f}", fmt(g["exact_match"], 2),
                   fmt(g["shape"], 2), fmt(g["colour"], 2), fmt(g["size"], 2), "yes" if g["passed"] else "no"]
                  for g in plan["gate"]]), ""]

    L += ["## Results", "", "### Dose response (pre-registered primary analysis)", "",
          table(["endpoint", "slope per doubling of b", "95% CI", "p", "pairs"],
                 [["BIM (primary)", fmt(sl["estimate"], 4, True), fmt_interval(sl["ci95"], 4), fmt_p(sl["p"]), sl["n"]],
                  ["APGD (secondary)", fmt(asl["estimate"], 4, True), fmt_interval(asl["ci95"], 4), fmt_p(asl["p"]),
                   asl["n"]],
                  ["clean exact match", fmt(csl["estimate"], 4, True), fmt_interval(csl["ci95"], 4), fmt_p(csl["p"]),
                   csl["n"]]]), "",
          "### Per b (mean over models ± 95% CI)", "",
          table(["arm", "models", "clean exact match", "BIM endpoint", "APGD endpoint", "train loss"],
                 [[_label(plan, a), dose[f"{_b_of(plan, a):g}"]["n_models"],
                   fmt_mean_ci([r["clean_exact_match"] for r in rows if r["arm"] == a]),
                   fmt_mean_ci([r["endpoint"] for r in rows if r["arm"] == a], 4),
                   fmt_mean_ci([r["apgd_endpoint"] for r in rows if r["arm"] == a], 4),
                   fmt_mean_ci([r["train_loss"] for r in rows if r["arm"] == a])] for a in arms]), "",
          "The train losses include b*D and are not comparable across arms; the clean exact match is.", "",
          "### Each b against CE (paired by (base, seed); Holm over the doses)", ""]
    t = []
    for a in prsl_arms:
        d = dose[f"{_b_of(plan, a):g}"]
        v, g, c, adj, eq = d["vs_ce"], d["apgd_vs_ce"], d["clean_exact_match_vs_ce"], \
            d["adjusted_for_clean_exact_match"], d["equivalence"]
        t.append([_label(plan, a), f"{fmt(v['diff'], 4, True)} {fmt_interval(v['ci95'], 4)}", fmt_p(v["p_holm"]),
                  f"{fmt(g['diff'], 4, True)} {fmt_interval(g['ci95'], 4)}", fmt_p(g["p_holm"]),
                  f"{fmt(c['diff'], 3, True)} {fmt_interval(c['ci95'])}",
                  f"{fmt(adj['diff'], 4, True)} {fmt_interval(adj['ci95'], 4)}", fmt_p(eq["p"])])
    L += [table(["arm", "BIM endpoint diff [95% CI]", "p (Holm)", "APGD endpoint diff [95% CI]", "p (Holm)",
                  "clean exact match diff [95% CI]", "BIM diff at equal clean EM [95% CI]",
                  f"TOST ±{spec['equivalence_margin']} p"], t), "",
          f"Power: with the observed SD of the paired differences at b = {_b_of(plan, prsl_arms[-1]):g}, "
          f"{summary['primary']['n']} pairs detect {fmt(summary['detectable_difference_80pct'], 4)} BERTScore F1 "
          "with 80% power (two-sided 5%).", "",
          "### BIM per round (mean over models ± 95% CI)", "",
          table(["arm"] + [f"r{r}" for r in rounds[1:]],
                 [[_label(plan, a)] + [fmt_mean_ci([r[f"bertscore_clean_r{rr}"] for r in rows if r["arm"] == a])
                                       for rr in rounds[1:]] for a in arms]), "",
          "## Figures", ""]
    for key, path in figures.items():
        L.append(f"![{key}]({relative_path(path, report_dir)})")
    L += ["", "Per-model values: `models.csv`; machine-readable summary: `summary.json`.", ""]
    return "\n".join(L)
