"""Vocab-parallel PRSL (prsl_kernels/vocab_parallel.py) under torchrun with gloo on CPU, at 2 and 4 ranks.

tests/vocab_parallel_worker.py runs every case in one launch per world size: DTensor logits
(Shard(-1)) through prsl_loss, local shards through vocab_parallel_prsl_loss (uneven, one empty),
a vocab-sharded head through linear_prsl_loss and vocab_parallel_linear_prsl_loss, apply_prsl on a
Llama whose lm_head is ColwiseParallel (fused and unfused), and at 4 ranks FSDP2 + TP on a 2 x 2
mesh. Each holds the loss, the row statistics and every gradient to one process on the whole
logits (reference backend) in float64.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

SCRIPT = pathlib.Path(__file__).with_name("vocab_parallel_worker.py")
# float64 (but one case): the shards' sums reach the same values as one process's in another order,
# a few units of 1e-16 relative (measured <= 8e-16); a wrong tie count, a lost shard or a
# double-counted target moves them by far more than 1e-9.
TOLERANCE = 1e-9
# bf16 logits: both sides compute in float32 and round the gradient to bf16 once: one bf16 unit
# (2^-8 of a value near the largest) apart at most, as the fused C++ kernel is from the reference.
TOLERANCES = {"bf16-options": 1e-2}


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_equals_one_process(world):
    sys.path.insert(0, str(SCRIPT.parent))
    from vocab_parallel_worker import CASES, ONLY_AT

    cases = [name for name in CASES if ONLY_AT.get(name, world) == world]
    path = [str(SCRIPT.parents[1]), str(SCRIPT.parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                           "--standalone", str(SCRIPT), *cases],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = dict(re.findall(r"^CASE (\S+) ok (\S+)$", proc.stdout, re.M))
    assert sorted(results) == sorted(cases), proc.stdout
    for case, error in results.items():
        assert float(error) <= TOLERANCES.get(case, TOLERANCE), (case, error)


def test_local_shards_need_a_process_group():
    from prsl_kernels import vocab_parallel_prsl_loss

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="process group"):
        vocab_parallel_prsl_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 1, 0.5, vocab_start=0)
