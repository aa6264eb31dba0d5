"""Where users meet apply_prsl: bad labels, settings that would replace PRSL, models it cannot
serve, and evaluation on the fused path. Each is a clear error at the step (or at patch time),
never a silent other loss or NaN weights."""

import pytest
import torch

import tiny_models
from prsl_kernels import backends
from prsl_kernels.hf import PRSLComputeLoss, apply_prsl, prsl_loss_function

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K, B = 5, 20.0
V = tiny_models.V

_BACKENDS = ["cpp"] + (["triton"] if backends.triton_interpreter_on() and backends.triton_available() else [])


def _bad_labels(batch, row, position, value):
    labels = batch["labels"].clone()
    labels[row, position] = value
    return {**batch, "labels": labels}


def _params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "logits"])
@pytest.mark.parametrize("value", [V, V + 7, -5])
def test_out_of_range_label_names_its_batch_and_position(backend, fused, value):
    model, batch = tiny_models.build("llama", dtype=torch.float32, seed=1)
    model.train()
    apply_prsl(model, K, B, fused_linear=fused, backend=backend)
    before = _params(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    bad = _bad_labels(batch, 1, 6, value)
    with pytest.raises(ValueError, match=rf"found {value} at labels\[1, 6\]"):
        model(**bad).loss.backward()
    optimizer.step()  # nothing to apply: no gradient was made
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    # The same batch with a valid label trains, and its loss is finite.
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_position_is_the_users_labels_not_the_shifted_row():
    # labels[0, 6] is the target of logits[0, 5]: the message must still say labels[0, 6].
    model, batch = tiny_models.build("llava", dtype=torch.float32)
    apply_prsl(model, K, B)
    with pytest.raises(ValueError, match=r"labels\[0, 6\]"):
        model(**_bad_labels(batch, 0, 6, V + 1))


def test_label_check_can_be_turned_off_and_the_cpu_kernel_still_refuses():
    model, batch = tiny_models.build("llama", dtype=torch.float32)
    apply_prsl(model, K, B, backend="cpp", check_target=False)
    with pytest.raises(RuntimeError, match="out of range"):
        model(**_bad_labels(batch, 0, 6, V + 1))


@pytest.mark.parametrize("make", [lambda: prsl_loss_function(K, B), lambda: PRSLComputeLoss(K, B, shift=True)],
                         ids=["loss_function", "compute_loss_func"])
def test_hooks_check_labels_by_default(make):
    logits = torch.randn(2, 9, V)
    labels = torch.randint(0, V, (2, 9))
    labels[1, 4] = V
    loss = make()
    with pytest.raises(ValueError, match=r"labels\[1, 4\]"):
        if isinstance(loss, PRSLComputeLoss):
            loss({"logits": logits}, labels)
        else:
            loss(logits, labels)


@pytest.mark.parametrize("k", [V, V + 10, -1])
def test_apply_prsl_checks_k_against_the_heads_vocabulary(k):
    model, _ = tiny_models.build("llama", dtype=torch.float32)
    with pytest.raises(ValueError, match=rf"k must be an int in \[0, V-1\] = \[0, {V - 1}\].*got k={k}"):
        apply_prsl(model, k, B)
    apply_prsl(model, V - 1, B)  # the largest k is accepted


def _t5():
    import transformers

    config = transformers.T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                   decoder_start_token_id=0, pad_token_id=0)
    return transformers.T5ForConditionalGeneration(config)


def _bart():
    import transformers

    config = transformers.BartConfig(vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                     decoder_ffn_dim=32, max_position_embeddings=32)
    return transformers.BartForConditionalGeneration(config)


@pytest.mark.parametrize("make", [_t5, _bart], ids=["t5", "bart"])
def test_encoder_decoder_models_are_refused_at_patch_time(make):
    model = make()
    with pytest.raises(NotImplementedError, match="encoder-decoder"):
        apply_prsl(model, K, B)
    assert "_prsl_patch" not in model.__dict__


# --------------------------------------------------------------------------- Trainer settings


def _rows(batch):
    return [{key: value[i] for key, value in batch.items()} for i in range(batch["input_ids"].shape[0])]


