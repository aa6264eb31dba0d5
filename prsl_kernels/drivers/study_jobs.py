"""What every design of ``prsl-study`` runs: the worker set-up, training a model (skipped when its
folder already holds the same finished run), a model's clean quality on the gate split, and the
study's wall-time ledger. ``study.py`` (the dispatcher and the default and dose designs) and
``study_mechanism.py`` build on these.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

#: Marks a model that prsl-study trained itself (so its time is in the study's wall time).
TRAINED_HERE = "study_trained.json"


_SCORER = None


def worker_init():
    """One thread and no transformers progress bars or info logs: the set-up of a study worker
    (the studies are sized for one core per worker)."""
    import torch

    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def scorer():
    """The worker's CaptionScorer, built once (its models and METEOR's JVM load slowly)."""
    global _SCORER
    if _SCORER is None:
        from .metrics import CaptionScorer

        _SCORER = CaptionScorer(device="cpu")
    return _SCORER


def _same_config(info, cfg):
    from .finetune import recorded_config

    ignore = {"output_dir", "progress", "resume", "stop_at_step"}
    want = json.loads(json.dumps(recorded_config(cfg)))
    have = info.get("config", {})
    return all(have.get(k) == v for k, v in want.items() if k not in ignore)


def train_model(cfg):
    """Train ``cfg`` unless its folder already holds the finished run of the same config."""
    from . import finetune
    from .checkpoints import read_run_info

    out = Path(cfg.output_dir)
    info = read_run_info(out)
    if info.get("completed") and _same_config(info, cfg):
        return info, True
    if out.exists():
        shutil.rmtree(out)  # an interrupted or different run: start this model again
    finetune.train(dataclasses.replace(cfg, progress=False))
    (out / TRAINED_HERE).write_text("{}")  # the study timed this training (see add_wall_time)
    return read_run_info(out), False


def clean_quality(model_dir, samples):
    """Exact match and the shape / colour / size accuracies of greedy captions on ``samples``."""
    from .checkpoints import load_bundle
    from .data import caption_examples, normalize_text
    from .finetune import evaluate

    bundle = load_bundle(model_dir)
    examples = caption_examples(samples, all_references=False)
    res = evaluate(bundle, examples, task="caption", batch_size=100)
    hits = {"shape": 0, "colour": 0, "size": 0}
    for s, out in zip(samples, res["outputs"]):
        words = set(normalize_text(out).split())
        obj = s.meta["objects"][0]
        for attr in hits:
            hits[attr] += obj[attr] in words
    n = max(len(samples), 1)
    return {"exact_match": res["exact_match"], "n": res["n"], **{a: h / n for a, h in hits.items()}}


def add_wall_time(out, seconds, worked):
    """Seconds spent on this study over the invocations that trained, measured or attacked
    anything (a resumed study adds up; a rerun that only rebuilds the report does not count)."""
    path = out / "wall_time.json"
    total = (json.loads(path.read_text())["seconds"] if path.is_file() else 0.0) + (seconds if worked else 0.0)
    path.write_text(json.dumps({"seconds": total}))
    return total


__all__ = ["TRAINED_HERE", "worker_init", "scorer", "train_model", "clean_quality", "add_wall_time"]
