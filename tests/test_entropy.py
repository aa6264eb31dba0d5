"""RowStats.entropy (prsl_kernels/spec.py): -sum_j p_j log p_j of each row's (soft-capped) softmax,
computed in the forward's first pass of every backend (an online third sum beside max and sum-exp),
against float64 on fresh random data; and the logged mean entropy of the HF losses and the drivers.

Tolerance. Every backend accumulates in float32 (float64 for float64 logits). With m the row maximum,
H = log S - T / S and T / S = sum_j p_j (z_j - m): each exponent z_j - m is rounded to about
eps * scale (scale = max|z| + |lse| + 1), which moves each p_j by that much relative and each z_j - m
by that much absolute, so their p-weighted mean (at most H) moves by eps * scale * (1 + H); log S, a
sum of V positive terms, moves as the lse does (the float64 oracle's eps * log(V + 1)). SLACK (16)
covers the rounding steps the bound leaves implicit (a log, a division, the rescales when m grows).
The data are rounded to the tested dtype first and the float64 truth is taken on those same values.
"""

import math

import pytest
import torch

import reference as ref
from conftest import backend_device, needs_interpreter
from float64_oracle import SLACK, acc_eps
from prsl_kernels import cpp_kernels, linear_prsl_loss, prsl_loss
from prsl_kernels.spec import ENTROPY, NUM_ROW_STATS, ROW_STATS

V = 200


def entropy64(logits, target, softcap=None, ignore_index=-100):
    """Float64 truth: torch.special.entr of the float64 softmax (0 * log 0 = 0), 0 on ignored rows."""
    z = logits.detach().reshape(-1, logits.shape[-1]).double().cpu()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    h = torch.special.entr(torch.softmax(z, -1)).sum(-1)
    return torch.where(target.reshape(-1).cpu() != ignore_index, h, torch.zeros_like(h))


def tolerance(logits, want, softcap=None):
    z = logits.detach().reshape(-1, logits.shape[-1]).double().cpu()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    finite = torch.where(torch.isfinite(z), z.abs(), torch.zeros_like(z))
    lse = torch.logsumexp(z, -1)
    scale = finite.amax(-1) + torch.where(torch.isfinite(lse), lse.abs(), torch.zeros_like(lse)) + 1
    return SLACK * acc_eps(logits.dtype) * (scale * (1 + want.abs()) + math.log(z.shape[-1] + 1))


def batch(dtype, seed, vocab=V):
    """Rows whose maximum grows along the row (a ramp: the running maximum moves from tile to tile),
    half-masked rows (-inf logits, one with a single finite logit: H = 0), an ignored row, and
    integer rows (ties)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(7, vocab, generator=gen, dtype=torch.float64) * 3 + torch.linspace(-8, 8, vocab)
    z[1, : vocab // 2] = float("-inf")
    z[2, torch.arange(vocab) % 3 == 1] = float("-inf")
    z[3, 1:] = float("-inf")
    z[5] = torch.randint(-2, 3, (vocab,), generator=gen).double()
    z[6] = z[6].flip(0)  # maximum first: the later tiles are rescaled by nothing
    target = torch.randint(0, vocab, (7,), generator=gen)
    target[1], target[2], target[3] = vocab - 1, 0, 0
    target[4] = -100
    return z.to(dtype), target


def check(stats, logits, target, softcap=None):
    want = entropy64(logits, target, softcap)
    got = stats.entropy.double().cpu()
    tol = tolerance(logits, want, softcap)
    err = (got - want).abs()
    assert bool((err <= tol).all()), f"entropy {got} vs {want}: worst {float((err / tol).max()):.3g} x tol"
    assert got[4] == 0  # the ignored row
    return float((err / want.abs().clamp_min(1e-300))[want > 0].max())


def run(backend, logits, target, k, b, path, softcap):
    """The entropy of ``path``: "forward" (no gradient), "forward_grad" (mean: the gradient in the
    forward kernels) or "inplace" (the gradient written over the logits)."""
    device = backend_device(backend)
    x = logits.to(device)
    target = target.to(device)
    if path == "forward":
        with torch.no_grad():
            return prsl_loss(x, target, k, b, reduction="none", backend=backend, return_stats=True,
                             softcap=softcap)[1]
    leaf = x.clone().requires_grad_()
    if path == "inplace":
        x = leaf * 1  # a non-leaf the gradient may overwrite
    else:
        x = leaf
    loss, stats = prsl_loss(x, target, k, b, reduction="mean", backend=backend, return_stats=True,
                            softcap=softcap, inplace_backward=path == "inplace")
    loss.backward()
    return stats


DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def test_column_is_last_and_named():
    """Appended after ``correct``: the backward kernels' reads of the first five never moved."""
    assert ROW_STATS[-1] == "entropy" and ENTROPY == NUM_ROW_STATS - 1 == 6
    assert ROW_STATS[:6] == ("lse", "tau", "dist", "spread_sum", "tie_count", "correct")


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference(dtype, softcap):
    z, t = batch(dtype, 1)
    _, stats = ref.loss_rows_reference(z, t, 3, 0.5, softcap=softcap)
    from prsl_kernels.loss import RowStats

    check(RowStats(*stats), z, t, softcap)


