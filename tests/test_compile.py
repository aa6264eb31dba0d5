"""prsl_loss under torch.compile(fullgraph=True) on CPU: one graph, same numbers as eager.

The C++ kernels are opaque torch.library ops with fake implementations, so
dynamo traces through the public API (validation, backend choice, autograd
Function) without a break and inductor calls the kernels as extern ops.
"""

import pytest
import torch

from prsl_kernels import cpp_kernels, prsl_loss

pytestmark = pytest.mark.skipif(not cpp_kernels.available(),
                                reason=f"C++ extension unavailable: {cpp_kernels.build_error()}")


class TinyLM(torch.nn.Module):
    def __init__(self, hidden=16, vocab=97):
        super().__init__()
        self.proj = torch.nn.Linear(hidden, vocab)

    def forward(self, x, target):
        return prsl_loss(self.proj(x), target, 6, 0.5, backend="cpp")


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 16, generator=g)
    target = torch.randint(0, 97, (3, 5), generator=g)
    target[1, 2] = -100
    return x, target


def _loss_and_grads(model, x, target):
    model.zero_grad()
    loss = model(x, target)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_compiled_matches_eager_without_graph_breaks():
    torch.manual_seed(0)
    model = TinyLM()
    x, target = _batch(1)

    explanation = torch._dynamo.explain(model)(x, target)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    eager_loss, eager_grads = _loss_and_grads(model, x, target)
    compiled_loss, compiled_grads = _loss_and_grads(compiled, x, target)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    # A second batch of the same shape reuses the compiled graph.
    x2, target2 = _batch(2)
    eager_loss, eager_grads = _loss_and_grads(model, x2, target2)
    compiled_loss, compiled_grads = _loss_and_grads(compiled, x2, target2)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
