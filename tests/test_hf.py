"""Hugging Face hooks (prsl_kernels/hf.py) against the reference and the spec's reductions."""

import pytest
import torch

from prsl_kernels.hf import (CEComputeLoss, PRSLComputeLoss, PRSLTokenLoss, align_labels,
                             apply_prsl_fused_linear, prsl_loss_function, remove_prsl_fused_linear)
from reference import prsl_loss_reference, prsl_released_loss_reference

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


def test_num_items_in_batch_needs_no_scaling_pass(monkeypatch):
    """The fused path divides by num_items_in_batch inside the loss's gradient: the backward's
    upstream is exactly 1, so it does not rescale the N x V gradient; loss and gradient equal the
    reference's, and the logged sums are the undivided ones."""
    from prsl_kernels import function

    seen = []
    original = function.scale_unless_one
    monkeypatch.setattr(function, "scale_unless_one", lambda grad, scale: (seen.append(float(scale)),
                                                                           original(grad, scale)))
    logits, labels = _batch(2, batch=3)
    k, b = 4, 1.3
    n_items = (labels[:, 1:] != -100).sum() + 5  # as if other micro-batches counted 5 more
    fn = PRSLTokenLoss(k, b, shift=True, backend="cpp")
    x = logits.clone().requires_grad_(True)
    loss = fn(x, labels, n_items)
    loss.backward()
    assert seen == [1.0]
    y = logits.clone().requires_grad_(True)
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    want = prsl_loss_reference(y, targets, k, b, reduction="sum") / n_items
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-12)
    stats = fn.pop_stats()  # means over this batch's counted tokens, not over n_items
    assert stats["tokens"] == int((targets != -100).sum())
    assert (stats["ce"] + stats["penalty"]) * stats["tokens"] == pytest.approx(float(want * n_items), rel=1e-6)


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


# --------------------------------------------------------------------------- fused linear + PRSL patch

def _tiny_bundles():
    from prsl_kernels.drivers import data, models

    size = models.TinySize(hidden=32, heads=2, encoder_layers=1, decoder_layers=1, num_query_tokens=4)
    corpus = data.synthetic_corpus()
    return {preset: models.tiny_bundle(preset, corpus, size=size, vocab_size=300) for preset in models.PRESETS}


@pytest.fixture(scope="module")
def tiny_bundles():
    return _tiny_bundles()


