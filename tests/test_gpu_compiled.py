"""The compiled Triton kernels at real shapes against the float64 reference (CUDA only).

On CUDA (kernels compiled): 8192 x 50257 (GPT-2's vocabulary) and 4096 x 128256 (Llama 3's), in
bf16 and fp32; the in-place barrier case at 65536 x 32000 bf16. Without CUDA the same test
functions run at tiny shapes in Triton's CPU interpreter (tests/conftest.py): that proves the
test code (inputs, reference, tolerances' bookkeeping) without a GPU, in well under a minute.
The real-shape cases show as skipped there, the tiny ones as skipped on CUDA.

The reference is ``reference`` on the kernels' own input values upcast to float64 (a bf16
logit is an exact float64), taken in row chunks: one float64 copy of 8192 x 50257 is 3.3 GB and
the reference makes several. The gradient is the spec's closed form (``grad_closed_form``, held
to autograd through the reference by tests/test_options.py), which needs no autograd graph.

Tolerances, and why:

* Loss rows, lse: the kernels accumulate in float32 (a sum of V exponentials: a few units of
  6e-8 relative on each partial sum); the loss is ``lse - z_s + ...`` and may cancel, so its
  error is measured against the row's lse: ``|loss - ref| <= 1e-5 * max(|lse|, 1)``, >= 10x the
  float32 rounding at these row lengths, and ~1e-4 of a typical loss.
* Entropy ``H = log S - T / S`` (T / S = sum_j p_j (z_j - m)): log S as lse; T / S is a
  p-weighted mean of exponents (at most H), each weight off by ex2.approx's 2^-22 and each exponent
  by the float32 rounding of ``z_j log2 e - m log2 e``: the loss rows' bound times ``1 + H``.
* tau, |T|, ``correct``: selections of input values that both sides see exactly: equal.
* D and S: differences of probabilities (u = p - p_min), whose relative error grows as the
  top-k probabilities approach each other: 1e-4 normwise over the rows (benchmarks/gpu_check.py's
  bound).
* Gradient, fp32: ``p_j`` from ``exp2`` (ex2.approx, 2^-22 relative) of ``z_j - lse`` rounded in
  float32 (|z_j - lse| * 2^-24 relative: 6e-6 at a distance of 100); rtol 2e-5, plus 2e-6 of the
  row's largest |gradient| for entries that cancel to ~0.
* Gradient, bf16: the float32 value above rounded once to bf16 (at most 2^-8 relative): rtol
  2^-8 + 2e-5, the same absolute floor.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import reference as ref
from conftest import COMPILED, INTERPRETER, TRITON_DEVICE
from prsl_kernels import linear_prsl_loss, prsl_loss
from prsl_kernels import triton_kernels as tk
from prsl_kernels.linear import default_chunk_size

_ON_CUDA = pytest.mark.skipif(not COMPILED, reason="real shapes: compiled Triton kernels on a CUDA device")
_IN_INTERPRETER = pytest.mark.skipif(not INTERPRETER, reason="the tiny run of a CUDA test, for Triton's CPU "
                                                             "interpreter (off here)")


def _cases(real, tiny):
    return ([pytest.param(*case, marks=_ON_CUDA, id="cuda-" + _name(case)) for case in real]
            + [pytest.param(*case, marks=_IN_INTERPRETER, id="interpreter-" + _name(case)) for case in tiny])


def _name(case):
    return "-".join("x".join(map(str, c)) if isinstance(c, tuple) else str(c).replace("torch.", "") for c in case)


REAL_SHAPES = [(8192, 50257), (4096, 128256)]
TINY_SHAPES = [(7, 160), (5, 300)]  # V >= 129: k >= 128 (every row in the exact kernel) fits
BF16, FP32 = torch.bfloat16, torch.float32
EVERY_SHAPE_AND_DTYPE = _cases([(s, d) for s in REAL_SHAPES for d in (BF16, FP32)],
                               [(s, d) for s in TINY_SHAPES for d in (BF16, FP32)])
# Tests of what the options and the linear layer add: one dtype per real shape (compile time).
SHAPE_DTYPE_PAIRS = _cases([(REAL_SHAPES[0], BF16), (REAL_SHAPES[1], FP32)],
                           [(TINY_SHAPES[0], BF16), (TINY_SHAPES[1], FP32)])

DEVICE = TRITON_DEVICE
# Elements of one float64 reference chunk: 512 MiB a tensor on CUDA; a few rows in the interpreter,
# so that its tiny shapes also walk several chunks.
CHUNK_ELEMS = 1 << 26 if COMPILED else 512
K, B = 20, 0.5
TIE_ROWS = 16 if COMPILED else 2
GRAD_RTOL = {BF16: 2.0 ** -8 + 2e-5, FP32: 2e-5}
GRAD_ATOL = 2e-6  # of the row's largest |gradient|
LOSS_TOL = 1e-5  # of max(|lse|, 1)
STATS_TOL = 1e-4  # D and S, normwise


def make_batch(shape, dtype, seed):
    """Logits ~ 2 N(0, 1) with: TIE_ROWS rows of integers in [-3, 3) (heavy ties: the two-pass
    kernel flags them at real V), one row with only 10 finite logits (< k: flagged at any V),
    a target at its row's maximum, ignored rows."""
    n, vocab = shape
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=gen, device=DEVICE) * 2).to(dtype)
    logits[:TIE_ROWS] = torch.randint(-3, 3, (TIE_ROWS, vocab), generator=gen, device=DEVICE).to(dtype)
    target = torch.randint(0, vocab, (n,), generator=gen, device=DEVICE)
    target[torch.rand(n, generator=gen, device=DEVICE) < 0.05] = -100
    target[-1] = -100
    masked = TIE_ROWS
    keep = torch.randperm(vocab, generator=gen, device=DEVICE)[:10]
    logits[masked] = torch.where(torch.isin(torch.arange(vocab, device=DEVICE), keep), logits[masked],
                                 float("-inf"))
    target[masked] = keep[0]
    target[masked + 1] = logits[masked + 1].float().argmax()
    return logits, target


