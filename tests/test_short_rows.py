"""Short rows and tile edges on the Triton kernels (interpreter), against the float64 oracle.

The gradient tiles start 16-byte aligned, up to VEC - 1 elements before the row, and
only the row's first and last tiles are masked. A tile narrower than VEC (V = 1..4 in
16-bit, V = 1..2 in float32) put the first unmasked tile before the row: its gradient
was written over the previous rows and read from them. Here every dtype runs V = 1..5
and VEC - 1, VEC, VEC + 1, plus the backward's one-tile / two-tile edge (2048) and
rows streamed in several forced small tiles, each with contiguous and padded row
strides (rows starting at every offset mod VEC), "none" / "mean" / "sum", the gradient
in place and not. The padding between rows must come back untouched.
"""

import pytest
import torch

from conftest import backend_device
from float64_oracle import Oracle, row_weights, worst_ratio
from prsl_kernels import prsl_loss

# The Triton backend on its device: CPU tensors through the interpreter, CUDA tensors compiled
# (where the race of tiles outside the row, between programs, is real).

VEC = {torch.float16: 8, torch.bfloat16: 8, torch.float32: 4, torch.float64: 2}
SENTINEL = 7.0  # in the padding between rows: any gradient written there shows


def _cases():
    cases = []
    for dtype, vec in VEC.items():
        for vocab in sorted({1, 2, 3, 4, 5, vec - 1, vec, vec + 1}):
            cases.append(pytest.param(dtype, vocab, None, id=f"{str(dtype)[6:]}-V{vocab}"))
    for dtype in (torch.bfloat16, torch.float32):
        for vocab in (2047, 2048, 2049):  # the backward's 2048-wide tiles: one or two of them
            cases.append(pytest.param(dtype, vocab, None, id=f"{str(dtype)[6:]}-V{vocab}"))
        vec = VEC[dtype]
        for vocab in (2 * vec + 1, 4 * vec + 1):  # several tiles of the forced VEC-wide tile size
            cases.append(pytest.param(dtype, vocab, vec, id=f"{str(dtype)[6:]}-V{vocab}-tile{vec}"))
    return cases


def _rows(dtype, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    n = 5
    logits = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 3
    target = torch.randint(0, vocab, (n,), generator=gen)
    target[0], target[1] = 0, vocab - 1  # the row's two ends
    target[2] = int(logits[2].argmax())
    target[4] = -100  # the last row: the counted rows before it start at the most offsets mod VEC
    if vocab > 2:
        logits[3, torch.arange(vocab) % 3 == 1] = float("-inf")  # masked, never the target
        target[3] = 0
        logits[1, : vocab // 2] = torch.randint(-1, 2, (vocab // 2,), generator=gen).double()  # ties
    return logits.to(dtype), target, gen


def _laid_out(values, pad, device):
    """A leaf holding ``values`` with rows ``pad`` elements apart beyond V, the padding set to SENTINEL."""
    n, vocab = values.shape
    stride = vocab + pad
    storage = torch.full(((n - 1) * stride + vocab,), SENTINEL, dtype=values.dtype, device=device)
    x = storage.as_strided((n, vocab), (stride, 1))
    x.copy_(values)
    return storage, x.detach().requires_grad_(True)


def _padding(storage, n, vocab, pad):
    if pad == 0:
        return storage[:0]
    stride = vocab + pad
    return storage[: (n - 1) * stride].reshape(n - 1, stride)[:, vocab:]


@pytest.mark.parametrize("dtype,vocab,tile", _cases())
def test_short_rows_and_tile_edges(block_width, dtype, vocab, tile):
    device = backend_device("triton")
    block_width(tile)
    logits, target, gen = _rows(dtype, vocab, seed=vocab)
    target_on = target.to(device)
    n = logits.shape[0]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    top = min(vocab - 1, 40)  # k = V - 1 on short rows; the long ones are about their tiles
    # (reduction, pad, in place, k, b): every reduction, padded and contiguous rows, k = 0 .. V - 1.
    runs = [("none", 1 + vocab % 3, False, top, 0.5), ("mean", 0, True, min(1, top), -0.3),
            ("sum", 3, True, top // 2, 1.0), ("sum", 0, False, top, 0.5)]
    for reduction, pad, inplace, k, b in runs:
        storage, x = _laid_out(logits, pad, device)
        loss = prsl_loss(x, target_on, k, b, reduction=reduction, backend="triton", inplace_backward=inplace)
        upstream = torch.randn(loss.shape, generator=gen, dtype=acc) if reduction == "none" else \
            torch.tensor(1.0 if reduction == "sum" else 0.7, dtype=acc)
        loss.backward(upstream.to(device))
        oracle = Oracle(logits, target, k, b)
        want_loss, loss_tol = oracle.loss(reduction)
        rescale = 1.0 if reduction == "none" else float(upstream)
        want_grad, grad_tol = oracle.grad(row_weights(reduction, upstream, target), rescale)
        where = f"{reduction}, pad {pad}, inplace {inplace}, k {k}"
        got_grad = x.grad.cpu()
        loss_ratio, _ = worst_ratio(loss.detach().cpu(), want_loss, loss_tol)
        grad_ratio, at = worst_ratio(got_grad, want_grad, grad_tol)
        assert loss_ratio <= 1, f"{where}: loss error {loss_ratio:.3g} x tol"
        assert grad_ratio <= 1, f"{where}: gradient error {grad_ratio:.3g} x tol at {divmod(at, vocab)}: " \
            f"{got_grad.reshape(-1)[at].item()} vs {want_grad.reshape(-1)[at].item()}"
        assert (got_grad[target == -100] == 0).all()
        assert (_padding(storage, n, vocab, pad) == SENTINEL).all(), f"{where}: the padding between rows was written"
