"""Randomised: every backend against the float64 oracle (tests/float64_oracle.py).

Each case draws a batch (N rows of V logits in one dtype), k in [0, V-1], b of either
sign, a reduction and, for "mean" / "sum", whether the gradient overwrites the logits
(``inplace_backward``), then compares the loss and the gradient of
``prsl_loss(...).backward(upstream)`` on the ``reference`` (PyTorch, float32), ``cpp``
and ``triton`` (Triton's CPU interpreter, tests/conftest.py) backends with the float64
oracle on the same logit values, to what float32 arithmetic can resolve.

The draws aim at edges: V = 1..5, the 16-byte vector width, the tiles and blocks of
the Triton kernels (also shrunk with triton_kernels.block_width, so that short rows stream several
tiles), long rows on C++; k = 0, 1, V - 1; exact ties (integer logits), 16-bit rounding
ties, constant rows, huge magnitudes; -inf masks (fewer than k finite logits too,
now and then the target itself); targets at the row ends and at the extremes; ignored
rows; padded row strides; an upstream gradient of exactly 1 (the forward's gradient
handed over unscaled) or not.

Budget: ``CASES`` per backend (about a minute for the file on 2 cores). Longer runs:
``PRSL_RANDOM_CASES=N`` (cases per backend) and ``PRSL_RANDOM_SEED=S`` (another
stream); a failure names its case index, which replays alone with
``PRSL_RANDOM_ONLY=i``. Run with ``-s`` to see the case count and the worst error
(as a fraction of its tolerance) per backend.
"""

import math
import os
import random

import pytest
import torch

from conftest import needs_interpreter
from float64_oracle import Oracle, row_weights, run_backend, worst_ratio
from prsl_kernels import cpp_kernels
from prsl_kernels import triton_kernels as tk

CASES = {"reference": 40, "cpp": 160, "triton": 40}
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
VEC = {torch.float16: 8, torch.bfloat16: 8, torch.float32: 4, torch.float64: 2}
# Row lengths at the Triton kernels' edges: one tile vs two (pow2 tiles up to 2048 in the
# backward, 4096 in the two-pass forward), the exact kernel's 1024-wide blocks.
TILE_EDGES = (15, 16, 17, 31, 32, 33, 255, 256, 257, 1023, 1024, 1025, 2047, 2048, 2049, 4095, 4096, 4097)
# The interpreter's cost grows with the row; C++ takes long rows.
MAX_VOCAB = {"reference": 6000, "cpp": 60000, "triton": 4200}


def _vocab(rng, backend, dtype):
    draw = rng.random()
    if draw < 0.25:
        return rng.randint(1, 5)
    if draw < 0.35:
        vec = VEC[dtype]
        return rng.choice((vec - 1, vec, vec + 1, 2 * vec - 1, 2 * vec + 1))
    if draw < 0.6:
        return rng.choice([v for v in TILE_EDGES if v <= MAX_VOCAB[backend]])
    return min(MAX_VOCAB[backend], int(math.exp(rng.uniform(math.log(2), math.log(MAX_VOCAB[backend])))))


def _k(rng, vocab, backend):
    top = vocab - 1
    if backend == "triton":
        top = min(top, 300)  # the exact kernel's large buffers crawl in the interpreter
    draw = rng.random()
    if draw < 0.15 or top == 0:
        return 0
    if draw < 0.3:
        return top
    if draw < 0.4:
        return 1
    if draw < 0.85:
        return rng.randint(0, min(top, 130))
    return rng.randint(0, top)


