"""What the drivers' command-line entry points share (``prsl-finetune``, ``prsl-attack``,
``prsl-demo``, ``prsl-study``): the process set-up each ``main()`` does first, and ``--help``
with every default shown."""

from __future__ import annotations

import argparse
import os


def cpu_accelerator_without_gpu() -> None:
    """Tell DeepSpeed the CPU is its accelerator on a machine without a GPU, unless the user chose
    (``DS_ACCELERATOR`` set). transformers' Trainer imports DeepSpeed where it is installed (a test
    extra), and DeepSpeed then warns on every CPU-only run that it "was unable to detect" an
    accelerator. Call before anything imports DeepSpeed: it reads the variable once, on import."""
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def show_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``ArgumentDefaultsHelpFormatter`` prints a default only beside a help text: give every
    option one (its name in words), so ``--help`` shows every default."""
    for action in parser._actions:
        if not action.help and action.default is not argparse.SUPPRESS:
            action.help = action.dest.replace("_", " ")
    return parser


__all__ = ["cpu_accelerator_without_gpu", "show_defaults"]
