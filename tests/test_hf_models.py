"""apply_prsl on today's architectures (tests/tiny_models.py: tiny random models of each).

Per architecture, tied and untied heads, fused and unfused: the patched model's loss and every
parameter's gradient equal PRSL (the reference implementation) on the unpatched model's own
logits, in float64; no logits-sized tensor is built by the fused path; inference is unchanged;
labels that HF would refuse are refused; an all-ignored batch gives zero gradients.
"""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tiny_models
from prsl_kernels.hf import align_labels, apply_prsl, remove_prsl
from reference import prsl_loss_reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K, B = 5, 0.7
VOCAB = 101
# Mllama's input embedding has 8 rows more than its head: it cannot be tied.
TIES = [(name, tie) for name in tiny_models.ARCHITECTURES for tie in (False, True)
        if not (name == "mllama" and tie)]


def _reference(model, batch):
    """PRSL on the unpatched model's own logits: the last labels.shape[1] positions (all of them,
    except in BLIP-2, whose query tokens come first and which scores the labels' positions)."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    labels = batch["labels"]
    logits = model(**inputs).logits
    loss = prsl_loss_reference(logits[:, -labels.shape[1]:], align_labels(labels, True), K, B)
    model.zero_grad()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads, logits.detach()


def _assert_grads_equal(model, want, rel=1e-9):
    got = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    overall = max(g.abs().max().item() for g in want.values())
    for name, g in got.items():
        # Relative to each tensor's scale, with a floor for tensors that are zero in exact arithmetic
        # (float64 rounding of the other paths' sums leaves ~1e-17 there).
        scale = want[name].abs().max().item()
        torch.testing.assert_close(g, want[name], rtol=0, atol=rel * scale + 1e-14 * overall, msg=name)


class _LogitsSized(TorchDispatchMode):
    """The most rows any op output of shape (..., V) has, skipping outputs shaped like a parameter
    or its transpose (the head's weight, its gradient, GPT-2's (H, 3H) attention weight at V = 3H)."""

    def __init__(self, vocab, model):
        super().__init__()
        self.vocab, self.rows = vocab, 0
        self.skip = {s for p in model.parameters() for s in (tuple(p.shape), tuple(p.shape)[::-1])}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab \
                    and tuple(t.shape) not in self.skip:
                # Storage, not numel: an expanded view (a shape check's stand-in) costs nothing.
                self.rows = max(self.rows, t.untyped_storage().nbytes() // (self.vocab * t.element_size()))
        return out


@pytest.mark.parametrize("name,tie", TIES)
def test_patched_model_equals_prsl_on_its_own_logits(name, tie):
    model, batch = tiny_models.build(name, tie_word_embeddings=tie)
    # A vocabulary no other dimension of the tiny models shares (V = 96 = 3 H would also match
    # GPT-2's fused QKV projections), so that (..., V) outputs are logits-like.
    model.resize_token_embeddings(VOCAB, mean_resizing=False)
    want, want_grads, logits = _reference(model, batch)
    head = model.get_output_embeddings()
    assert head.out_features == VOCAB and (head.weight is model.get_input_embeddings().weight) == tie

    for fused in (True, False):
        patched = copy.deepcopy(model)
        loss_fn = apply_prsl(patched, K, B, fused_linear=fused, chunk_size=8)
        if fused:
            with _LogitsSized(head.out_features, patched) as seen:
                out = patched(**batch)
                out.loss.backward()
            # Chunks of 8 rows: never the logits of the batch's ~30 rows, nor half of them.
            assert 0 < seen.rows <= 8, seen.rows
            assert out.logits is None
        else:
            out = patched(**batch)
            out.loss.backward()
        torch.testing.assert_close(out.loss, want, rtol=1e-9, atol=0)
        _assert_grads_equal(patched, want_grads)
        stats = loss_fn.pop_stats()
        assert stats["penalty"] > 0 and stats["tokens"] == int((align_labels(batch["labels"], True) != -100).sum())

        with torch.no_grad():  # inference (what generate runs): the model's own logits, bit for bit
            inputs = {key: value for key, value in batch.items() if key != "labels"}
            assert torch.equal(patched(**inputs).logits, logits)


@pytest.mark.parametrize("name", tiny_models.ARCHITECTURES)
def test_all_ignored_batch_gives_zero_gradients(name):
    """Every label ignored (an answer truncated away): HF's CE gives a NaN loss and zero gradients;
    so does PRSL in both paths, never NaN gradients."""
    model, batch = tiny_models.build(name, dtype=torch.float32)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    hf_loss = model(**batch).loss
    for fused in (True, False):
        patched = copy.deepcopy(model)
        apply_prsl(patched, K, B, fused_linear=fused)
        out = patched(**batch, num_items_in_batch=torch.tensor(0))
        assert torch.isnan(out.loss) == torch.isnan(hf_loss)
        out.loss.backward()
        grads = [p.grad for p in patched.parameters() if p.grad is not None]
        assert grads and all(torch.equal(g, torch.zeros_like(g)) for g in grads), name


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt", "llava", "qwen2_vl", "blip2"])
def test_labels_of_another_length_behave_as_unpatched(name):
    """Labels one token short: HF raises for causal LMs (the patch too, rather than a misaligned
    finite loss); BLIP-2 scores the last labels.shape[1] positions (the patch does the same)."""
    model, batch = tiny_models.build(name)
    batch["labels"] = batch["labels"][:, 1:]
    try:
        model(**batch)
        unpatched_raises = False
    except ValueError:
        unpatched_raises = True
    assert unpatched_raises == (name != "blip2")
    want, want_grads, _ = (None, None, None) if unpatched_raises else _reference(model, batch)
    patched = copy.deepcopy(model)
    apply_prsl(patched, K, B)
    if unpatched_raises:
        with pytest.raises(ValueError, match="do not match the logits' positions"):
            patched(**batch)
    else:
        out = patched(**batch)
        torch.testing.assert_close(out.loss, want, rtol=1e-9, atol=0)
        out.loss.backward()
        _assert_grads_equal(patched, want_grads)


def test_logits_to_keep_and_shift_labels_are_honoured():
    """``logits_to_keep`` slices the hidden states before the head; ``shift_labels`` (context
    parallel collators) are used as aligned targets: both as HF's own loss reads them."""
    model, batch = tiny_models.build("qwen2")
    labels = batch.pop("labels")
    keep = 6
    logits = model(**batch, logits_to_keep=keep).logits
    want = prsl_loss_reference(logits, align_labels(labels[:, -keep:], True), K, B)
    patched = copy.deepcopy(model)
    apply_prsl(patched, K, B)
    got = patched(**batch, labels=labels[:, -keep:], logits_to_keep=keep).loss
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    shifted = align_labels(labels, True)
    full = prsl_loss_reference(model(**batch).logits, shifted, K, B)
    torch.testing.assert_close(patched(**batch, shift_labels=shifted).loss, full, rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", ["gemma2", "paligemma2"])
def test_model_softcap_read_from_config_and_never_doubled(name):
    model, batch = tiny_models.build(name)
    cap = model.config.get_text_config().final_logit_softcapping
    assert cap is not None
    with pytest.raises(ValueError, match="already caps its logits"):
        apply_prsl(copy.deepcopy(model), K, B, softcap=cap)
    # The cap matters here: PRSL on the uncapped logits is another number.
    want, _, logits = _reference(model, batch)
    assert logits.abs().max() < cap
    patched = copy.deepcopy(model)
    apply_prsl(patched, K, B)
    torch.testing.assert_close(patched(**batch).loss, want, rtol=1e-9, atol=0)


def test_unknown_logit_transform_is_refused():
    """A model that changes its logits after the head in a way its config does not say (here a
    hook doubling the head's output): the fused path raises, as it could not be exact, and points
    to fused_linear=False, which is exact on the model's own (doubled) logits."""
    model, batch = tiny_models.build("llama")
    model.get_output_embeddings().register_forward_hook(lambda module, inputs, output: output * 2)
    want, _, _ = _reference(model, batch)
    patched = copy.deepcopy(model)
    apply_prsl(patched, K, B)
    with pytest.raises(NotImplementedError, match="fused_linear=False"):
        patched(**batch)
    apply_prsl(patched, K, B, fused_linear=False)
    torch.testing.assert_close(patched(**batch).loss, want, rtol=1e-9, atol=0)


def test_peft_lora_model_is_patched_and_the_frozen_head_gets_no_gradient():
    peft = pytest.importorskip("peft")
    model, batch = tiny_models.build("llava")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                             init_lora_weights=False)  # random B: the adapters change the logits
    lora = peft.get_peft_model(copy.deepcopy(model), config)
    want, want_grads, _ = _reference(lora, batch)
    patched = peft.get_peft_model(copy.deepcopy(model), config)
    patched.load_state_dict(lora.state_dict())
    apply_prsl(patched, K, B)
    out = patched(**batch)
    assert out.logits is None
    torch.testing.assert_close(out.loss, want, rtol=1e-9, atol=0)
    out.loss.backward()
    _assert_grads_equal(patched, want_grads)
    assert patched.get_base_model().get_output_embeddings().weight.grad is None
    assert any("lora_" in name for name in want_grads)