@pytest.mark.skipif(not cpp_kernels.available(), reason="C++ extension unavailable")
@pytest.mark.parametrize("path", ["forward", "forward_grad", "inplace"])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp(dtype, softcap, path):
    for vocab in (V, 5000):  # 5000: many blocks, the running maximum moves often
        z, t = batch(dtype, 2, vocab)
        check(run("cpp", z, t, 4, 0.5, path, softcap), z, t, softcap)


# The Triton kernels in the interpreter (tiny rows), with tiles forced small so that a row streams
# through several of them: the two-pass kernel (k < 127, and k = 0 in one pass), the exact kernel
# (k >= 127; also the second launch for flagged rows), with and without the gradient in the forward.
TRITON_CASES = [
    pytest.param(torch.float32, None, 0, "forward", 16, id="f32-k0-forward-tile16"),
    pytest.param(torch.float32, 5.0, 3, "forward_grad", 16, id="f32-cap-k3-grad-tile16"),
    pytest.param(torch.bfloat16, None, 3, "inplace", 32, id="bf16-k3-inplace-tile32"),
    pytest.param(torch.float64, 5.0, 150, "forward", 64, id="f64-cap-k150-forward-block64"),
    pytest.param(torch.bfloat16, 5.0, 150, "forward_grad", 64, id="bf16-cap-k150-grad-block64"),
    pytest.param(torch.float32, None, 3, "forward", None, id="f32-k3-default-tile"),
]


@needs_interpreter
@pytest.mark.parametrize("dtype, softcap, k, path, tile", TRITON_CASES)
def test_triton(dtype, softcap, k, path, tile):
    from prsl_kernels import triton_kernels as tk

    z, t = batch(dtype, 3)
    with tk.block_width(tile):
        stats = run("triton", z, t, k, 0.5, path, softcap)
    check(stats, z, t, softcap)


def test_triton_torch_path_for_large_k():
    """k > MAX_K: the launcher's row statistics from torch ops (no kernel: runs anywhere)."""
    tk = pytest.importorskip("prsl_kernels.triton_kernels")
    for dtype in DTYPES:
        z, t = batch(dtype, 4)
        _, stats = tk._forward_torch(z, t, V - 1, 0.5, -100, (0.0, 0.0, 5.0))
        from prsl_kernels.loss import RowStats

        check(RowStats.from_columns(stats), z, t, 5.0)


BACKENDS = ["reference", pytest.param("cpp", marks=pytest.mark.skipif(not cpp_kernels.available(),
                                                                     reason="C++ extension unavailable")),
            pytest.param("triton", marks=needs_interpreter)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_non_finite_rows(backend):
    """NaN where the loss is NaN (a NaN or +inf logit; every logit -inf: p = 0 / 0), as lse; an
    ignored row is 0 whatever it holds (unlike ``correct``, which is a flag and 0 on NaN rows)."""
    z = torch.randn(5, 9, dtype=torch.float64)
    z[0, 3] = float("nan")
    z[1, 5] = float("inf")
    z[2] = float("-inf")
    z[3, 2] = float("nan")
    t = torch.tensor([0, 1, 2, -100, 4])
    with torch.no_grad():
        loss, stats = prsl_loss(z.to(backend_device(backend)), t.to(backend_device(backend)), 2, 0.5,
                                reduction="none", backend=backend, return_stats=True)
    h = stats.entropy.cpu()
    assert bool(torch.isnan(h[:3]).all()) and h[3] == 0, h
    assert bool(torch.isnan(loss[:3].cpu()).all())
    assert bool((stats.correct[:2].cpu() == 0).all())
    assert abs(float(h[4]) - float(entropy64(z[4:], t[4:])[0])) <= 1e-12


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=pytest.mark.skipif(
    not cpp_kernels.available(), reason="C++ extension unavailable"))])
