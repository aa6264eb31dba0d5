"""The Triton kernels (prsl_kernels/triton_kernels.py) against the reference.

Run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
shapes are small and the block size is shrunk (triton_kernels.block_width) to stream each
row in several blocks. The reference is evaluated on the same values, upcast.
"""

import pytest
import torch

import reference as ref
from conftest import needs_interpreter
from launch_recorder import record_launches
from prsl_kernels import prsl_loss
from prsl_kernels import triton_kernels as tk
from prsl_kernels.spec import DIST, LSE, NUM_ROW_STATS, SPREAD_SUM, TAU, TIE_COUNT

# CPU tensors throughout, and a kernel helper swapped at run time (the last test): the interpreter's.
pytestmark = needs_interpreter

# Gradients in 16-bit may differ from the fp32 closed form by their output rounding only.
GRAD_RTOL = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 1e-5, torch.float64: 1e-10}
GRAD_ATOL = {torch.float16: 1e-7, torch.bfloat16: 1e-7, torch.float32: 1e-7, torch.float64: 1e-12}
LOSS_RTOL = {torch.float64: 1e-12}


@pytest.fixture
def block(block_width):
    return block_width


def make_rows(n, vocab, dtype, seed, scale=3.0, ignore_index=-100):
    """Random logits with targets at the row maximum, the row minimum, random, and ignored."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=gen, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, vocab, (n,), generator=gen)
    target[0] = logits[0].float().argmax()  # target inside what would be the top-k
    target[1] = logits[1].float().argmin()
    target[n - 1] = ignore_index
    return logits, target, gen


def run_triton(logits, target, k, b, ignore_index=-100, grad_rows=None):
    """Per-row loss, row stats and d(sum grad_rows * loss)/dlogits through prsl_loss(backend='triton')."""
    x = logits.detach().clone().requires_grad_(True)
    loss, stats = prsl_loss(x, target, k, b, ignore_index=ignore_index, reduction="none", backend="triton",
                            return_stats=True)
    upstream = torch.ones_like(loss) if grad_rows is None else grad_rows.reshape(loss.shape)
    (loss * upstream).sum().backward()
    return loss.detach(), stats, x.grad


def assert_matches_reference(logits, target, k, b, ignore_index=-100, grad_rows=None):
    dtype = logits.dtype
    loss, stats, grad = run_triton(logits, target, k, b, ignore_index, grad_rows)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype and grad.shape == logits.shape

    want_loss = ref.prsl_loss_reference(logits, target, k, b, ignore_index=ignore_index, reduction="none")
    torch.testing.assert_close(loss, want_loss, rtol=LOSS_RTOL.get(dtype, 1e-5), atol=1e-5)

    want_grad = ref.grad_closed_form(logits, target, k, b, ignore_index=ignore_index, grad_rows=grad_rows)
    torch.testing.assert_close(grad.to(want_grad.dtype), want_grad, rtol=GRAD_RTOL[dtype], atol=GRAD_ATOL[dtype])

    counted = target.reshape(-1) != ignore_index
    assert (grad.reshape(-1, logits.shape[-1])[~counted] == 0).all()
    assert (loss.reshape(-1)[~counted] == 0).all()
    if b != 0:  # b == 0 skips the selection (tau = +inf), as k == 0 does
        lse, tau, dist, spread, ties = ref.row_stats_reference(logits, target, k, ignore_index)[:5]
        c = counted
        torch.testing.assert_close(stats.lse[c], lse[c], rtol=1e-6, atol=1e-6)
        assert torch.equal(stats.tau[c], tau[c])  # a logit value: exact
        assert torch.equal(stats.tie_count[c], ties[c])
        torch.testing.assert_close(stats.dist[c], dist[c], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(stats.spread_sum[c], spread[c], rtol=1e-4, atol=1e-7)
    return loss, stats, grad


@pytest.mark.parametrize("dtype,vocab,k,b,block_v", [
    (torch.float32, 37, 6, 0.5, 16),
    (torch.float32, 131, 20, -0.3, 32),
    (torch.float32, 1000, 100, 1e-4, 256),  # first block n > KP: bitonic top-k of the block
    (torch.float32, 1000, 6, 0.5, 64),
    (torch.float32, 200, 199, 0.5, 64),  # k = V - 1: every non-target selected
    (torch.float32, 131, 0, 0.5, 32),  # plain cross-entropy
    (torch.float32, 131, 6, 0.0, 32),  # b == 0: plain cross-entropy
    (torch.float64, 131, 20, 0.5, 32),
    (torch.float16, 131, 6, 0.5, 32),
    (torch.float16, 1000, 20, -0.3, 128),
    (torch.bfloat16, 131, 20, 0.5, 64),
    (torch.bfloat16, 300, 1, 0.5, 64),  # k = 1: A empty, D = 0
])
def test_matches_reference(block, dtype, vocab, k, b, block_v):
    block(block_v)
    logits, target, gen = make_rows(8, vocab, dtype, seed=vocab + k)
    grad_rows = torch.randn(8, generator=gen, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    loss, stats, _ = assert_matches_reference(logits, target, k, b, grad_rows=grad_rows)
    if k == 0 or b == 0:
        assert torch.isinf(stats.tau[:-1]).all() and (stats.dist == 0).all()
    elif k > 1:
        assert (stats.dist[:-1] > 0).all()  # the penalty is really exercised


def test_large_k_in_kernel(block):
    """k = 1024 runs in the kernel (KP = 2048 buffer), not the torch fallback."""
    block(512)
    assert 1024 <= tk.MAX_K
    logits, target, _ = make_rows(3, 1100, torch.float32, seed=7)
    assert_matches_reference(logits, target, 1024, 0.5)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_reductions_and_ignore_index(block, reduction):
    block(32)
    ignore = 5  # a non-default ignore value that is also a valid class
    logits, target, gen = make_rows(6, 100, torch.float32, seed=11, ignore_index=ignore)
    target[2] = ignore
    x = logits.clone().requires_grad_(True)
    loss = prsl_loss(x, target, 20, 0.5, ignore_index=ignore, reduction=reduction, backend="triton")
    want = ref.prsl_loss_reference(logits, target, 20, 0.5, ignore_index=ignore, reduction=reduction)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    upstream = torch.randn(loss.shape, generator=gen)
    loss.backward(upstream)
    counted = (target != ignore).float()
    if reduction == "none":
        grad_rows = upstream
    elif reduction == "sum":
        grad_rows = upstream.expand(6)
    else:
        grad_rows = upstream.expand(6) / counted.sum()
    want_grad = ref.grad_closed_form(logits, target, 20, 0.5, ignore_index=ignore, grad_rows=grad_rows)
    torch.testing.assert_close(x.grad, want_grad, rtol=1e-5, atol=1e-7)
    assert (x.grad[target == ignore] == 0).all()


def test_masked_vocabulary(block):
    """-inf logits have p = 0; with fewer than k finite non-targets, tau = -inf."""
    block(16)
    logits, target, _ = make_rows(5, 64, torch.float32, seed=3)
    logits[0, 40:] = float("-inf")  # 40 finite, k = 20: tau finite
    logits[1, 10:] = float("-inf")  # 10 finite (target may be one of them): tau = -inf
    logits[2, ::2] = float("-inf")
    logits[3, :] = float("-inf")
    logits[3, 7] = 1.5
    target[:4] = torch.tensor([2, 3, 5, 7])  # finite targets; in row 3 the only finite logit
    loss, stats, _ = assert_matches_reference(logits, target, 20, 0.5)
    assert torch.isfinite(loss).all()
    assert stats.tau[1] == float("-inf") and stats.tau[3] == float("-inf")
    assert stats.tie_count[3] == 63


@pytest.mark.parametrize("dtype,k,block_v", [(torch.float32, 6, 16), (torch.bfloat16, 20, 64),
                                             (torch.float32, 100, 256)])
def test_heavy_ties(block, dtype, k, block_v):
    """Integer-valued logits: many ties at tau, beyond the buffer (the second pass counts them)."""
    block(block_v)
    gen = torch.Generator().manual_seed(k)
    logits = torch.randint(-4, 4, (6, 300), generator=gen).to(dtype)
    target = torch.randint(0, 300, (6,), generator=gen)
    target[0] = logits[0].float().argmax()
    _, stats, _ = assert_matches_reference(logits, target, k, 0.5)
    assert (stats.tie_count > 1).all()


def test_bf16_rounding_ties(block):
    """Continuous data rounded to bf16 (8 bits) collide often near the top."""
    block(128)
    logits, target, _ = make_rows(6, 500, torch.bfloat16, seed=5, scale=1.0)
    assert_matches_reference(logits, target, 100, -0.3)


def test_strided_rows_and_leading_shape(block):
    block(32)
    gen = torch.Generator().manual_seed(1)
    storage = torch.randn(2, 3, 107, generator=gen) * 2
    logits = storage[:, :, :100]  # rows with stride 107
    assert not logits.is_contiguous()
    target = torch.randint(0, 100, (2, 3), generator=gen)
    target[1, 2] = -100
    grad_rows = torch.randn(2, 3, generator=gen)
    loss, _, grad = assert_matches_reference(logits, target, 6, 0.5, grad_rows=grad_rows)
    assert loss.shape == (2, 3) and grad.shape == (2, 3, 100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fallback_above_max_k(block, monkeypatch, dtype):
    """k > MAX_K: torch computes the row stats, the backward kernel is unchanged."""
    block(64)
    monkeypatch.setattr(tk, "MAX_K", 5)
    gen = torch.Generator().manual_seed(2)
    logits = torch.randint(-3, 3, (6, 150), generator=gen).to(dtype)  # ties at tau
    logits[2] = torch.randn(150, generator=gen).to(dtype)
    target = torch.randint(0, 150, (6,), generator=gen)
    target[0] = logits[0].float().argmax()  # target inside the top k + 1
    target[5] = -100
    assert_matches_reference(logits, target, 20, 0.5)


def test_fallback_real_max_k():
    """k = MAX_K + 1 on a small row (forward in torch, backward kernel at its default block)."""
    logits, target, _ = make_rows(3, 2100, torch.float32, seed=9)
    assert_matches_reference(logits, target, tk.MAX_K + 1, 0.5)


def test_deterministic(block):
    block(128)
    logits, target, gen = make_rows(6, 300, torch.float32, seed=4)
    grad_rows = torch.randn(6, generator=gen)
    first = run_triton(logits, target, 20, 0.5, grad_rows=grad_rows)
    second = run_triton(logits, target, 20, 0.5, grad_rows=grad_rows)
    assert torch.equal(first[0], second[0]) and torch.equal(first[2], second[2])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


@pytest.mark.parametrize("k", [0, 6])
def test_nan_and_inf_rows_give_nan(block, k):
    block(16)
    logits, target, _ = make_rows(5, 50, torch.float32, seed=6)
    logits[0, 3] = float("nan")
    logits[1, 8] = float("inf")
    logits[2, target[2]] = float("inf")
    loss, _, _ = run_triton(logits, target, k, 0.5)
    assert torch.isnan(loss[:3]).all()
    want = ref.prsl_loss_reference(logits[3:], target[3:], k, 0.5, reduction="none")
    torch.testing.assert_close(loss[3:], want, rtol=1e-5, atol=1e-6)


def test_row_stats_layout():
    """The raw launcher returns (N,) losses and (N, 5) stats in the documented column order."""
    logits, target, _ = make_rows(4, 40, torch.float32, seed=8)
    loss_rows, row_stats = tk.forward(logits, target, 6, 0.5, -100)
    assert loss_rows.shape == (4,) and row_stats.shape == (4, NUM_ROW_STATS)
    lse, tau, dist, spread, ties = ref.row_stats_reference(logits, target, 6)[:5]
    for column, want in ((LSE, lse), (TAU, tau), (DIST, dist), (SPREAD_SUM, spread), (TIE_COUNT, ties)):
        torch.testing.assert_close(row_stats[:3, column], want[:3], rtol=1e-5, atol=1e-7)
    assert torch.isfinite(row_stats[3]).all()  # ignored row: finite filler


def test_empty_batch():
    logits = torch.randn(0, 30, requires_grad=True)
    loss = prsl_loss(logits, torch.zeros(0, dtype=torch.long), 6, 0.5, reduction="sum", backend="triton")
    loss.backward()
    assert loss.item() == 0 and logits.grad.shape == (0, 30)


def test_gradcheck_fp64(block):
    block(8)
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(2, 13, generator=gen, dtype=torch.float64) * 2  # continuous: no exact ties
    target = torch.tensor([4, 9])

    def loss_rows(x):
        return prsl_loss(x, target, 4, 0.7, reduction="none", backend="triton")

    assert torch.autograd.gradcheck(loss_rows, (logits.requires_grad_(True),), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("k", [0, 6, 3000])
def test_out_of_range_targets_are_never_read(k):
    """check_target=False: a target that is neither ignore_index nor in [0, V) gives a NaN loss and
    gradient for its row (no read at that address), and leaves the other rows exact. k = 3000 > MAX_K
    takes the torch path."""
    vocab = 3100 if k > tk.MAX_K else 200
    logits, target, _ = make_rows(7, vocab, torch.float32, seed=k + 1)
    target[:5] = torch.tensor([vocab, vocab + 1, 1 << 40, -1, -7])
    x = logits.clone().requires_grad_(True)
    loss = prsl_loss(x, target, k, 0.5, reduction="none", backend="triton", check_target=False)
    loss.sum().backward()
    assert torch.isnan(loss[:5]).all() and torch.isnan(x.grad[:5]).all()
    want = ref.prsl_loss_reference(logits[5:], target[5:], k, 0.5, reduction="none")
    torch.testing.assert_close(loss[5:], want, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(x.grad[5:]).all() and (x.grad[6] == 0).all()  # row 6 is ignored


def test_two_pass_forward_takes_the_fast_path_and_flags_what_it_cannot_prove():
    """Continuous rows are settled by the two-pass kernel (flag 0); heavy ties, rows with fewer
    than k finite groups and NaN rows are flagged and recomputed exactly by the exact kernel."""
    gen = torch.Generator().manual_seed(21)
    vocab, k = 3000, 20  # default tiles: one 4096-wide bf16 tile / two 2048-wide fp32 tiles
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(6, vocab, generator=gen) * 2).to(dtype)
        target = torch.randint(0, vocab, (6,), generator=gen)
        logits[3] = torch.randint(-3, 3, (vocab,), generator=gen).to(dtype)  # ties: too many candidates
        logits[4, 10:] = float("-inf")  # 10 finite logits < k: tau = -inf
        target[4] = 2
        logits[5, 7] = float("nan")
        target[5] = 8
        assert tk.forward_config(dtype, vocab, k).kernel == "forward"
        loss, stats, flags = tk.forward_with_flags(logits, target, k, 0.5, -100)
        assert flags.tolist() == [0, 0, 0, 1, 1, 1]
        want = ref.prsl_loss_reference(logits[:5], target[:5], k, 0.5, reduction="none")
        torch.testing.assert_close(loss[:5], want, rtol=1e-5, atol=1e-5)
        assert torch.isnan(loss[5])
        lse, tau, dist, spread, ties = ref.row_stats_reference(logits[:5], target[:5], k)[:5]
        assert torch.equal(stats[:5, TAU], tau) and torch.equal(stats[:5, TIE_COUNT], ties)


def test_misaligned_rows_match_aligned_copy():
    """A view whose base is off 16-byte alignment takes the unaligned tiles; same values."""
    gen = torch.Generator().manual_seed(22)
    storage = (torch.randn(4, 3001, generator=gen) * 2).to(torch.bfloat16)
    view = storage[:, 1:]  # base 2 bytes past an aligned address, row stride 3001
    assert view.data_ptr() % 16 != 0
    target = torch.randint(0, 3000, (4,), generator=gen)
    got = run_triton(view, target, 20, 0.5)
    want = run_triton(view.contiguous(), target, 20, 0.5)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[2].float(), want[2].float(), rtol=2.0 ** -8, atol=1e-7)
    assert_matches_reference(view, target, 20, 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_logits_at_the_row_ends(dtype):
    """The largest logits sit in each row's first and last 8 positions, which straddle the aligned
    chunks (odd V, so every row starts at a different offset): the two-pass kernel still finds them."""
    gen = torch.Generator().manual_seed(23)
    vocab, k = 3001, 20
    logits = torch.randn(6, vocab, generator=gen)
    logits[:, :8] += 6.0 + torch.rand(6, 8, generator=gen)
    logits[:, -8:] += 6.0 + torch.rand(6, 8, generator=gen)
    logits = logits.to(dtype)
    target = torch.randint(8, vocab - 8, (6,), generator=gen)
    loss, stats, flags = tk.forward_with_flags(logits, target, k, 0.5, -100)
    assert flags.tolist() == [0] * 6
    want = ref.prsl_loss_reference(logits, target, k, 0.5, reduction="none")
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    tau = ref.row_stats_reference(logits, target, k)[1]
    assert torch.equal(stats[:, TAU], tau)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k", [6, 20])
def test_rows_whose_threshold_is_negative(dtype, k):
    """Rows whose k-th largest non-target logit (tau) is negative, or whose every logit
    is negative, on the default launch (two-pass forward) in 16-bit and 32-bit: a selection that
    treats values by their bit patterns or assumes tau >= 0 is wrong exactly here."""
    gen = torch.Generator().manual_seed(40 + k)
    vocab = 3000
    logits = torch.randn(6, vocab, generator=gen, dtype=torch.float64) * 2
    logits[0] -= 30.0                       # every logit negative
    logits[1] -= logits[1].sort(descending=True).values[k // 2]  # tau well below 0, a few logits above 0
    logits[2] = -logits[2].abs() - 0.5      # all negative, mixed magnitudes
    logits[3] *= 0.01                       # tau near 0 from both sides
    logits = logits.to(dtype)
    target = torch.randint(0, vocab, (6,), generator=gen)
    target[5] = -100
    loss, stats, _ = assert_matches_reference(logits, target, k, 0.5)
    assert (stats.tau[:3] < 0).all()
    assert (stats.dist[:5] > 0).all()


import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _lose_every_chunk(tile0, group_row, gl0, tb0, n_groups, n_tiles, thr, target, lead, V, cap,
                      TILE: tl.constexpr, VEC: tl.constexpr, T_BLK: tl.constexpr, ROWS: tl.constexpr,
                      acc: tl.constexpr, SOFTCAP: tl.constexpr):
    # A broken pass 2 (test only): the signature of _gather_chunks, no candidate ever found.
    rows = tl.arange(0, ROWS)
    return tl.full([ROWS, VEC], float("-inf"), acc), (rows < 0).to(tl.int32)


def test_pass_two_finding_fewer_than_k_candidates_is_flagged(monkeypatch):
    """If pass 2 of the two-pass forward ever lost candidates (values recomputed
    differently from pass 1), the row must be flagged and recomputed by the exact kernel, never
    finished with tau = -inf. Simulated (interpreter) by a pass 2 that drops every whole chunk."""
    gen = torch.Generator().manual_seed(5)
    vocab, k = 3000, 20
    logits = torch.randn(3, vocab, generator=gen) * 2
    target = torch.randint(0, vocab, (3,), generator=gen)
    monkeypatch.setattr(tk, "_gather_chunks", _lose_every_chunk)
    loss, stats, flags = tk.forward_with_flags(logits, target, k, 0.5, -100)
    assert flags.tolist() == [1, 1, 1]
    want = ref.prsl_loss_reference(logits, target, k, 0.5, reduction="none")
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)  # the exact kernel's rows
    assert torch.isfinite(stats[:, TAU]).all()


def test_block_width_reaches_the_launches(monkeypatch, triton_device):
    """``block_width(v)`` sets the tiles of launches on the public path (prsl_loss down to the
    launchers), a launcher's own ``block_v`` wins over it, and the tuned tiles come back after."""
    seen = record_launches(monkeypatch, tk, "_prsl_backward_kernel", lambda kw: kw["TILE"])
    logits, target, _ = make_rows(3, 300, torch.float32, seed=3)
    logits, target = logits.to(triton_device), target.to(triton_device)

    def backward_tile():
        x = logits.clone().requires_grad_(True)
        prsl_loss(x, target, 3, 0.5, reduction="none", backend="triton").sum().backward()
        return seen[-1]

    with tk.block_width(64):
        assert backward_tile() == 64
        _, stats = tk.forward(logits, target, 3, 0.5, -100)
        tk.backward(torch.ones(3, device=triton_device), logits, target, stats, 0.5, -100, block_v=32)
        assert seen[-1] == 32
    assert backward_tile() == 512  # min(2048, the next power of two of V = 300)