def row_chunks(n, vocab):
    rows = max(1, CHUNK_ELEMS // vocab)
    return [slice(start, min(n, start + rows)) for start in range(0, n, rows)]


def check_close(got, want, rtol, atol, what):
    """``|got - want| <= rtol |want| + atol`` everywhere (``atol`` broadcasts, e.g. one per row);
    a NaN where the reference is finite fails."""
    got = got.double()
    bad = ~((got - want).abs() <= rtol * want.abs() + atol) & ~(got == want)  # equal infinities pass
    if bool(bad.any()):
        where = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} out of tolerance; first at {where}: "
                             f"got {got[where].item():.9g}, want {want[where].item():.9g}")


def check_grad(got, want, dtype, what):
    row_max = want.abs().amax(-1, keepdim=True)
    check_close(got, want, GRAD_RTOL[dtype], GRAD_ATOL * row_max, what)


def _abs_max(t):
    return float(t.abs().max()) if t.numel() else 0.0


class Normwise:
    """max|got - want| / max|want| over chunks, for D and S."""

    def __init__(self):
        self.diff = self.scale = 0.0

    def add(self, got, want):
        finite = torch.isfinite(want)
        self.diff = max(self.diff, _abs_max((got.double() - want)[finite]))
        self.scale = max(self.scale, _abs_max(want[finite]))

    def error(self):
        return self.diff / self.scale if self.scale > 0 else self.diff


def compare(logits, target, k, b, *, loss_rows=None, stats=None, grad=None, grad_rows=None, options=None,
            exact_selection=True):
    """Chunk by chunk, the kernels' per-row loss, statistics and gradient against the float64
    reference; returns the reference's loss-row sum and lse scale (for a reduced loss)."""
    options = options or {}
    dist_err, spread_err = Normwise(), Normwise()
    total, lse_scale = 0.0, 1.0
    for rows in row_chunks(*logits.shape):
        z, t = logits[rows].double(), target[rows]
        want_loss, (lse, tau, dist, spread, ties, correct, entropy) = ref.loss_rows_reference(z, t, k, b, **options)
        counted = t != -100
        total += float(want_loss.sum())
        lse_scale = max(lse_scale, _abs_max(lse[counted]))
        tol = LOSS_TOL * lse.abs().clamp_min(1.0)
        if loss_rows is not None:
            check_close(loss_rows[rows], want_loss, 0.0, tol, f"loss rows {rows}")
        if stats is not None:
            check_close(stats.lse[rows][counted], lse[counted], 0.0, tol[counted], f"lse {rows}")
            if exact_selection:
                assert torch.equal(stats.tau[rows][counted].double(), tau[counted]), f"tau {rows}"
                assert torch.equal(stats.tie_count[rows][counted].double(), ties[counted]), f"|T| {rows}"
            assert torch.equal(stats.correct[rows].double(), correct), f"correct {rows}"
            check_close(stats.entropy[rows], entropy, 0.0, tol * (1 + entropy.abs()), f"entropy {rows}")
            dist_err.add(stats.dist[rows][counted], dist[counted])
            spread_err.add(stats.spread_sum[rows][counted], spread[counted])
        if grad is not None:
            scale = grad_rows[rows].double() if grad_rows is not None else None
            want_grad = ref.grad_closed_form(z, t, k, b, grad_rows=scale, **options)
            check_grad(grad[rows], want_grad, logits.dtype, f"gradient {rows}")
    assert dist_err.error() <= STATS_TOL and spread_err.error() <= STATS_TOL, (dist_err.error(), spread_err.error())
    return total, lse_scale


