"""apply_prsl through the trainers people use: HF Trainer, TRL's SFTTrainer (text and VLM batches,
LoRA); the first logged loss is PRSL on that batch (and not CE), and TRL's own loss is refused
rather than trained silently."""

import copy

import pytest
import torch

import tiny_models
from prsl_kernels.hf import align_labels, apply_prsl
from reference import prsl_loss_reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K, B = 5, 20.0  # random weights give near-uniform softmaxes: a large b makes the penalty visible


def _prsl_and_ce(model, batch):
    """PRSL and CE (mean over the counted tokens) of ``batch`` on the unpatched ``model``'s logits."""
    with torch.no_grad():
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        logits = model(**inputs).logits
        targets = align_labels(batch["labels"], True)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return prsl_loss_reference(logits, targets, K, B).item(), ce.item()


def _entropy(model, batch):
    """The float64 softmax entropy of the unpatched ``model``'s logits, mean over the counted tokens."""
    with torch.no_grad():
        logits = model(**{key: batch[key] for key in ("input_ids", "attention_mask")}).logits.double()
        targets = align_labels(batch["labels"], True)
        h = torch.special.entr(torch.softmax(logits, -1)).sum(-1)
        return float(h[targets != -100].mean())


def _rows(batch):
    return [{key: value[i] for key, value in batch.items()} for i in range(batch["input_ids"].shape[0])]


def _stack(rows):
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def _first_loss(trainer):
    trainer.train()
    return next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)


def _args(cls, tmp_path, **extra):
    settings = dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, logging_steps=1,
                    report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, learning_rate=1e-3,
                    remove_unused_columns=False)
    return cls(**{**settings, **extra})


def test_hf_trainer_trains_prsl(tmp_path):
    from transformers import Trainer, TrainingArguments

    model, batch = tiny_models.build("llava", dtype=torch.float32)
    want, ce = _prsl_and_ce(model, batch)
    apply_prsl(model, K, B)
    trainer = Trainer(model=model, args=_args(TrainingArguments, tmp_path), train_dataset=_rows(batch),
                      data_collator=_stack)
    got = _first_loss(trainer)
    assert got == pytest.approx(want, rel=1e-5)
    assert abs(got - ce) > 1e-3 * ce  # the penalty is really in it


def _text_setup():
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from prsl_kernels.drivers.models import train_tokenizer

    prompts = ["a red circle on the left of", "a blue square in the middle of", "two green triangles near",
               "the small yellow star above"]
    completions = [" the grey box", " a white plate", " the tall tree", " a black cat"]
    tokenizer = train_tokenizer(prompts + completions, vocab_size=300)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    return model, tokenizer, Dataset.from_dict({"prompt": prompts, "completion": completions})


class _Recording:
    """A data collator that keeps the batches it makes (to score the first one independently)."""

    def __init__(self, collator):
        self.collator, self.batches = collator, []

    def __call__(self, examples):
        batch = self.collator(examples)
        self.batches.append({key: value.clone() for key, value in batch.items() if torch.is_tensor(value)})
        return batch


def test_sft_trainer_text_with_completion_only_loss_trains_prsl(tmp_path):
    pytest.importorskip("trl")
    from trl import SFTConfig

    from prsl_kernels.sft import PRSLSFTTrainer

    model, tokenizer, dataset = _text_setup()
    initial = copy.deepcopy(model)
    trainer = PRSLSFTTrainer(model=model, args=_args(SFTConfig, tmp_path, per_device_train_batch_size=4),
                             train_dataset=dataset, processing_class=tokenizer, prsl={"k": K, "b": B})
    trainer.data_collator = _Recording(trainer.data_collator)
    got = _first_loss(trainer)
    first = trainer.data_collator.batches[0]
    assert (first["labels"] == -100).any() and (first["labels"] != -100).any()  # the prompts are masked
    want, ce = _prsl_and_ce(initial, {k: first[k] for k in ("input_ids", "attention_mask", "labels")})
    assert got == pytest.approx(want, rel=1e-5)
    assert abs(got - ce) > 1e-3 * ce
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert logged["penalty"] > 0 and logged["ce"] + logged["penalty"] == pytest.approx(got, rel=1e-5)
    # The mean softmax entropy over the counted tokens, against float64 on the same float32 logits:
    # float32 accumulation (tests/test_entropy.py's bound, about 1e-5 of H at these |z| < 5, V = 300)
    # plus the fused head's chunked matmul rounding differently from the model's (as for the loss).
    assert logged["entropy"] == pytest.approx(_entropy(initial, first), rel=1e-5)


def test_sft_trainer_vlm_batches_with_lora_train_prsl(tmp_path):
    peft = pytest.importorskip("peft")
    pytest.importorskip("trl")
    from trl import SFTConfig

    from prsl_kernels.drivers.models import train_tokenizer
    from prsl_kernels.sft import PRSLSFTTrainer

    from datasets import Dataset

    model, batch = tiny_models.build("idefics3", dtype=torch.float32)
    want, ce = _prsl_and_ce(model, batch)  # LoRA starts as the identity (B = 0)
    args = _args(SFTConfig, tmp_path, dataset_kwargs={"skip_prepare_dataset": True})
    dataset = Dataset.from_list([{key: value.tolist() for key, value in row.items()} for row in _rows(batch)])
    trainer = PRSLSFTTrainer(model=model, args=args, train_dataset=dataset.with_format("torch"), data_collator=_stack,
                             processing_class=train_tokenizer(["a tiny tokenizer"], vocab_size=64),
                             peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                             prsl={"k": K, "b": B})
    assert isinstance(trainer.model, peft.PeftModel)
    head = trainer.model.get_base_model().get_output_embeddings()
    got = _first_loss(trainer)
    assert got == pytest.approx(want, rel=1e-5)
    assert abs(got - ce) > 1e-3 * ce
    assert head.weight.grad is None and not head.weight.requires_grad  # the frozen head: no V x H gradient


def test_sft_trainer_own_loss_is_refused_not_silently_trained(tmp_path):
    pytest.importorskip("trl")
    from trl import SFTConfig, SFTTrainer

    from prsl_kernels.sft import PRSLSFTTrainer

    model, tokenizer, dataset = _text_setup()
    apply_prsl(model, K, B)  # then plain SFTTrainer: TRL's fused head would train CE
    trainer = SFTTrainer(model=model, args=_args(SFTConfig, tmp_path), train_dataset=dataset,
                         processing_class=tokenizer)
    with pytest.raises(RuntimeError, match="PRSLSFTTrainer"):
        trainer.train()
    with pytest.raises(ValueError, match="loss_type"):
        PRSLSFTTrainer(model=model, args=_args(SFTConfig, tmp_path / "dft", loss_type="dft"), train_dataset=dataset,
                       processing_class=tokenizer, prsl={"k": K, "b": B})
    with pytest.raises(ValueError, match="label_smoothing"):
        PRSLSFTTrainer(model=model, args=_args(SFTConfig, tmp_path / "ls", label_smoothing_factor=0.1),
                       train_dataset=dataset, processing_class=tokenizer, prsl={"k": K, "b": B})
