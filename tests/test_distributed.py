"""apply_prsl under torchrun (2 ranks, gloo, CPU): DDP, FSDP2 (the head in the root unit and as its
own unit, with and without reshard_after_forward), DeepSpeed ZeRO-3; the loss and every gradient
against one process on the whole batch (tests/distributed_prsl.py runs the cases)."""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).with_name("distributed_prsl.py")
# float64 cases: 1e-9. ZeRO-3 runs in float32 (zero.Init refuses float64 parameters) against one float32
# process: the two ranks' halves, the fused chunked kernel and the reference sum in different orders, each
# float32 sum off by a few units of 6e-8 relative; through the tiny models that measured up to 1.1e-6 (a
# PaliGemma 2 layer-norm bias; 6e-7 on Llama). 1e-5 leaves 10x margin over that and is still ~1000x below
# what a real fault shows (a token counted twice or dropped moves the loss by several percent here).
TOLERANCE = {"zero3": 1e-5}


def test_distributed_gradients_equal_one_process():
    sys.path.insert(0, str(SCRIPT.parent))
    from distributed_prsl import CASES

    cases = [c for c in CASES if not c.startswith("zero3") or importlib.util.find_spec("deepspeed") is not None]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join([str(SCRIPT.parents[1]), str(SCRIPT.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(SCRIPT), *cases],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = dict(re.findall(r"^CASE (\S+) ok (\S+)$", proc.stdout, re.M))
    assert sorted(results) == sorted(cases), proc.stdout
    for case, error in results.items():
        assert float(error) <= TOLERANCE.get(case.partition("@")[0], 1e-9), (case, error)