# ---------------------------------------------------------------- prsl_loss


@pytest.mark.parametrize("shape, dtype", EVERY_SHAPE_AND_DTYPE)
def test_two_pass_forward_flagged_rows_and_backward(shape, dtype):
    """k < 128: the two-pass forward, the rows it flags (recomputed by the exact kernel), and the
    backward kernel with a random upstream gradient per row (reduction='none')."""
    logits, target = make_batch(shape, dtype, seed=1)
    _, _, flags = tk.forward_with_flags(logits, target, K, B, -100)
    assert flags[TIE_ROWS] == 1  # fewer finite logits than k
    if COMPILED:  # at V = 50257 a tie row has ~V/6 logits at tau: more than the candidate lists hold
        assert bool(flags[:TIE_ROWS].all())
        fast = (flags[TIE_ROWS + 1:] == 0).float().mean().item()
        assert fast >= 0.99, f"only {fast:.3f} of the continuous rows took the two-pass path"
    x = logits.clone().requires_grad_(True)
    loss, stats = prsl_loss(x, target, K, B, reduction="none", backend="triton", return_stats=True)
    upstream = torch.rand(shape[0], generator=torch.Generator(device=DEVICE).manual_seed(2), device=DEVICE) + 0.5
    loss.backward(upstream)
    assert x.grad.dtype == dtype
    compare(logits, target, K, B, loss_rows=loss.detach(), stats=stats, grad=x.grad, grad_rows=upstream)


@pytest.mark.parametrize("k", [K, 200], ids=["k20-two-pass", "k200-exact"])
@pytest.mark.parametrize("shape, dtype", EVERY_SHAPE_AND_DTYPE)
def test_gradient_in_forward_mean_sum_and_inplace(shape, dtype, k):
    """reduction='mean' / 'sum' with a gradient: the forward kernels write it (k = 20: two-pass +
    flagged rows; k >= 128: the exact kernel for every row). inplace_backward=True gives the
    same bits over the logits' storage."""
    k = min(k, shape[1] - 1)
    logits, target = make_batch(shape, dtype, seed=3)
    count = int((target != -100).sum())
    grads, losses = {}, {}
    for reduction in ("mean", "sum"):
        x = logits.clone().requires_grad_(True)
        loss, stats = prsl_loss(x, target, k, B, reduction=reduction, backend="triton", return_stats=True)
        loss.backward()
        grads[reduction], losses[reduction] = x.grad, loss.detach()
    scale = torch.full((shape[0],), 1.0 / count, dtype=torch.float64, device=DEVICE)
    total, lse_scale = compare(logits, target, k, B, stats=stats, grad=grads["mean"], grad_rows=scale)
    compare(logits, target, k, B, grad=grads["sum"])
    assert abs(losses["sum"].item() - total) <= LOSS_TOL * lse_scale * count, (losses["sum"].item(), total)
    assert abs(losses["mean"].item() - total / count) <= LOSS_TOL * lse_scale, (losses["mean"].item(), total / count)
    del grads["mean"]

    y = logits.clone().requires_grad_(True)
    y_logits = y * 1.0  # a non-leaf: the in-place gradient overwrites its storage
    loss = prsl_loss(y_logits, target, k, B, reduction="sum", backend="triton", inplace_backward=True)
    loss.backward()
    assert torch.equal(loss.detach(), losses["sum"])
    assert torch.equal(y.grad, grads["sum"]) and torch.equal(y_logits.detach(), grads["sum"])


