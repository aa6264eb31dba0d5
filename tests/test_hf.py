"""Hugging Face hooks (prsl_kernels/hf.py) against the reference and the spec's reductions."""

import pytest
import torch

from prsl_kernels.hf import (CEComputeLoss, PRSLComputeLoss, PRSLTokenLoss, align_labels,
                             prsl_loss_function)
from prsl_reference import prsl_loss_reference, prsl_released_loss_reference

V = 40


def _batch(seed, batch=3, seq=7, vocab=V, n_ignored=4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    flat = labels.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[:n_ignored]] = -100
    return logits, labels


def test_align_labels():
    labels = torch.tensor([[1, 2, 3, -100], [4, 5, -100, -100]])
    assert torch.equal(align_labels(labels, shift=False), labels)
    assert torch.equal(align_labels(labels, shift=True), torch.tensor([[2, 3, -100, -100], [5, -100, -100, -100]]))


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("shift", [False, True])
def test_token_loss_matches_reference(shift, backend):
    logits, labels = _batch(0)
    k, b = 5, 0.7
    fn = PRSLTokenLoss(k, b, shift=shift, backend=backend)
    x = logits.clone().requires_grad_(True)
    loss = fn(x, labels)
    (grad,) = torch.autograd.grad(loss, x)

    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1) if shift else labels
    y = logits.clone().requires_grad_(True)
    expected = prsl_loss_reference(y, targets, k, b)
    (expected_grad,) = torch.autograd.grad(expected, y)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_num_items_in_batch_makes_accumulation_exact():
    """Two micro-batches normalised by the step's token count == one batch's mean."""
    logits, labels = _batch(1, batch=4)
    k, b = 4, 1.3
    fn = PRSLTokenLoss(k, b, shift=True, backend="reference")
    n_items = (labels[:, 1:] != -100).sum()
    x = logits.clone().requires_grad_(True)
    accumulated = fn(x[:2], labels[:2], n_items) + fn(x[2:], labels[2:], n_items)
    (grad_acc,) = torch.autograd.grad(accumulated, x)
    y = logits.clone().requires_grad_(True)
    whole = fn(y, labels)
    (grad_whole,) = torch.autograd.grad(whole, y)
    torch.testing.assert_close(accumulated, whole)
    torch.testing.assert_close(grad_acc, grad_whole)


def test_stats_split_ce_and_penalty():
    logits, labels = _batch(2)
    k, b = 6, 2.0
    fn = PRSLTokenLoss(k, b, shift=False, backend="reference")
    loss = fn(logits, labels)
    stats = fn.pop_stats()
    ce = torch.nn.functional.cross_entropy(logits.view(-1, V), labels.view(-1))
    assert stats["tokens"] == int((labels != -100).sum())
    assert stats["ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert stats["penalty"] > 0
    assert stats["ce"] + stats["penalty"] == pytest.approx(loss.item(), rel=1e-5)
    assert fn.pop_stats() is None  # reset after reading

    fn(logits[:1], labels[:1])
    fn(logits[1:], labels[1:])
    both = fn.pop_stats()  # running sums over calls == one call on everything
    assert both["ce"] == pytest.approx(stats["ce"], rel=1e-5)
    assert both["penalty"] == pytest.approx(stats["penalty"], rel=1e-5)


def test_ce_compute_loss_is_torch_cross_entropy():
    logits, labels = _batch(3)
    fn = CEComputeLoss(shift=True)
    out = {"logits": logits}
    loss = fn(out, labels)
    targets = align_labels(labels, True)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.view(-1, V), targets.view(-1)))
    assert fn.pop_stats()["penalty"] == 0.0
    n = (targets != -100).sum() + 5
    torch.testing.assert_close(fn(out, labels, n), torch.nn.functional.cross_entropy(
        logits.view(-1, V), targets.view(-1), reduction="sum") / n)


def test_compute_loss_func_with_tuple_outputs_and_no_labels():
    logits, labels = _batch(4)
    fn = PRSLComputeLoss(3, 0.5, shift=False, backend="reference")
    torch.testing.assert_close(fn((logits,), labels), prsl_loss_reference(logits, labels, 3, 0.5))
    with pytest.raises(ValueError, match="labels"):
        fn((logits,), None)


def test_released_variant_matches_reference():
    logits, labels = _batch(5)
    fn = PRSLTokenLoss(6, 0.3, shift=False, variant="released", start=1)
    loss = fn(logits, labels)
    expected = prsl_released_loss_reference(logits.view(-1, V), labels.view(-1), 1, 6, 0.3)
    torch.testing.assert_close(loss, expected)
    stats = fn.pop_stats()
    assert stats["ce"] + stats["penalty"] == pytest.approx(loss.item(), rel=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        PRSLTokenLoss(3, 1.0, shift=False, variant="paperish")
    with pytest.raises(ValueError, match="k must be"):
        PRSLTokenLoss(-1, 1.0, shift=False)


def test_loss_function_hook_on_a_causal_lm():
    """``model.loss_function = prsl_loss_function(k, b)`` makes an HF causal LM train on PRSL."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    g = torch.Generator().manual_seed(6)
    input_ids = torch.randint(0, V, (2, 9), generator=g)
    labels = input_ids.clone()
    labels[0, :3] = -100
    k, b = 5, 0.9
    model.loss_function = prsl_loss_function(k, b, backend="reference")
    out = model(input_ids=input_ids, labels=labels)
    expected = prsl_loss_reference(out.logits, align_labels(labels, True), k, b)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.transformer.wte.weight.grad.abs().sum() > 0
    stats = model.loss_function.pop_stats()
    assert stats["penalty"] > 0 and stats["tokens"] == int((align_labels(labels, True) != -100).sum())
    # HF may pass already shifted targets (padding-free collators): used as they are.
    torch.testing.assert_close(model.loss_function(out.logits, None, V, shift_labels=align_labels(labels, True)),
                               expected)
    assert model.loss_function.pop_stats()["tokens"] == stats["tokens"]  # logged like the shifting path
