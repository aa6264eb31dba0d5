"""The tiny models of tests/tiny_models.py run, train and are reproducible."""

import pytest
import torch

import tiny_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("name", tiny_models.ARCHITECTURES)
def test_forward_backward(name):
    model, batch = tiny_models.build(name)
    labels = batch["labels"]
    assert labels.shape == batch["input_ids"].shape
    targets = labels[labels != -100]
    assert targets.numel() > 0
    # Only ordinary text is ever a target: no image placeholder, marker or padding.
    assert ((targets >= tiny_models.TEXT[0]) & (targets < tiny_models.TEXT[1])).all()

    out = model(**batch)
    assert out.logits.shape == (*labels.shape, tiny_models.V)
    assert out.logits.dtype == torch.float64
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", tiny_models.ARCHITECTURES)
def test_deterministic_by_seed(name):
    (m0, b0), (m1, b1) = tiny_models.build(name, seed=3), tiny_models.build(name, seed=3)
    assert all(torch.equal(b0[k], b1[k]) for k in b0)
    assert all(torch.equal(p, q) for p, q in zip(m0.parameters(), m1.parameters()))
    _, other = tiny_models.build(name, seed=4)
    assert not torch.equal(b0["input_ids"], other["input_ids"])


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("name", tiny_models.ARCHITECTURES)
def test_tie_word_embeddings(name, tie):
    if name == "mllama" and tie:
        pytest.skip("Mllama's input embedding has 8 rows more than its LM head")
    model, _ = tiny_models.build(name, tie_word_embeddings=tie)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tie