@pytest.mark.parametrize("shape, dtype", SHAPE_DTYPE_PAIRS)
def test_options_label_smoothing_z_loss_softcap(shape, dtype):
    """All three options at once: per-row losses, stats and the backward kernel's gradient
    (reduction='none'), then the gradient made in the forward (reduction='sum')."""
    options = dict(label_smoothing=0.1, z_loss=1e-4, softcap=10.0)  # 10: bends logits of 2 N(0, 1)
    logits, target = make_batch(shape, dtype, seed=4)
    x = logits.clone().requires_grad_(True)
    loss, stats = prsl_loss(x, target, K, B, reduction="none", backend="triton", return_stats=True, **options)
    upstream = torch.rand(shape[0], generator=torch.Generator(device=DEVICE).manual_seed(5), device=DEVICE) + 0.5
    loss.backward(upstream)
    # tau and |T| are float32-capped values against float64-capped ones: not compared exactly.
    compare(logits, target, K, B, loss_rows=loss.detach(), stats=stats, grad=x.grad, grad_rows=upstream,
            options=options, exact_selection=False)
    y = logits.clone().requires_grad_(True)
    total = prsl_loss(y, target, K, B, reduction="sum", backend="triton", **options)
    total.backward()
    want_total, lse_scale = compare(logits, target, K, B, grad=y.grad, options=options)
    assert abs(total.item() - want_total) <= LOSS_TOL * lse_scale * int((target != -100).sum()), \
        (total.item(), want_total)


# ---------------------------------------------------------------- in-place: the k = 0 barrier


@pytest.mark.parametrize("shape, repeats", _cases([((65536, 32000), 10)], [((64, 300), 2)]))
def test_inplace_k0_matches_out_of_place_bit_for_bit(shape, repeats):
    """k = 0 (and b = 0, which the API turns into k = 0): no selection pass separates reading a
    row from writing its gradient over it, so the kernel's barrier is all that keeps a tile from
    being overwritten before every thread has read it. Repeated runs, each equal bit for bit to
    the out-of-place gradient (bf16; 4.2 GB of logits on CUDA)."""
    gen = torch.Generator(device=DEVICE).manual_seed(6)
    logits = (torch.randn(*shape, generator=gen, device=DEVICE) * 2).to(BF16)
    target = torch.randint(0, shape[1], (shape[0],), generator=gen, device=DEVICE)
    target[::7] = -100
    for k, b in ((0, B), (K, 0.0)):
        x = logits.clone().requires_grad_(True)
        want_loss = prsl_loss(x, target, k, b, backend="triton")
        want_loss.backward()
        want = x.grad
        del x
        for _ in range(repeats):
            y = logits.clone().requires_grad_(True)
            y_logits = y * 1.0
            loss = prsl_loss(y_logits, target, k, b, backend="triton", inplace_backward=True)
            loss.backward()
            assert torch.equal(loss.detach(), want_loss.detach()), (k, b)
            assert torch.equal(y_logits.detach(), want) and torch.equal(y.grad, want), (k, b)
            del y, y_logits, loss


# ---------------------------------------------------------------- fused linear + PRSL


def _rel_err(got, truth):
    return ((got.double() - truth).norm() / truth.norm()).item()