def _model_and_batch(bundles, preset, dtype=torch.float64, seed=0, n=4):
    import copy

    from prsl_kernels.drivers import data

    bundle = bundles[preset]
    model = copy.deepcopy(bundle.model).to(dtype)
    if hasattr(model, "query_tokens"):
        # The fresh BLIP-2 starts its query tokens at zero, where the Q-Former's first LayerNorm has
        # a ~1/sqrt(eps) gradient (1e16 in float64): give them the spread trained ones have.
        with torch.no_grad():
            model.query_tokens.copy_(torch.randn(model.query_tokens.shape, dtype=torch.float64,
                                                 generator=torch.Generator().manual_seed(seed)).to(dtype))
    batch = bundle.batch(data.vqa_examples(data.synthetic_dataset(n, seed=seed))[:n])
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return bundle, model, batch


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", ["tiny-vit-gpt2", "tiny-blip2-opt"])
def test_fused_linear_patch_matches_unfused(tiny_bundles, preset):
    """The drivers' models (ViT-GPT2, BLIP-2 OPT) patched: the same loss and gradients as the
    logits path in float64, no logits with labels, the unchanged logits without."""
    bundle, model, batch = _model_and_batch(tiny_bundles, preset)
    labels = batch.pop("labels")
    k, b = 5, 0.8
    n_items = (align_labels(labels, bundle.shift_labels) != -100).sum() + 3  # a larger step total
    unfused = PRSLTokenLoss(k, b, shift=bundle.shift_labels, backend="reference")
    plain = model(**batch)
    want = unfused(plain.logits, labels, n_items)
    want.backward()
    want_grads = _grads(model)
    model.zero_grad()

    token_loss = apply_prsl_fused_linear(model, k, b)
    assert token_loss.shift == bundle.shift_labels  # the model class's alignment
    out = model(**batch, labels=labels, num_items_in_batch=n_items)
    assert out.logits is None
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=0)
    out.loss.backward()
    grads = _grads(model)
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        # float64 rounding relative to each tensor's scale, and an absolute floor for gradients that are zero in exact arithmetic (attention key biases).
        scale = want_grads[name].abs().max().item()
        torch.testing.assert_close(g, want_grads[name], rtol=0, atol=1e-9 * scale + 1e-12, msg=name)
    stats = token_loss.pop_stats()
    assert stats["tokens"] == int((align_labels(labels, bundle.shift_labels) != -100).sum()) and stats["penalty"] > 0

    with torch.no_grad():  # inference: the logits as before
        torch.testing.assert_close(model(**batch).logits, plain.logits.detach())
        as_tuple = model(**batch, labels=labels, num_items_in_batch=n_items, return_dict=False)
    torch.testing.assert_close(as_tuple[0], want.detach())  # HF's tuple convention: loss first

    remove_prsl_fused_linear(model)
    with torch.no_grad():
        assert model(**batch, labels=labels).logits is not None  # HF's own loss path again


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_fused_linear_patch_on_plain_causal_lms(family):
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    torch.manual_seed(1)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    else:
        model = OPTForCausalLM(OPTConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                         num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=16))
    model = model.double().eval()  # no dropout: the two forwards below see the same network
    g = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, V, (2, 9), generator=g)
    labels = input_ids.clone()
    labels[1, :4] = -100
    want = prsl_loss_reference(model(input_ids=input_ids).logits, align_labels(labels, True), 4, 0.6)
    apply_prsl_fused_linear(model, 4, 0.6)
    out = model(input_ids=input_ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=0)
    # HF's shift_labels (already aligned targets) are used as they are.
    torch.testing.assert_close(model(input_ids=input_ids, shift_labels=align_labels(labels, True)).loss, want,
                               rtol=1e-12, atol=0)


def test_fused_linear_patch_rejects_unverified_models():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32))
    with pytest.raises(NotImplementedError, match="apply_prsl supports models whose training loss"):
        apply_prsl_fused_linear(model, 3, 0.5)