def test_gradient_checkpointing_gives_the_same_gradients():
    model, batch = tiny_models.build("qwen2_vl")
    want, want_grads, _ = _reference(model, batch)
    patched = copy.deepcopy(model)
    patched.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patched.train()  # checkpointing is active in training mode (the tiny configs have no dropout)
    apply_prsl(patched, K, B)
    out = patched(**batch)
    out.loss.backward()
    torch.testing.assert_close(out.loss, want, rtol=1e-9, atol=0)
    _assert_grads_equal(patched, want_grads)


def test_a_forward_that_bypasses_prsl_raises():
    """Never silently off: a forward with labels whose loss did not go through PRSL (here the
    instance's forward replaced, as TRL's SFTTrainer does) raises at that step."""
    model, batch = tiny_models.build("llama")
    apply_prsl(model, K, B)
    original = type(model).forward.__wrapped__
    model.forward = lambda *args, **kwargs: original(model, *args, **kwargs)  # HF's own loss: CE
    with pytest.raises(RuntimeError, match="computed its loss without it"):
        model(**batch)
    with pytest.raises(RuntimeError, match="PRSLSFTTrainer"):
        model(**batch, fused_lm_head=True)
    del model.forward
    model(**batch)  # through PRSL again
    remove_prsl(model)
    model.forward = lambda *args, **kwargs: original(model, *args, **kwargs)
    assert torch.isfinite(model(**batch).loss)  # not applied any more: no guard


def test_bad_b_and_lora_head_are_refused():
    model, _ = tiny_models.build("llama")
    for b in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="b must be finite"):
            apply_prsl(model, K, b)
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(TypeError, match="LM head"):
        apply_prsl(lora, K, B)


@pytest.mark.parametrize("name", ["llama", "llava"])
def test_generation_is_unchanged(name):
    model, batch = tiny_models.build(name)
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    want = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tiny_models.PAD)
    apply_prsl(model, K, B)
    got = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tiny_models.PAD)
    assert torch.equal(got, want)