def test_fused_linear(backend):
    """linear_prsl_loss concatenates its chunks' statistics: the entropy of hidden @ W^T + bias."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(11, 16, generator=gen)
    weight = torch.randn(300, 16, generator=gen)
    bias = torch.randn(300, generator=gen)
    t = torch.randint(0, 300, (11,), generator=gen)
    t[3] = -100
    _, stats = linear_prsl_loss(hidden, weight, t, 4, 0.5, bias=bias, backend=backend, chunk_size=4,
                                return_stats=True)
    logits = hidden.double() @ weight.double().T + bias.double()
    want = entropy64(logits, t)
    # The float32 matmul adds its own rounding, eps * sum_k |h_k w_k| per logit (<= 16 * 4 * 4 here),
    # to each z_j - m: the bound's scale, plus that.
    tol = tolerance(logits.float(), want) + SLACK * acc_eps(torch.float32) * 64 * (1 + want)
    assert bool(((stats.entropy.double() - want).abs() <= tol).all())
    assert stats.entropy[3] == 0


# ---------------------------------------------------------------- what the trainers log


def _mean_entropy64(logits, targets):
    """The mean float64 entropy over the counted tokens (the logged value's definition)."""
    h = entropy64(logits, targets)
    return float(h.sum() / (targets != -100).sum())


@pytest.mark.parametrize("k, b", [(4, 0.5), (0, 0.0)])  # PRSL (fused kernels) and the plain-CE path
def test_token_loss_logs_mean_entropy(k, b):
    """PRSLTokenLoss.pop_stats()["entropy"]: the mean over counted tokens of two calls, within the
    float32 bound above (summed over the tokens: the mean's error is at most the worst row's)."""
    from prsl_kernels.hf_losses import PRSLTokenLoss

    gen = torch.Generator().manual_seed(6)
    fn = PRSLTokenLoss(k, b, shift=False)
    calls = []
    for _ in range(2):
        logits = torch.randn(3, 5, 50, generator=gen) * 2
        labels = torch.randint(0, 50, (3, 5), generator=gen)
        labels[0, :2] = -100
        fn(logits, labels)
        calls.append((logits, labels))
    logits = torch.cat([c[0].reshape(-1, 50) for c in calls])
    labels = torch.cat([c[1].reshape(-1) for c in calls])
    want = _mean_entropy64(logits, labels)
    tol = float(tolerance(logits, entropy64(logits, labels)).max())
    stats = fn.pop_stats()
    assert abs(stats["entropy"] - want) <= tol, (stats["entropy"], want, tol)
    assert stats["tokens"] == int((labels != -100).sum())


def test_linear_token_loss_logs_mean_entropy():
    from prsl_kernels.hf_losses import PRSLLinearTokenLoss

    gen = torch.Generator().manual_seed(7)
    hidden, weight = torch.randn(2, 6, 8, generator=gen), torch.randn(40, 8, generator=gen)
    labels = torch.randint(0, 40, (2, 6), generator=gen)
    labels[1, 0] = -100
    fn = PRSLLinearTokenLoss(3, 0.5, shift=False)
    fn(hidden, weight, labels)
    logits = hidden.double() @ weight.double().T
    # As test_fused_linear: the float32 matmul's rounding on top of the bound.
    want = entropy64(logits, labels)
    tol = float((tolerance(logits.float(), want) + SLACK * acc_eps(torch.float32) * 64 * (1 + want)).max())
    assert abs(fn.pop_stats()["entropy"] - _mean_entropy64(logits, labels)) <= tol


def test_finetune_logger_writes_mean_entropy(tmp_path):
    """prsl-finetune's JSONL logger (drivers/finetune.py) writes pop_stats' entropy beside ce / penalty /
    accuracy: the float64 mean entropy of the step's logits over the counted tokens."""
    import json
    from types import SimpleNamespace

    pytest.importorskip("transformers")
    from prsl_kernels.drivers import finetune
    from prsl_kernels.hf_losses import PRSLTokenLoss

    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 7, 30, generator=gen) * 3
    labels = torch.randint(0, 30, (2, 7), generator=gen)
    labels[0, 3:] = -100
    fn = PRSLTokenLoss(4, 1.0, shift=False)
    fn(logits, labels)
    log_path = tmp_path / "log.jsonl"
    logger = finetune._make_callbacks(None, None, fn, [], log_path)[0]
    logger.on_log(SimpleNamespace(device="cpu"), SimpleNamespace(is_world_process_zero=True, global_step=1), None,
                  logs={"loss": 1.0})
    record = json.loads(log_path.read_text().splitlines()[-1])
    tol = float(tolerance(logits, entropy64(logits, labels)).max())
    assert abs(record["entropy"] - _mean_entropy64(logits, labels)) <= tol
    assert {"ce", "penalty", "accuracy", "tokens"} <= set(record)
