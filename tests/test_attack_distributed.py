"""``prsl-attack`` over several processes: the images split over the ranks, each attacked once,
resumed per image, merged by rank 0 into the files and scores of a single-process run. One
in-process test simulates the ranks (no process group) to check the split, the per-image resume
and the merge; one runs the CLI alone and under ``torchrun --nproc_per_node 2`` and compares them
(and prints both wall times). ~30-40 s on 2 busy cores, most of it the two CLI runs' start-up."""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("transformers")

from prsl_kernels.drivers import data, models  # noqa: E402
from prsl_kernels.drivers.attack import AttackConfig, ModelAttack, attack_items  # noqa: E402
from prsl_kernels.drivers.distributed import World  # noqa: E402

SIZE = models.TinySize(hidden=32, encoder_layers=1, decoder_layers=1, heads=2, patch=8, image_size=32, max_text=40)
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle():
    texts = [c for s in data.synthetic_dataset(60, seed=1, image_size=32) for c in s.captions]
    bundle = models.tiny_bundle("tiny-vit-gpt2", texts, size=SIZE, seed=0, vocab_size=300)
    # The random tiny model says the same (empty) text for every image, which would make equal
    # outputs a vacuous check; with every weight 4.5x larger its outputs vary (11 distinct of 16).
    with torch.no_grad():
        for p in bundle.model.parameters():
            p.mul_(4.5)
    return bundle


def records(folder):
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


def assert_same_run(one, many):
    """Same ids, rounds, outputs and per-sample scores; losses to float noise (other batches)."""
    a, b = records(one), records(many)
    assert [(r["id"], r["round"]) for r in a] == [(r["id"], r["round"]) for r in b]
    assert len({r["output"] for r in a}) > 2
    for ra, rb in zip(a, b):
        assert ra["output"] == rb["output"], (ra, rb)
        assert ra["scores"] == rb["scores"]
        assert ra["attack_loss"] == pytest.approx(rb["attack_loss"], rel=1e-4, abs=1e-6)
    for path in sorted((one / "rounds").glob("round_*.json")):
        sa, sb = json.loads(path.read_text()), json.loads((many / "rounds" / path.name).read_text())
        assert sa["corpus"] == sb["corpus"] and sa["n"] == sb["n"]
        assert sa["attack_loss"] == pytest.approx(sb["attack_loss"], rel=1e-4)
    xa = torch.load(one / "state.pt", weights_only=True)
    xb = torch.load(many / "state.pt", weights_only=True)
    assert xa["round"] == xb["round"] and xa["clean"] == xb["clean"]
    assert torch.allclose(xa["x"], xb["x"], atol=1e-5)


@pytest.mark.usefixtures("one_torch_thread")
def test_ranks_split_resume_per_image_and_merge_like_one_process(bundle, tmp_path):
    from prsl_kernels.drivers.metrics import CaptionScorer

    items = attack_items(data.synthetic_dataset(5, seed=3, split="eval", image_size=32), "caption")
    # pgd: the random starts are seeded per image, so they must follow an image to whichever rank has it.
    cfg = AttackConfig(attack="pgd", rounds=2, steps_per_round=2, eps=0.05, max_new_tokens=5, batch_size=2)
    with CaptionScorer(metrics=["exact_match"]) as scorer:
        ModelAttack(bundle, items, tmp_path / "one", cfg, scorer, progress=False).run()

        def attack():
            return ModelAttack(bundle, items, tmp_path / "many", cfg, scorer, progress=False)

        # Rank 1 of 2 attacks items 1 and 3 and leaves them in a partial; it never merges.
        first = attack()
        assert first.run_sharded(World(rank=1, size=2)) is None
        assert first.attacked == [items[1].id, items[3].id]
        assert not (tmp_path / "many" / "samples.jsonl").exists()
        # A single process takes over: it skips 1 and 3, and is stopped after one batch (0, 2).
        second = attack()
        assert second.run_sharded(World(), stop_after_batches=1) is None
        assert second.attacked == [items[0].id, items[2].id]
        # Resumed: only item 4 is left; then the merge.
        third = attack()
        third.run_sharded(World())
        assert third.attacked == [items[4].id]
    assert not (tmp_path / "many" / "partial").exists()
    assert_same_run(tmp_path / "one", tmp_path / "many")
    # The merged folder is an ordinary finished run: a plain rerun has nothing left to do.
    again = attack()
    again.run_sharded(World())
    assert again.attacked == []


def test_worst_case_refused_over_processes(bundle, tmp_path):
    items = attack_items(data.synthetic_dataset(2, seed=3, split="eval", image_size=32), "caption")
    attack = ModelAttack(bundle, items, tmp_path / "w", AttackConfig(worst_case=True, rounds=1), None,
                         progress=False)
    with pytest.raises(ValueError, match="one process"):
        attack.run_sharded(World(rank=0, size=2))


def _cli(prefix, out, ckpt, n_images, **env):
    args = ["-m", "prsl_kernels.drivers.attack", "--model", str(ckpt), "--task", "caption", "--data", "synthetic",
            "--num-samples", str(n_images), "--attack", "pgd", "--eps", "0.05", "--steps", "3", "--rounds", "2",
            "--max-new-tokens", "5", "--batch-size", "4", "--metrics", "exact_match", "cider",
            "--output-dir", str(out), "--no-report"]
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *prefix, *args], capture_output=True, text=True, env=env, timeout=240)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return wall, proc


def test_torchrun_two_processes_equal_one(bundle, tmp_path):
    ckpt = tmp_path / "ckpt"
    bundle.save(ckpt)
    n = 24
    # One thread, as each of the two processes gets on 2 cores: the fair baseline (on a busy 2-core
    # machine the default two threads make the tiny model several times slower, not faster).
    one_s, _ = _cli([], tmp_path / "one", ckpt, n, OMP_NUM_THREADS="1")
    two_s, proc = _cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], tmp_path / "two",
                       ckpt, n)
    print(f"\nprsl-attack on {n} images: 1 process (1 thread) {one_s:.1f} s, torchrun 2 processes {two_s:.1f} s "
          f"({two_s / one_s:.2f}x)")
    assert proc.stdout.count("results in") == 1           # rank 0 alone reports
    assert_same_run(tmp_path / "one" / "ckpt", tmp_path / "two" / "ckpt")
    assert (tmp_path / "two" / "ckpt" / "grid.npz").is_file()