@pytest.mark.parametrize("shape, dtype", SHAPE_DTYPE_PAIRS)
def test_linear_prsl_loss(shape, dtype):
    """linear_prsl_loss(hidden, weight) against the float64 truth on the same (rounded) inputs,
    judged as Cut Cross-Entropy's tests judge theirs: no worse than twice the error of the
    unfused path in the same dtype (F.linear, then prsl_loss), plus slack for the weight
    gradient's running sum, rounded once per chunk (linear.py): one unit roundoff per chunk,
    adding up as sqrt(chunks) (bf16: 2^-8; float32: 1e-6, float32's 6e-8 rounded up for the
    matmuls of a chunk's rows summing in another split than those of all rows)."""
    n, vocab = shape
    hidden_size = 256 if COMPILED else 16
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    hidden = torch.randn(n, hidden_size, generator=gen, device=DEVICE).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen, device=DEVICE) * 2 / hidden_size ** 0.5).to(dtype)
    target = torch.randint(0, vocab, (n,), generator=gen, device=DEVICE)
    target[::9] = -100
    count = int((target != -100).sum())

    h64, w64 = hidden.double(), weight.double()
    truth_loss, truth_h, truth_w = 0.0, torch.empty_like(h64), torch.zeros_like(w64)
    for rows in row_chunks(n, vocab):
        z = h64[rows] @ w64.T
        truth_loss += float(ref.loss_rows_reference(z, target[rows], K, B)[0].sum()) / count
        g = ref.grad_closed_form(z, target[rows], K, B) / count
        truth_h[rows] = g @ w64
        truth_w += g.T @ h64[rows]

    chunk_size = None if COMPILED else 3  # the interpreter: several chunks at its tiny N
    results = {}
    for method in ("fused", "unfused"):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if method == "fused":
            loss = linear_prsl_loss(h, w, target, K, B, backend="triton", chunk_size=chunk_size)
        else:
            loss = prsl_loss(F.linear(h, w), target, K, B, backend="triton")
        loss.backward()
        results[method] = [_rel_err(loss.detach(), torch.tensor(truth_loss, dtype=torch.float64, device=DEVICE)),
                           _rel_err(h.grad, truth_h), _rel_err(w.grad, truth_w)]
        assert h.grad.dtype == dtype and w.grad.dtype == dtype
        del h, w, loss
    chunks = math.ceil(n / (chunk_size or default_chunk_size(n, vocab, dtype, torch.device(DEVICE))))
    slack = {BF16: 2.0 ** -8, FP32: 1e-6}[dtype] * math.sqrt(chunks)
    for name, fused, unfused in zip(("loss", "grad hidden", "grad weight"), results["fused"], results["unfused"]):
        assert fused <= 2 * unfused + slack, (name, fused, unfused, slack)


# ---------------------------------------------------------------- apply_prsl on a tiny VLM


# (loss, gradients): relative errors allowed; see the test's docstring.
VLM_TOL = {BF16: (1e-3, 2.0 ** -5), FP32: (1e-6, 1e-5)}


@pytest.mark.skipif(TRITON_DEVICE is None, reason="Triton runs neither compiled nor interpreted here")
@pytest.mark.parametrize("dtype", [BF16, FP32], ids=["bf16", "fp32"])
def test_apply_prsl_tiny_vlm(dtype):
    """A tiny random LLaVA on the Triton device, patched with apply_prsl (fused head): its loss
    and every parameter's gradient against the same model unpatched, with PRSL taken by the
    float64 reference on its logits (their gradient cast back to the model's dtype by autograd,
    as the kernel rounds its own).

    Both sides run the same network and differ only by where the head's output and its
    gradient are rounded. In fp32 that is float32 rounding: 1e-6 on the loss, 1e-5 normwise on
    the gradients (measured in the interpreter: 6e-8 and 4e-7). In bf16 every op of the
    backward rounds again to 8 bits, so one different rounding at the head spreads as bf16
    units (2^-8 = 4e-3) through the layers: 2^-5 normwise (measured: up to 9e-3); the loss
    sees the same bf16 logits, 1e-3 (a logit off by one bf16 unit moves it by less). A gradient
    that is zero in exact arithmetic (CLIP's attention key bias) is rounding noise: norms are
    floored at 1% of the largest parameter gradient's."""
    import tiny_models

    from prsl_kernels.hf import align_labels
    from prsl_kernels.hf_patch import apply_prsl

    if "llava" not in tiny_models.ARCHITECTURES:
        pytest.skip("this transformers has no LlavaForConditionalGeneration")
    model, batch = tiny_models.build("llava", dtype=dtype)
    model = model.to(DEVICE)
    batch = {key: value.to(DEVICE) for key, value in batch.items()}
    inputs = {key: value for key, value in batch.items() if key != "labels"}

    logits = model(**inputs).logits
    want_loss = ref.prsl_loss_reference(logits.double(), align_labels(batch["labels"], True), K, B)
    want_loss.backward()
    want = {name: p.grad.double() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    apply_prsl(model, K, B, backend="triton")
    out = model(**batch)
    assert getattr(out, "logits", None) is None  # the fused head: no N x V logits
    out.loss.backward()
    loss_tol, grad_tol = VLM_TOL[dtype]
    assert abs(out.loss.item() - want_loss.item()) <= loss_tol * abs(want_loss.item())
    floor = 1e-2 * max(g.norm().item() for g in want.values())
    for name, p in model.named_parameters():
        if name not in want:  # no gradient unpatched (CLIP's unused post-layernorm): none here either
            assert p.grad is None or not p.grad.any(), name
            continue
        assert p.grad is not None, name
        error = (p.grad.double() - want[name]).norm().item() / max(want[name].norm().item(), floor)
        assert error <= grad_tol, (name, error)
