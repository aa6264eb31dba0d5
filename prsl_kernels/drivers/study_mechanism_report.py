"""The report of ``prsl-study --design mechanism``: ``summary.json``, ``report.md``, ``records.csv``,
``models.csv``, ``treatment.csv`` and figures.

Statistics, as pre-registered (``docs/study-mechanism/preregistration.md``):

- **primary**: per base, the PRSL - CE difference of the per-model mean minimum eps (margin
  attack), averaged over the base's seeds; the mean over bases, its 95% t interval and the two-sided
  one-sample t-test p (the base is the unit, n = number of bases);
- **competence**: the least-squares slope of that per-base effect on the base's clean exact match,
  its 95% t interval (n - 2 df) and p;
- **mechanism**: over the (base, seed) pairs, the Pearson correlation (and OLS slope) of the
  PRSL - CE change in held-out D, margin and ``||grad_x CE||_1`` with the change in the primary endpoint,
  Holm over the three;
- **secondary endpoints**, each analysed like the primary: the share of captions changed at 4/255 by
  APGD-CE and by APGD-margin, the BIM BERTScore endpoint, and clean exact match (quality cost).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np

from . import stats as st
from .report import relative_path
from .tables import fmt, fmt_interval, fmt_p, pyplot, save_figure, table

ENDPOINTS = {
    "min_eps_margin": ("mean minimum eps to change the caption, margin attack (x 1/255)", 255.0),
    "apgd_margin_changed": ("share of captions changed, APGD-margin at 4/255", 1.0),
    "apgd_ce_changed": ("share of captions changed, APGD-CE at 4/255", 1.0),
    "bim_endpoint": ("BIM BERTScore F1 vs clean, mean over rounds", 1.0),
    "clean_exact_match": ("clean exact match on the attacked images", 1.0),
}
PREDICTORS = {"held_out_D_mean": "held-out D", "margin": "target logit margin", "grad_l1": "‖grad_x CE‖₁"}


def _clean_em(model, references):
    from .data import normalize_text

    hits = [normalize_text(o) in {normalize_text(r) for r in refs}
            for o, refs in zip(model["attacks"]["summary"]["clean"], references)]
    return float(np.mean(hits))


def model_rows(plan, references):
    bases = {b["base"]: b for b in plan["bases"]}
    rows = []
    for m in plan["models"]:
        a, me = m["attacks"]["summary"], m["measures"]
        rows.append({"model": m["model"], "arm": m["arm"], "b": m["b"], "base": m["base"], "seed": m["seed"],
                     "steps": m["steps"], "base_exact_match": bases[m["base"]]["exact_match"],
                     "train_loss": m["train_loss"], **{k: me[k] for k in ("held_out_D_mean", "spread", "margin",
                                                                          "ce", "token_accuracy", "grad_l1")},
                     "min_eps_margin": a["margin_min_eps_mean"], "min_eps_margin_median": a["margin_min_eps_median"],
                     "censored": a["margin_censored"], "apgd_margin_changed": a["apgd_margin_changed"],
                     "apgd_ce_changed": a["apgd_ce_changed"], "bim_endpoint": a["bim_endpoint"],
                     "clean_exact_match": _clean_em(m, references)})
    return rows


def _diffs(rows, key):
    """Per (base, seed): PRSL - CE of ``key``."""
    by = {(r["base"], r["seed"], r["arm"] == "ce"): r[key] for r in rows}
    return {(b, s): by[(b, s, False)] - by[(b, s, True)] for (b, s, ce) in by if ce and (b, s, False) in by}


def base_effects(rows, key):
    d = _diffs(rows, key)
    out = {}
    for (b, _), v in d.items():
        out.setdefault(b, []).append(v)
    return {b: float(np.mean(v)) for b, v in sorted(out.items())}


def over_bases(effects):
    r = st.paired({str(b): v for b, v in effects.items()}, {str(b): 0.0 for b in effects})
    return {"estimate": r["diff"], "ci95": r["ci95"], "p": r["p"], "n_bases": r["n"], "sd": r["sd"],
            "per_base": {str(b): v for b, v in effects.items()}}


def regression(x, y):
    """OLS slope of y on x with its 95% t interval (n - 2 df), p, and Pearson r."""
    from scipy import stats

    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size < 3 or np.ptp(x) == 0:
        return {"slope": float("nan"), "ci95": [float("nan")] * 2, "p": float("nan"), "r": float("nan"),
                "n": int(x.size)}
    res = stats.linregress(x, y)
    half = stats.t.ppf(0.975, x.size - 2) * res.stderr
    return {"slope": float(res.slope), "ci95": [float(res.slope - half), float(res.slope + half)],
            "p": float(res.pvalue), "r": float(res.rvalue), "n": int(x.size)}


def analyse(plan, rows):
    base_em = {b["base"]: b["exact_match"] for b in plan["bases"]}
    endpoints = {}
    for key in ENDPOINTS:
        eff = base_effects(rows, key)
        endpoints[key] = {"vs_ce": over_bases(eff),
                          "competence": regression([base_em[b] for b in eff], list(eff.values()))}
    primary = endpoints["min_eps_margin"]["vs_ce"]
    competence = endpoints["min_eps_margin"]["competence"]
    d_end = _diffs(rows, "min_eps_margin")
    mech = {}
    for key, label in PREDICTORS.items():
        d_pred = _diffs(rows, key)
        pairs = sorted(set(d_pred) & set(d_end))
        mech[key] = {"label": label, **regression([d_pred[p] for p in pairs], [d_end[p] for p in pairs]),
                     "mean_change": float(np.mean([d_pred[p] for p in pairs])) if pairs else float("nan")}
    holm = st.holm({k: v["p"] for k, v in mech.items() if math.isfinite(v["p"])})
    for k in mech:
        mech[k]["p_holm"] = holm.get(k, float("nan"))
    # the change the penalty made, over bases (was the treatment delivered in the main study?)
    delivered = {key: over_bases(base_effects(rows, key)) for key in PREDICTORS}
    return endpoints, primary, competence, mech, delivered


def _write_csv(path, rows, fields=None):
    fields = fields or list(rows[0])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def _arm_summary(rows, models):
    out = {}
    for arm in sorted({r["arm"] for r in rows}):
        eps = np.concatenate([m["attacks"]["summary"]["margin_min_eps"] for m in models if m["arm"] == arm])
        rs = [r for r in rows if r["arm"] == arm]
        out[arm] = {"n_models": len(rs), "per_image_min_eps": {
            "mean_x255": float(eps.mean() * 255), "median_x255": float(np.median(eps) * 255),
            "q25_x255": float(np.quantile(eps, 0.25) * 255), "q75_x255": float(np.quantile(eps, 0.75) * 255),
            "censored_share": float(np.mean([r["censored"] for r in rs]))},
            **{k: float(np.mean([r[k] for r in rs])) for k in ("apgd_ce_changed", "apgd_margin_changed",
                                                               "bim_endpoint", "clean_exact_match",
                                                               "held_out_D_mean", "margin", "grad_l1")}}
    return out


def write_mechanism_report(plan, report_dir):
    report_dir = Path(report_dir)
    fig_dir = report_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    rows = model_rows(plan, plan["references"])
    endpoints, primary, competence, mech, delivered = analyse(plan, rows)
    treatment = [{k: r[k] for k in ("arm", "b", "k", "steps", "held_out_D_mean", "spread", "margin", "ce",
                                    "token_accuracy", "grad_l1")} for r in plan["treatment"]]
    ce_d = {r["steps"]: r["held_out_D_mean"] for r in treatment if r["b"] == 0}
    for r in treatment:
        r["D_ratio_vs_ce"] = r["held_out_D_mean"] / ce_d[r["steps"]] if ce_d.get(r["steps"]) else float("nan")

    _write_csv(report_dir / "models.csv", rows)
    _write_csv(report_dir / "treatment.csv", treatment)
    _write_csv(report_dir / "bases.csv", [{k: v for k, v in b.items() if k != "dir"} for b in plan["bases"]])
    records = [dict(arm=m["arm"], base=m["base"], seed=m["seed"], **rec) for m in plan["models"]
               for rec in m["attacks"]["records"]]
    _write_csv(report_dir / "records.csv", records,
               ["model", "arm", "base", "seed", "image", "attack", "eps", "round", "output", "changed",
                "bertscore_f1", "attack_loss"])
    for name in ("run_diff.patch", "run_diff.rerun.patch"):
        if (Path(plan["out"]) / name).is_file():
            shutil.copyfile(Path(plan["out"]) / name, report_dir / name)

    summary = {
        "design": "mechanism", "size": plan["size"], "wall_s": plan["wall_s"], "threads": plan["threads"],
        "provenance": {k: v for k, v in plan["provenance"].items() if k != "imported_files"},
        "treatment": treatment, "chosen_steps": plan["chosen_steps"], "chosen_reason": plan["chosen_reason"],
        "bases": [{k: v for k, v in b.items() if k != "dir"} for b in plan["bases"]],
        "primary": {"endpoint": "min_eps_margin (per-model mean of the per-image minimum eps, [0, 1] pixels)",
                    "contrast": f"PRSL k=20 b=64 - CE at {plan['chosen_steps']} steps, base as the unit",
                    **primary},
        "competence": {"x": "base clean exact match (gate split)", **competence},
        "mechanism": mech, "treatment_delivered": delivered,
        "secondary": {k: v for k, v in endpoints.items() if k != "min_eps_margin"},
        "attacks": {"n_images": plan["models"][0]["attacks"]["summary"]["n_images"], **plan["spec"]["attack"],
                    "by_arm": _arm_summary(rows, plan["models"])},
    }
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    figures = _figures(plan, rows, treatment, fig_dir)
    (report_dir / "report.md").write_text(_markdown(plan, rows, summary, figures, report_dir))
    return summary


def sentence(summary):
    """The headline: the treatment check, then the comparison."""
    tr = {(r["b"], r["steps"]): r for r in summary["treatment"]}
    s = summary["chosen_steps"]
    ce, pr = tr[(0.0, s)], tr[(64.0, s)]
    p, c = summary["primary"], summary["competence"]
    return (f"At {s} fine-tuning steps from base 0 (the longest-trained), PRSL k=20 b=64 cut held-out D from "
            f"{ce['held_out_D_mean']:.4f} (CE) to {pr['held_out_D_mean']:.4f} ({pr['D_ratio_vs_ce']:.2f}x) and moved "
            f"the target logit margin from {ce['margin']:.2f} to {pr['margin']:.2f} and ‖grad_x CE‖₁ from "
            f"{ce['grad_l1']:.2f} to {pr['grad_l1']:.2f}. Over {p['n_bases']} bases, PRSL - CE in the smallest "
            f"eps that changes a caption under the adaptive margin attack is {fmt(p['estimate'] * 255, 3, True)}/255 "
            f"(95% CI {fmt(p['ci95'][0] * 255, 3, True)} to {fmt(p['ci95'][1] * 255, 3, True)}, p = {fmt_p(p['p'])}); "
            f"its slope on base clean exact match is {fmt(c['slope'] * 255, 2, True)}/255 per unit "
            f"(95% CI {fmt(c['ci95'][0] * 255, 2, True)} to {fmt(c['ci95'][1] * 255, 2, True)}, p = {fmt_p(c['p'])}).")


def _figures(plan, rows, treatment, fig_dir):
    plt = pyplot()
    out = {}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(axes, ("held_out_D_mean", "margin", "grad_l1"),
                              ("held-out D", "target logit margin", "‖grad_x CE‖₁")):
        for b in sorted({r["b"] for r in treatment}):
            rs = sorted((r for r in treatment if r["b"] == b), key=lambda r: r["steps"])
            ax.plot([r["steps"] for r in rs], [r[key] for r in rs], marker="o", label="CE" if b == 0 else f"b={b:g}")
        ax.set_xscale("log")
        steps = sorted({r["steps"] for r in treatment})
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.minorticks_off()
        ax.set_xlabel("fine-tuning steps")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Treatment check: what PRSL k=20 changes on held-out tokens (base 0)")
    out["treatment"] = save_figure(fig, fig_dir / "treatment.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    em = {b["base"]: b["exact_match"] for b in plan["bases"]}
    eff = base_effects(rows, "min_eps_margin")
    axes[0].scatter([em[b] for b in eff], [v * 255 for v in eff.values()])
    axes[0].axhline(0, color="grey", lw=1)
    axes[0].set_xlabel("base clean exact match")
    axes[0].set_ylabel("PRSL - CE, min eps (x 1/255)")
    axes[0].set_title("effect per base against competence")
    for arm, colour in (("ce", "C0"), (f"prsl-k20-b64", "C1")):
        rs = [r for r in rows if r["arm"] == arm]
        axes[1].scatter([r["clean_exact_match"] for r in rs], [r["min_eps_margin"] * 255 for r in rs], color=colour,
                        label=arm, alpha=0.7)
    axes[1].set_xlabel("clean exact match (attacked images)")
    axes[1].set_ylabel("mean min eps (x 1/255)")
    axes[1].set_title("one point per model")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    out["competence"] = save_figure(fig, fig_dir / "competence.png")

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    d_end = _diffs(rows, "min_eps_margin")
    for ax, (key, label) in zip(axes, PREDICTORS.items()):
        d = _diffs(rows, key)
        ks = sorted(set(d) & set(d_end))
        ax.scatter([d[k] for k in ks], [d_end[k] * 255 for k in ks])
        ax.set_xlabel(f"PRSL - CE, {label}")
        ax.set_ylabel("PRSL - CE, min eps (x 1/255)")
        ax.grid(alpha=0.3)
    fig.suptitle("Mechanism: one point per (base, seed)")
    out["mechanism"] = save_figure(fig, fig_dir / "mechanism.png")
    return out


def _row_fmt(r, digits=4):
    return [fmt(r["estimate"], digits, True), fmt_interval(r["ci95"], digits), fmt_p(r["p"]), r["n_bases"]]


def _markdown(plan, rows, summary, figures, report_dir):
    p, c = summary["primary"], summary["competence"]
    prov = summary["provenance"]
    reruns = ", ".join(f"`{r['commit'][:12]}`" for r in prov.get("reruns", []))
    L = [f"# PRSL mechanism study (`prsl-study --design mechanism --size {plan['size']}`)", "",
         f"**Result.** {sentence(summary)}", "",
         f"Run at commit `{prov['commit']}`; package files it imported with uncommitted edits: "
         f"{', '.join(f'`{f}`' for f in prov['dirty_imported_files']) or 'none'} (their diff: `run_diff.patch`)"
         + (f"; later invocations (resuming, or rebuilding this report): {reruns}" if reruns else "") + ". "
         f"Wall time {plan['wall_s'] / 60:.1f} min on {plan['threads']} thread(s) of a {plan['cpus']}-core machine.",
         "", "The pre-registration (committed on its own before the run): `preregistration.md`.", "",
         "## 1. Treatment check (base 0, held-out tokens, teacher-forced on the first reference)", "",
         table(["arm", "steps", "held-out D", "D / CE's", "spread S", "margin", "CE", "token acc.", "‖grad_x CE‖₁"],
                [[r["arm"], r["steps"], f"{r['held_out_D_mean']:.4f}", f"{r['D_ratio_vs_ce']:.3f}", f"{r['spread']:.4f}",
                  f"{r['margin']:.3f}", f"{r['ce']:.3f}", f"{r['token_accuracy']:.3f}", f"{r['grad_l1']:.3f}"]
                 for r in sorted(summary["treatment"], key=lambda r: (r["steps"], r["b"]))]), "",
         f"**Chosen length: {summary['chosen_steps']} steps** ({summary['chosen_reason']}).", "",
         "## 2. Bases (no gate)", "",
         table(["base", "init seed", "steps", "clean exact match", "shape", "colour", "size"],
                [[b["base"], b["init_seed"], b["steps"], f"{b['exact_match']:.3f}", f"{b['shape']:.2f}",
                  f"{b['colour']:.2f}", f"{b['size']:.2f}"] for b in summary["bases"]]), "",
         f"Clean exact match spans {min(b['exact_match'] for b in summary['bases']):.3f}-"
         f"{max(b['exact_match'] for b in summary['bases']):.3f} over the bases (the design aimed at about 0.3-0.8).",
         "",
         "## 3. Main comparison: PRSL k=20 b=64 - CE, the base as the unit", "",
         "Was the treatment delivered on every base? PRSL - CE over bases:", "",
         table(["measure", "PRSL - CE", "95% CI", "p", "bases"],
                [[PREDICTORS[k]] + _row_fmt(v) for k, v in summary["treatment_delivered"].items()]), "",
         "Endpoints (per base: mean over its seeds of PRSL - CE; then t over bases):", "",
         table(["endpoint", "PRSL - CE", "95% CI", "p", "bases", "slope on base EM [95% CI]", "p"],
                [[ENDPOINTS["min_eps_margin"][0] + " **(primary)**", fmt(p["estimate"] * 255, 3, True),
                  fmt_interval([v * 255 for v in p["ci95"]], 3), fmt_p(p["p"]), p["n_bases"],
                  f"{fmt(c['slope'] * 255, 2, True)} {fmt_interval([v * 255 for v in c['ci95']], 2)}", fmt_p(c["p"])]] +
                [[ENDPOINTS[k][0], fmt(v["vs_ce"]["estimate"] * ENDPOINTS[k][1], 4, True),
                  fmt_interval([x * ENDPOINTS[k][1] for x in v["vs_ce"]["ci95"]], 4), fmt_p(v["vs_ce"]["p"]),
                  v["vs_ce"]["n_bases"],
                  f"{fmt(v['competence']['slope'] * ENDPOINTS[k][1], 3, True)} "
                  f"{fmt_interval([x * ENDPOINTS[k][1] for x in v['competence']['ci95']], 3)}", fmt_p(v["competence"]["p"])]
                 for k, v in summary["secondary"].items()]), "",
         "Clean quality is part of the contrast, not adjusted for (no adjustment was pre-registered): PRSL's clean "
         f"exact match on the attacked images differs from CE's by "
         f"{fmt(summary['secondary']['clean_exact_match']['vs_ce']['estimate'], 3, True)} "
         f"{fmt_interval(summary['secondary']['clean_exact_match']['vs_ce']['ci95'])}.", "",
         "## 4. Attacks, per arm (mean over models)", "",
         table(["arm", "models", "min eps mean (/255)", "median", "IQR", "censored at eps_max",
                 "changed APGD-CE 4/255", "changed APGD-margin 4/255", "BIM endpoint", "clean EM"],
                [[a, v["n_models"], f"{v['per_image_min_eps']['mean_x255']:.2f}",
                  f"{v['per_image_min_eps']['median_x255']:.2f}",
                  f"{v['per_image_min_eps']['q25_x255']:.2f}-{v['per_image_min_eps']['q75_x255']:.2f}",
                  f"{v['per_image_min_eps']['censored_share']:.2f}", f"{v['apgd_ce_changed']:.3f}",
                  f"{v['apgd_margin_changed']:.3f}", f"{v['bim_endpoint']:.4f}", f"{v['clean_exact_match']:.3f}"]
                 for a, v in summary["attacks"]["by_arm"].items()]), "",
         "## 5. Mechanism: does the change in what PRSL penalises predict the change in robustness?", "",
         "Over the (base, seed) pairs, PRSL - CE of each measure against PRSL - CE of the primary endpoint:", "",
         table(["measure", "mean change", "Pearson r", "OLS slope (x 1/255 per unit) [95% CI]", "p", "p (Holm)", "pairs"],
                [[v["label"], fmt(v["mean_change"], 4, True), fmt(v["r"], 2, True),
                  f"{fmt(v['slope'] * 255, 3, True)} {fmt_interval([x * 255 for x in v['ci95']], 3)}", fmt_p(v["p"]),
                  fmt_p(v["p_holm"]), v["n"]] for v in summary["mechanism"].values()]), "",
         "## Figures", ""]
    for key, path in figures.items():
        L.append(f"![{key}]({relative_path(path, report_dir)})")
    L += ["", "Per-model values: `models.csv`; per-image records: `records.csv` (model, image, attack, eps or "
          "round, output, changed, BERTScore F1 vs the clean output, attack loss); treatment check: "
          "`treatment.csv`; bases: `bases.csv`; machine-readable: `summary.json`.", ""]
    return "\n".join(L)