def _stack(rows):
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def _trainer(tmp_path, model, batch, **settings):
    from transformers import Trainer, TrainingArguments

    trainer_kwargs = {key: settings.pop(key) for key in ("compute_loss_func", "compute_metrics") if key in settings}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                             per_device_eval_batch_size=2, logging_steps=1, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, remove_unused_columns=False, **settings)
    return Trainer(model=model, args=args, train_dataset=_rows(batch), eval_dataset=_rows(batch),
                   data_collator=_stack, **trainer_kwargs)


def test_trainer_label_smoothing_is_refused_with_prsls_option(tmp_path):
    model, batch = tiny_models.build("llama", dtype=torch.float32)
    apply_prsl(model, K, B)
    trainer = _trainer(tmp_path, model, batch, label_smoothing_factor=0.1)
    before = _params(model)
    with pytest.raises(RuntimeError, match=r"label_smoothing_factor.*apply_prsl\(model, k, b, label_smoothing=0.1\)"):
        trainer.train()
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name


def test_trainer_compute_loss_func_is_refused(tmp_path):
    model, batch = tiny_models.build("llama", dtype=torch.float32)
    apply_prsl(model, K, B)
    calls = []

    def other_loss(outputs, labels, num_items_in_batch=None):
        calls.append(1)
        return outputs.logits.float().logsumexp(-1).mean()

    trainer = _trainer(tmp_path, model, batch, compute_loss_func=other_loss)
    with pytest.raises(RuntimeError, match="compute_loss_func"):
        trainer.train()
    assert not calls


def test_a_trainer_subclass_that_computes_its_own_loss_is_refused(tmp_path):
    from transformers import Trainer

    class OwnLoss(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            logits = model(**inputs).logits
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    model, batch = tiny_models.build("llama", dtype=torch.float32)
    apply_prsl(model, K, B)
    trainer = _trainer(tmp_path, model, batch)
    trainer.__class__ = OwnLoss
    with pytest.raises(RuntimeError, match="OwnLoss.compute_loss called it in training without labels"):
        trainer.train()


def test_the_unpatched_model_still_trains_with_those_settings(tmp_path):
    # The refusal is about PRSL being replaced, not about the settings themselves.
    model, batch = tiny_models.build("llama", dtype=torch.float32)
    apply_prsl(model, K, B)
    from prsl_kernels.hf import remove_prsl

    remove_prsl(model)
    _trainer(tmp_path, model, batch, label_smoothing_factor=0.1).train()


# --------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("name", ["llama", "llava"])
def test_eval_forward_returns_the_argmax_predictions(name):
    model, batch = tiny_models.build(name, dtype=torch.float64, seed=2)
    with torch.no_grad():
        logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
    apply_prsl(model, K, B)
    with torch.no_grad():
        out = model(**batch)
    assert out.get("logits") is None
    assert torch.equal(out.predictions, logits.argmax(-1))
    assert out.to_tuple()[-1] is out.predictions
    # Training forwards pay nothing for it.
    assert model(**batch).get("predictions") is None


def test_eval_predictions_can_be_turned_off():
    model, batch = tiny_models.build("llama", dtype=torch.float32)
    apply_prsl(model, K, B, eval_predictions=False)
    with torch.no_grad():
        assert model(**batch).get("predictions") is None


def test_trainer_evaluate_gives_compute_metrics_the_predictions(tmp_path):
    model, batch = tiny_models.build("llama", dtype=torch.float32, seed=4)
    with torch.no_grad():
        logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
    apply_prsl(model, K, B)
    seen = {}

    def compute_metrics(prediction):
        preds, labels = prediction.predictions, prediction.label_ids
        seen["preds"] = preds
        counted = labels[:, 1:] != -100  # predictions[:, t] is the guess for labels[:, t + 1]
        return {"accuracy": float((preds[:, :-1] == labels[:, 1:])[counted].mean())}

    metrics = _trainer(tmp_path, model, batch, compute_metrics=compute_metrics).evaluate()
    want = logits.argmax(-1)
    preds = torch.from_numpy(seen["preds"])
    assert preds.shape == want.shape
    # float32: the chunked matmul may round differently from the full one, so only positions whose
    # top two logits are clearly apart (1e-4, against float32 errors of ~1e-7 here) must agree.
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-4
    assert clear.float().mean() > 0.8
    assert torch.equal(preds[clear], want[clear])
    counted = batch["labels"][:, 1:] != -100
    accuracy = (preds[:, :-1] == batch["labels"][:, 1:])[counted].float().mean().item()
    assert metrics["eval_accuracy"] == pytest.approx(accuracy)
    assert "eval_loss" in metrics
