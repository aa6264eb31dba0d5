"""The mechanism design's attacks on one model, with per-image records.

On the same held-out images for every model, greedy decoding, "changed" meaning the output differs
from the model's clean output after the exact-match normalisation:

- ``bim``: the paper's BIM (eps 0.5 / alpha 0.01 in normalised space, valid-range clamp, one signed
  step per round, ``bim_rounds`` rounds), ascending the teacher-forced CE of the clean caption;
- ``apgd-ce``: APGD (AutoAttack's APGD-CE schedule, ``apgd_steps`` steps) at ``eps`` in [0, 1] pixel
  space on the same CE;
- ``apgd-margin``: the adaptive attack, APGD at ``eps`` on :class:`TeacherForcedMargin`, a CW-style
  margin of the clean caption's tokens that does not pass through the softmax PRSL reshapes;
- ``bisect-margin``: per image, the smallest eps at which the caption changes under the margin
  objective (``bisect_steps`` PGD steps from a random start per probe): first a probe at ``eps_max``
  (an image unchanged there is censored at ``eps_max``), then ``bisect_probes`` bisections of
  [``eps_min``, ``eps_max``] at the geometric midpoint (the relative resolution is the same at every
  eps); the result is the smallest probed eps that changed the caption.
"""

from __future__ import annotations

import torch

from .attack import TeacherForcedCE
from .attack_steps import bim_step


class TeacherForcedMargin(TeacherForcedCE):
    """Per sample, ``logsumexp_t (max_{j != s_t} z_tj - z_ts_t)`` over the clean caption's tokens: a smooth
    maximum over positions of the CW margin (positive where a token is already flipped), so the
    attack spends its budget on the token easiest to flip, in logits rather than probabilities."""

    def per_sample(self, x):
        from ..spec import IGNORE_INDEX

        logits = self.bundle.model(**self.bundle.image_inputs(self.to_model(x)), **self.text).logits
        z, targets = self.bundle.align(logits, self.labels)
        z = z.float()
        mask = targets != IGNORE_INDEX
        t = targets.clamp_min(0).unsqueeze(-1)
        zs = z.gather(-1, t).squeeze(-1)
        other = z.scatter(-1, t, float("-inf")).amax(-1)
        return torch.logsumexp((other - zs).masked_fill(~mask, float("-inf")), dim=1)


def _normalised(texts):
    from .data import normalize_text

    return [normalize_text(t) for t in texts]


def pgd_per_image(loss_fn, x0, eps, steps, generators):
    """L-inf PGD in [0, 1] pixels with a radius per image (``eps``: (B,)): a uniform random start
    (one generator per image), ``steps`` signed steps of 2.5 eps / steps, projection onto the ball and
    [0, 1]; returns each image's highest-loss point among the iterates."""
    e = eps.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    lo, hi = (x0 - e).clamp_min(0.0), (x0 + e).clamp_max(1.0)
    noise = torch.cat([torch.rand(x0[:1].shape, generator=g, dtype=x0.dtype) for g in generators])
    x = torch.minimum(torch.maximum(x0 + e * (2 * noise - 1), lo), hi)
    best, best_loss = x, torch.full((x0.shape[0],), float("-inf"))
    alpha = 2.5 * e / max(steps, 1)
    for i in range(steps + 1):
        x = x.detach().requires_grad_(i < steps)
        with torch.set_grad_enabled(i < steps):
            loss = loss_fn(x)
            grad = torch.autograd.grad(loss.sum(), x)[0] if i < steps else None
        with torch.no_grad():
            better = loss.detach() > best_loss
            best_loss = torch.where(better, loss.detach(), best_loss)
            best = torch.where(better.view(-1, *([1] * (x0.dim() - 1))), x.detach(), best)
            if grad is not None:
                x = torch.minimum(torch.maximum(x + alpha * grad.sign(), lo), hi)
    return best.detach(), best_loss


class _Model:
    """One model under attack: pixels in [0, 1], its clean outputs, generation and the two objectives."""

    def __init__(self, model_dir, items, cfg):
        from .checkpoints import load_bundle

        self.bundle = bundle = load_bundle(model_dir)
        bundle.model.eval()
        for p in bundle.model.parameters():
            p.requires_grad_(False)
        self.cfg, self.items = cfg, items
        self.mean, self.std = bundle.image_mean, bundle.image_std
        self.x0 = (bundle.pixel_values([it.image for it in items]) * self.std + self.mean).clamp(0, 1)
        self.clean = self.generate(self.x0)

    def to_model(self, x):
        return (x - self.mean) / self.std

    def generate(self, x):
        outs, bs = [], self.cfg["batch_size"]
        for i in range(0, len(x), bs):
            outs += self.bundle.generate(self.to_model(x[i:i + bs]), None, max_new_tokens=self.cfg["max_new_tokens"],
                                         num_beams=1)
        return outs

    def objective(self, kind, sl, to_model=None):
        cls = TeacherForcedMargin if kind == "margin" else TeacherForcedCE
        return cls(self.bundle, [""] * len(self.items[sl]), self.clean[sl], to_model or self.to_model, "cpu")

    def changed(self, outputs, sl=slice(None)):
        return [a != b for a, b in zip(_normalised(outputs), _normalised(self.clean[sl]))]


