"""Thin drivers: fine-tuning, attacks, metrics, reports, the demo and the study."""

import os

import torch

# transformers' Trainer imports DeepSpeed where it is installed (a test extra), and DeepSpeed then
# warns on every CPU-only run that it "was unable to detect" an accelerator. Where there is no GPU
# the CPU is the answer: say so, unless the user chose.
if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"