def _logits(rng, gen, n, vocab, dtype):
    """One batch: rows of a randomly drawn kind each, in float64 before the cast."""
    rows = []
    big = 3e4 if dtype == torch.float16 else 1e5
    for _ in range(n):
        kind = rng.choice(("normal", "normal", "integer", "rounded", "constant", "huge", "tiny", "spiky"))
        if kind == "normal":
            row = torch.randn(vocab, generator=gen, dtype=torch.float64) * rng.choice((0.5, 2.0, 8.0))
        elif kind == "integer":  # exact ties everywhere
            row = torch.randint(-3, 4, (vocab,), generator=gen).double()
        elif kind == "rounded":  # continuous values rounded to 8 bits: ties near the top
            row = (torch.randn(vocab, generator=gen, dtype=torch.float64) * 4).to(torch.bfloat16).double()
        elif kind == "constant":
            row = torch.full((vocab,), rng.uniform(-5, 5), dtype=torch.float64)
        elif kind == "huge":
            row = torch.randn(vocab, generator=gen, dtype=torch.float64) * big / 4
            row = row.clamp(-big, big)
        elif kind == "tiny":
            row = torch.randn(vocab, generator=gen, dtype=torch.float64) * 1e-4
        else:  # a few large logits above a flat floor
            row = torch.randn(vocab, generator=gen, dtype=torch.float64) * 0.1
            hits = torch.randint(0, vocab, (max(1, vocab // 50),), generator=gen)
            row[hits] += rng.uniform(5, 30)
        mask = rng.random()
        if mask < 0.15 and vocab > 1:
            row[torch.rand(vocab, generator=gen) < rng.uniform(0.1, 0.95)] = -math.inf
        elif mask < 0.2 and vocab > 1:
            row[rng.randint(0, vocab - 1):] = -math.inf  # a masked tail
        rows.append(row)
    return torch.stack(rows).to(dtype)


def _targets(rng, gen, logits, ignore_index):
    n, vocab = logits.shape
    target = torch.randint(0, vocab, (n,), generator=gen)
    values = logits.double()
    for r in range(n):
        draw = rng.random()
        if draw < 0.15:
            target[r] = 0
        elif draw < 0.3:
            target[r] = vocab - 1
        elif draw < 0.4:
            target[r] = int(values[r].argmax())
        elif draw < 0.5:
            target[r] = ignore_index
        # Every row keeps a finite logit (an all -inf row has no lse); a -inf target (loss +inf)
        # now and then, otherwise the target logit is finite.
        finite = torch.isfinite(values[r]).nonzero().flatten()
        if len(finite) == 0:
            logits[r, rng.randrange(vocab)] = 0.0
            finite = torch.isfinite(logits[r].double()).nonzero().flatten()
        if target[r] != ignore_index and not math.isfinite(float(logits[r, target[r]])) and rng.random() < 0.8:
            target[r] = int(finite[rng.randrange(len(finite))])
    if (target == ignore_index).all():  # keep one counted row (an all-ignored mean is NaN)
        target[0] = 1 if ignore_index == 0 else 0
        if not math.isfinite(float(logits[0, target[0]])):
            logits[0, target[0]] = 0.0
    return target


def _layout(rng, logits):
    """The logits as drawn, or in rows padded by 1-3 elements (row starts off 16 bytes)."""
    if rng.random() < 0.3:
        n, vocab = logits.shape
        padded = torch.empty_strided((n, vocab), (vocab + rng.randint(1, 3), 1), dtype=logits.dtype)
        padded.copy_(logits)
        return padded
    return logits


def make_case(index, backend, seed):
    rng = random.Random(f"{seed}/{backend}/{index}")
    gen = torch.Generator().manual_seed(rng.getrandbits(63))
    dtype = rng.choice(DTYPES)
    vocab = _vocab(rng, backend, dtype)
    n = rng.randint(1, 6 if backend == "triton" else 12)
    if vocab > 20000:
        n = min(n, 4)
    k = _k(rng, vocab, backend)
    b = rng.choice((0.5, -0.3, 1.0, 2.5, -1e-3, 0.0, 1e-5))
    reduction = rng.choice(("none", "mean", "sum"))
    inplace = reduction != "none" and rng.random() < 0.5
    ignore_index = -100 if rng.random() < 0.8 or vocab == 1 else rng.randint(0, vocab - 1)
    logits = _logits(rng, gen, n, vocab, dtype)
    target = _targets(rng, gen, logits, ignore_index)
    logits = _layout(rng, logits)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if reduction == "none":
        upstream = torch.randn(n, generator=gen, dtype=acc)
    else:
        upstream = torch.tensor(1.0 if rng.random() < 0.5 else rng.uniform(-3, 3), dtype=acc)
    block = rng.choice((None, None, 64, 128, 256)) if backend == "triton" else None
    return dict(dtype=dtype, vocab=vocab, n=n, k=k, b=b, reduction=reduction, inplace=inplace,
                ignore_index=ignore_index, logits=logits, target=target, upstream=upstream, block=block)


def check_case(case, backend):
    """(loss ratio, grad ratio, (stats ratio, column)): the worst errors as fractions of their tolerances."""
    logits, target = case["logits"], case["target"]
    oracle = Oracle(logits, target, case["k"], case["b"], case["ignore_index"])
    loss, grad, stats = run_backend(backend, logits, target, case["k"], case["b"], case["reduction"],
                                    case["upstream"], inplace=case["inplace"], ignore_index=case["ignore_index"],
                                    with_stats=True)
    want_loss, loss_tol = oracle.loss(case["reduction"])
    # mean / sum: the forward's gradient (already rounded) is scaled by the upstream in the backward.
    rescale = 1.0 if case["reduction"] == "none" else float(case["upstream"])
    want_grad, grad_tol = oracle.grad(row_weights(case["reduction"], case["upstream"], target, case["ignore_index"]),
                                      rescale)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    return worst_ratio(loss, want_loss, loss_tol)[0], worst_ratio(grad, want_grad, grad_tol), oracle.stats(stats)


def _describe(index, case):
    skip = ("logits", "target", "upstream")
    return f"case {index}: " + ", ".join(f"{key}={value}" for key, value in case.items() if key not in skip)


BACKENDS = ["reference", pytest.param("cpp", marks=pytest.mark.skipif(
    not cpp_kernels.available(), reason="C++ extension unavailable")),
            pytest.param("triton", marks=needs_interpreter)]  # CPU tensors: the interpreter


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_cases_match_the_float64_oracle(backend):
    seed = int(os.environ.get("PRSL_RANDOM_SEED", "0"))
    count = int(os.environ.get("PRSL_RANDOM_CASES", CASES[backend]))
    only = os.environ.get("PRSL_RANDOM_ONLY")
    indices = [int(only)] if only is not None else range(count)
    worst_loss = worst_grad = worst_stats = (0.0, None)
    failures = []
    for index in indices:
        case = make_case(index, backend, seed)
        with tk.block_width(case["block"]):
            loss_ratio, (grad_ratio, at), (stats_ratio, column) = check_case(case, backend)
        worst_loss = max(worst_loss, (loss_ratio, index), key=lambda x: x[0])
        worst_grad = max(worst_grad, (grad_ratio, index), key=lambda x: x[0])
        worst_stats = max(worst_stats, (stats_ratio, f"{column}, case {index}"), key=lambda x: x[0])
        if not (loss_ratio <= 1 and grad_ratio <= 1 and stats_ratio <= 1):
            row, col = divmod(at, case["vocab"])
            failures.append(f"{_describe(index, case)}: loss error {loss_ratio:.3g} x tol, gradient error "
                            f"{grad_ratio:.3g} x tol at row {row}, column {col}, row stats error "
                            f"{stats_ratio:.3g} x tol ({column})")
    print(f"\n{backend}: {len(indices)} cases (seed {seed}); worst loss error {worst_loss[0]:.3g} x tol "
          f"(case {worst_loss[1]}), worst gradient error {worst_grad[0]:.3g} x tol (case {worst_grad[1]}), "
          f"worst row-stats error {worst_stats[0]:.3g} x tol ({worst_stats[1]})")
    assert not failures, "\n".join(failures[:10])