def attack_model(model_dir, items, cfg, name, scorer=None):
    """Every attack on one model. Returns ``{"records": [...], "summary": {...}}``; a record is one image
    under one attack at one eps (or round): model, image, attack, eps, round, output, changed,
    bertscore_f1 vs the clean output (BIM and the 4/255 attacks), attack loss."""
    from .attack_steps import apgd, random_start
    from . import study_jobs

    scorer = scorer or study_jobs.scorer()
    m = _Model(model_dir, items, cfg)
    n, bs, records = len(items), cfg["batch_size"], []

    def bert(outputs):
        _, per = scorer.score(outputs, [[c] for c in m.clean])
        return [p["bertscore_f1"] for p in per]

    def add(attack, outputs, losses, *, eps=None, rnd=None, scores=None):
        ch = m.changed(outputs)
        for i, it in enumerate(items):
            records.append({"model": name, "image": it.id, "attack": attack, "eps": eps, "round": rnd,
                            "output": outputs[i], "changed": bool(ch[i]),
                            "bertscore_f1": None if scores is None else float(scores[i]),
                            "attack_loss": float(losses[i])})
        return ch

    add("clean", m.clean, [0.0] * n, eps=0.0, rnd=0)

    # BIM, the paper's: normalised space
    lo, hi = m.bundle.pixel_range()
    xn0 = m.to_model(m.x0)
    x = xn0.clone()
    bim_bert = []
    for rnd in range(1, cfg["bim_rounds"] + 1):
        new, losses = [], []
        for i in range(0, n, bs):
            sl = slice(i, i + bs)
            ce = m.objective("ce", sl, to_model=lambda z: z)
            xb = x[sl].detach().requires_grad_(True)
            (g,) = torch.autograd.grad(ce(xb), xb)
            xb = bim_step(xb.detach(), xn0[sl], g, 0.5, 0.01, (lo, hi))
            with torch.no_grad():
                losses += ce.per_sample(xb).tolist()
            new.append(xb)
        x = torch.cat(new)
        outs = []
        for i in range(0, n, bs):
            outs += m.bundle.generate(x[i:i + bs], None, max_new_tokens=cfg["max_new_tokens"], num_beams=1)
        scores = bert(outs)
        bim_bert.append(float(sum(scores) / n))
        bim_changed = add("bim", outs, losses, eps=0.5, rnd=rnd, scores=scores)

    # APGD at eps, on CE and on the margin: random start per image (seed 0), as the dose design
    eps = cfg["eps"]
    share = {}
    for kind in ("ce", "margin"):
        pts, losses = [], []
        for i in range(0, n, bs):
            sl = slice(i, i + bs)
            obj = m.objective(kind, sl)
            start = torch.cat([random_start(m.x0[j:j + 1], eps, "apgd",
                                            generator=torch.Generator().manual_seed(j * 1_000_003))
                               for j in range(i, min(i + bs, n))])
            xb = apgd(obj.per_sample, m.x0[sl], eps, cfg["apgd_steps"], random_start=False, start=start)
            with torch.no_grad():
                losses += obj.per_sample(xb).tolist()
            pts.append(xb)
        outs = m.generate(torch.cat(pts))
        scores = bert(outs)
        ch = add(f"apgd-{kind}", outs, losses, eps=eps, rnd=1, scores=scores)
        share[kind] = (float(sum(ch) / n), float(sum(scores) / n))

    # Bisection of the smallest eps that changes the caption, margin objective
    eps_max = cfg["eps_max"]
    lo_e = torch.full((n,), cfg["eps_min"], dtype=torch.float64)
    hi_e = torch.full((n,), eps_max, dtype=torch.float64)
    censored = None
    for probe in range(cfg["bisect_probes"] + 1):
        e = (hi_e.clone() if probe == 0 else (lo_e * hi_e).sqrt()).float()
        pts, losses = [], []
        for i in range(0, n, bs):
            sl = slice(i, i + bs)
            gens = [torch.Generator().manual_seed(7919 * j + probe) for j in range(i, min(i + bs, n))]
            xb, lb = pgd_per_image(m.objective("margin", sl).per_sample, m.x0[sl], e[sl], cfg["bisect_steps"], gens)
            pts.append(xb)
            losses += lb.tolist()
        outs = m.generate(torch.cat(pts))
        ch = torch.tensor(m.changed(outs))
        for i, it in enumerate(items):
            records.append({"model": name, "image": it.id, "attack": "bisect-margin", "eps": float(e[i]),
                            "round": probe, "output": outs[i], "changed": bool(ch[i]), "bertscore_f1": None,
                            "attack_loss": float(losses[i])})
        if probe == 0:
            censored = ~ch  # unchanged at eps_max: min eps censored there
        else:
            hi_e = torch.where(ch, e.double(), hi_e)
            lo_e = torch.where(ch, lo_e, e.double())
    min_eps = torch.where(censored, torch.full((n,), eps_max, dtype=torch.float64), hi_e)
    for i, it in enumerate(items):
        records.append({"model": name, "image": it.id, "attack": "min-eps-margin", "eps": float(min_eps[i]),
                        "round": None, "output": "", "changed": not bool(censored[i]), "bertscore_f1": None,
                        "attack_loss": float("nan")})
    summary = {"n_images": n, "clean": m.clean,
               "bim_bertscore_by_round": bim_bert, "bim_endpoint": float(sum(bim_bert) / len(bim_bert)),
               "bim_changed_last_round": float(sum(bim_changed) / n),
               "apgd_ce_changed": share["ce"][0], "apgd_ce_bertscore": share["ce"][1],
               "apgd_margin_changed": share["margin"][0], "apgd_margin_bertscore": share["margin"][1],
               "margin_min_eps_mean": float(min_eps.mean()), "margin_min_eps_median": float(min_eps.median()),
               "margin_min_eps": [float(v) for v in min_eps], "margin_censored": float(censored.float().mean())}
    return {"records": records, "summary": summary}
