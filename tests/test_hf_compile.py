"""torch.compile of a model patched by apply_prsl: no graph break added over the unpatched model,
and the same training step as eager (loss and every gradient).

Llama compiles to one graph (``fullgraph=True``). The VLMs do not, patched or not: transformers'
own input checks (``torch_compilable_check``) read tensors on the host, so PaliGemma is compiled
with graph breaks and held to the unpatched model's count."""

import copy

import pytest
import torch

import tiny_models
from prsl_kernels import cpp_kernels
from prsl_kernels.hf import apply_prsl

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not cpp_kernels.available(), reason="the C++ kernels are the CPU backend")]

K, B = 5, 20.0


def _breaks(model, batch):
    # The first explain of a process also counts transformers' one-time set-up (its output
    # capturing hooks): counted twice, the second is the steady state.
    counts = []
    for _ in range(2):
        torch._dynamo.reset()
        counts.append(torch._dynamo.explain(model)(**batch).graph_break_count)
    return counts[-1]


def _step(call, model, batch):
    """One training step of ``call`` (the model or its compiled form): loss and ``model``'s gradients."""
    model.zero_grad(set_to_none=True)
    loss = call(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name, fused", [("llama", True), ("llama", False), ("paligemma", True)],
                         ids=["llama-fused", "llama-logits", "paligemma-fused"])
def test_compiled_patched_model_trains_as_eager(name, fused):
    model, batch = tiny_models.build(name, dtype=torch.float32, seed=3)
    model.train()
    unpatched_breaks = _breaks(model, batch)
    apply_prsl(model, K, B, fused_linear=fused)
    assert _breaks(model, batch) == unpatched_breaks
    assert name != "llama" or unpatched_breaks == 0

    eager_loss, eager_grads = _step(model, model, batch)
    compiled_model = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, fullgraph=unpatched_breaks == 0)
    for _ in range(2):  # the second step reuses the compiled graph
        loss, grads = _step(compiled, compiled_model, batch)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=0)
        assert grads.keys() == eager_grads.keys()
        # rel 1e-5 of the model's largest gradient entry: float32 sums in another order, nothing
        # more. Not per tensor: some gradients are exactly zero in exact arithmetic (an attention
        # key bias: softmax ignores a constant shift), so what both give there is rounding noise.
        scale = max(g.abs().max() for g in eager_grads.values())
        for key, grad in grads.items():
            torch.testing.assert_close(grad / scale, eager_grads[key] / scale, rtol=0, atol=1e-5, msg=key)
    assert eager_grads  # the step trained something


def test_traced_path_refuses_logits_sliced_after_the_head():
    # Under torch.compile the fused path reads only shapes (storage offsets do not trace), so a
    # model that slices its logits after the head must be refused there, with the way out.
    from prsl_kernels.hf_patch import _traced_rows

    hidden = torch.randn(2, 7, 4)
    with pytest.raises(NotImplementedError, match="fused_linear=False"):
        _traced_rows(None, hidden[:, 2:, :0], hidden, "Blip2ForConditionalGeneration")