def _peak_bytes_and_largest(step):
    """Peak live CPU memory (torch profiler's allocation records) and the largest storage (bytes)
    an op returned (storage, not numel: an expanded view costs nothing)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils._python_dispatch import TorchDispatchMode

    largest = [0]

    class Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    largest[0] = max(largest[0], t.untyped_storage().nbytes())
            return out

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with Largest():
            step()
    # Every allocation and free, in order (the FunctionEvent list keeps only the unattributed ones).
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]")
    assert records, "the profiler recorded no allocations"
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak, largest[0]


def test_fused_linear_never_builds_logits_and_lowers_peak_memory(tiny_bundles):
    """Training step (forward + backward) of the tiny captioner with a vocabulary large enough for
    the logits to matter: with the patch no tensor reaches B x T x V elements, and the peak is lower."""
    import copy

    from transformers import GPT2LMHeadModel

    bundle, model, batch = _model_and_batch(tiny_bundles, "tiny-vit-gpt2", dtype=torch.float32, n=8)
    labels = batch.pop("labels")
    vocab = 20000  # a wider head on the same decoder (hidden 32): logits 8 x 42 x 20000 x 4 B = 27 MB
    decoder = model.decoder
    decoder.resize_token_embeddings(vocab)
    assert isinstance(decoder, GPT2LMHeadModel)
    patched = copy.deepcopy(model)
    loss_fn = PRSLTokenLoss(6, 0.5, shift=False)
    # A chunk of 64 rows (of 8 x ~26): the automatic one would cover all rows at this size, as the
    # chunk budget (64 MiB per buffer on CPU) exceeds these logits.
    apply_prsl_fused_linear(patched, 6, 0.5, chunk_size=64)
    logits_bytes = labels.numel() * vocab * 4

    def unfused_step():
        loss_fn(model(**batch).logits, labels).backward()

    def fused_step():
        patched(**batch, labels=labels).loss.backward()

    unfused_peak, unfused_largest = _peak_bytes_and_largest(unfused_step)
    fused_peak, fused_largest = _peak_bytes_and_largest(fused_step)
    assert unfused_largest >= logits_bytes
    assert fused_largest < logits_bytes / 2
    # The unfused step holds the logits and their gradient (2 x 27 MB) at once; the fused one
    # holds chunk buffers and the head's gradient (20000 x 32 x 4 B = 2.6 MB) instead.
    assert fused_peak < unfused_peak - logits_bytes, (fused_peak, unfused_peak)


@pytest.mark.parametrize("preset", ["tiny-vit-gpt2", "tiny-blip2-opt"])
def test_fused_linear_identical_sgd_training(tiny_bundles, preset):
    """Five SGD steps with and without the patch (float32): the same loss curve and weights.
    The two paths differ only in float32 summation order (chunked matmuls, the kernels' own
    row order), ~1e-6 relative per step; SGD is linear in the gradient, so after 5 steps at
    lr 0.05 parameters agree to well within 1e-4 relative (measured: ~1e-6)."""
    import copy

    from prsl_kernels.drivers import data

    bundle, model, _ = _model_and_batch(tiny_bundles, preset, dtype=torch.float32)
    patched = copy.deepcopy(model)
    apply_prsl_fused_linear(patched, 6, 0.5)
    loss_fn = PRSLTokenLoss(6, 0.5, shift=bundle.shift_labels)
    opt_a = torch.optim.SGD(model.parameters(), lr=0.05)
    opt_b = torch.optim.SGD(patched.parameters(), lr=0.05)
    curve_a, curve_b = [], []
    for step in range(5):
        batch = bundle.batch(data.vqa_examples(data.synthetic_dataset(4, seed=100 + step))[:4])
        labels = batch.pop("labels")
        for m, opt, curve, fused in ((model, opt_a, curve_a, False), (patched, opt_b, curve_b, True)):
            opt.zero_grad()
            loss = m(**batch, labels=labels).loss if fused else loss_fn(m(**batch).logits, labels)
            loss.backward()
            opt.step()
            curve.append(loss.item())
    torch.testing.assert_close(torch.tensor(curve_b), torch.tensor(curve_a), rtol=1e-5, atol=0)
    assert curve_a[-1] < curve_a[0]  # it trained
    for (name, a), (_, b) in zip(model.named_parameters(), patched.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


def test_finetune_fused_linear_by_default_and_opt_out(tmp_path):
    """prsl-finetune trains through the fused patch by default; --no-fused-linear builds the logits.
    With SGD (the update is linear in the gradient) both give the same loss curve and weights,
    to float32 summation order (see test_fused_linear_identical_sgd_training)."""
    import json

    from safetensors.torch import load_file

    from prsl_kernels.drivers import finetune

    assert finetune.parse_args(["--output-dir", str(tmp_path / "x")]).fused_linear
    assert not finetune.parse_args(["--output-dir", str(tmp_path / "x"), "--no-fused-linear"]).fused_linear
    runs = {}
    for fused in (True, False):
        cfg = finetune.FinetuneConfig(
            output_dir=str(tmp_path / f"fused-{fused}"), train_images=32, eval_images=4, eval_samples=4, hidden=32,
            layers=1, heads=2, batch_size=8, max_steps=4, lr=0.05, optim="sgd", warmup_ratio=0.0,
            schedule="constant", logging_steps=1, progress=False, vocab_size=300, train_references="first",
            max_new_tokens=4, loss="prsl", k=6, b=0.5, fused_linear=fused)
        out = finetune.train(cfg)
        log = [json.loads(line) for line in (out / finetune.LOG_FILE).read_text().splitlines()]
        runs[fused] = ([r["loss"] for r in log if "loss" in r and "ce" in r],
                       load_file(str(out / "model.safetensors")))
    (curve_f, weights_f), (curve_u, weights_u) = runs[True], runs[False]
    assert len(curve_f) == 4
    torch.testing.assert_close(torch.tensor(curve_f), torch.tensor(curve_u), rtol=1e-5, atol=0)
    assert weights_f.keys() == weights_u.keys()
    for name in weights_f:
        torch.testing.assert_close(weights_f[name], weights_u[name], rtol=1e-4, atol=1e-6, msg=name)
