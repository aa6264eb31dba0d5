"""The hot path's hidden costs and the in-place guards.

* The fused linear loss scales its V x H weight gradient (and the N x H / V ones) in the
  backward only when the upstream gradient is not exactly 1.
* A divisor held on the host (Hugging Face's ``num_items_in_batch``) is read there, not
  copied to the logits' device (a blocking copy).
* ``default_chunk_size`` asks CUDA for its free memory once per device, not every call.
* Writing the gradient over logits whose rows share memory, or into a ``grad_out`` that
  partly overlaps the logits, is refused with an error that names the argument.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import needs_interpreter
from prsl_kernels import cpp_kernels, linear, linear_prsl_loss, loss, prsl_loss
from prsl_kernels import triton_kernels as tk

BACKENDS = [pytest.param("cpp", marks=pytest.mark.skipif(not cpp_kernels.available(),
                                                         reason="C++ extension unavailable")),
            pytest.param("triton", marks=needs_interpreter)]  # CPU tensors: the interpreter


class _Writes(TorchDispatchMode):
    """Records the in-place multiplications run under it, by the shape they write."""

    def __init__(self):
        super().__init__()
        self.scaled = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mul_.Tensor, torch.ops.aten.mul_.Scalar):
            self.scaled.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_loss_scales_its_gradients_only_when_the_upstream_is_not_one(backend):
    gen = torch.Generator().manual_seed(0)
    n, hidden_size, vocab = 6, 8, 40
    hidden = torch.randn(n, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen)
    bias = torch.randn(vocab, generator=gen)
    target = torch.randint(0, vocab, (n,), generator=gen)
    grads = {}
    for upstream in (1.0, 2.5):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        value = linear_prsl_loss(*leaves[:2], target, 6, 0.5, bias=leaves[2], backend=backend)
        with _Writes() as writes:
            value.backward(torch.tensor(upstream))
        grads[upstream] = [t.grad for t in leaves]
        if upstream == 1.0:
            assert writes.scaled == [], "a pass over the gradients that multiplies them by 1"
        else:
            assert sorted(writes.scaled) == sorted([(n, hidden_size), (vocab, hidden_size), (vocab,)])
    for one, scaled in zip(grads[1.0], grads[2.5]):
        torch.testing.assert_close(scaled, one * 2.5)


def test_host_divisor_is_read_on_the_host_not_copied_to_the_device():
    on_device = torch.empty(2, 3, device="meta")  # any device but the CPU: no copy may be made to it
    divisor = torch.tensor(17)
    value = loss._divisor_on(divisor, on_device)
    assert value == 17 and not torch.is_tensor(value)
    # Already on the logits' device: kept there (in the stats dtype), no host read.
    kept = loss._divisor_on(torch.tensor(17, device="meta"), on_device)
    assert torch.is_tensor(kept) and kept.device.type == "meta" and kept.dtype == torch.float32


@needs_interpreter  # the Triton backend on CPU tensors
def test_host_divisor_value():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 30, generator=gen)
    target = torch.randint(0, 30, (5,), generator=gen)
    want = prsl_loss(logits, target, 4, 0.5, reduction="sum", backend="reference") / 7
    for divisor in (7, torch.tensor(7), torch.tensor([7.0])):
        got = prsl_loss(logits, target, 4, 0.5, reduction="sum", backend="triton", divisor=divisor)
        torch.testing.assert_close(got, want)


def test_chunk_size_reads_free_memory_once_per_device(monkeypatch):
    calls = []

    def mem_get_info(device=None):
        calls.append(device)
        return 1 << 30, 1 << 34

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(linear, "_CUDA_FREE_BUDGET", {})
    for _ in range(3):
        for device in (torch.device("cuda", 0), torch.device("cuda"), torch.device("cuda", 1)):
            # 1 GiB free: a budget of 64 MiB > CHUNK_BYTES, so 48 MiB of bf16 rows of 50257.
            assert linear.default_chunk_size(100000, 50257, torch.bfloat16, device) == 496
    assert calls == [0, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_refuses_overlapping_rows(backend):
    base = torch.randn(1, 30, requires_grad=True)
    logits = base.expand(4, 30)  # every row is the same memory
    target = torch.tensor([1, 2, 3, 4])
    with pytest.raises(ValueError, match="rows of logits overlap"):
        prsl_loss(logits, target, 4, 0.5, backend=backend, inplace_backward=True)
    # Out of place the same logits are only read: fine.
    prsl_loss(logits, target, 4, 0.5, backend=backend).backward()
    assert base.grad.shape == (1, 30)


@needs_interpreter  # the Triton launcher on CPU tensors
def test_forward_grad_refuses_a_grad_out_that_overlaps_the_logits():
    gen = torch.Generator().manual_seed(2)
    storage = torch.randn(5, 40, generator=gen)
    logits = storage[:4]
    target = torch.randint(0, 40, (4,), generator=gen)
    grad_rows = torch.ones(4)
    with pytest.raises(ValueError, match="grad_out partly overlaps logits"):
        tk.forward_grad(logits, target, grad_rows, storage[1:], 4, 0.5, -100)  # shifted by one row
    with pytest.raises(ValueError, match="grad_out partly overlaps logits"):
        tk.forward_grad(logits, target, grad_rows, storage.view(-1)[3:163].view(4, 40), 4, 0.5, -100)
    with pytest.raises(ValueError, match="grad_out's rows overlap"):
        tk.forward_grad(logits, target, grad_rows, torch.zeros(1, 40).expand(4, 40), 4, 0.5, -100)
    # The in-place gradient (grad_out is logits) and a separate buffer are what it is for.
    want = tk.forward_grad(logits.clone(), target, grad_rows, torch.empty(4, 40), 4, 0.5, -100)
    got = tk.forward_grad(logits, target, grad_rows, logits, 4, 0.5, -100)
    torch.testing.assert_close(got, want)
