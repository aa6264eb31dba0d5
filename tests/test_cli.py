"""The drivers' entry points (``drivers/cli.py``): DeepSpeed's accelerator is chosen by each
``main()`` (not by importing the drivers), and ``--help`` shows every default."""

import importlib
import os

import pytest
import torch

from prsl_kernels.drivers import cli


@pytest.mark.parametrize("module", ["finetune", "attack", "demo", "study"])
def test_main_chooses_the_cpu_accelerator_without_a_gpu(module, monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    driver = importlib.import_module(f"prsl_kernels.drivers.{module}")
    assert "DS_ACCELERATOR" not in os.environ      # importing a driver changes no environment
    with pytest.raises(SystemExit):
        driver.main(["--help"])
    assert os.environ["DS_ACCELERATOR"] == "cpu"


def test_the_users_accelerator_is_kept(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cli.cpu_accelerator_without_gpu()
    assert os.environ["DS_ACCELERATOR"] == "cuda"


def test_show_defaults_gives_every_option_a_help_text():
    import argparse

    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--max-steps", type=int, default=7)
    assert "max steps (default: 7)" in cli.show_defaults(p).format_help()
