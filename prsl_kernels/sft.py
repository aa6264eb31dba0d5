"""PRSL in TRL's ``SFTTrainer``: :class:`PRSLSFTTrainer`.

TRL (1.x) computes the SFT loss itself: at start-up ``SFTTrainer`` gives the model a fused LM
head of its own and trains ``-log p(target)`` from it, so neither ``model.loss_function`` nor
:func:`prsl_kernels.hf.apply_prsl` would be called (the guard of ``apply_prsl`` raises at the
first step rather than let it train cross-entropy). ``PRSLSFTTrainer`` keeps everything else of
``SFTTrainer`` (datasets, chat templates, completion-only and assistant-only masks, packing, PEFT,
VLM collators) and takes the loss from the model, which :func:`apply_prsl` has made PRSL::

    from prsl_kernels.sft import PRSLSFTTrainer
    trainer = PRSLSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, prsl={"k": 20, "b": 1.0})

``prsl``: the keyword arguments of :func:`apply_prsl` (``fused_linear=True`` by default: no logits
are built). Without it the model must already be patched. TRL's own loss choices that would
silently replace PRSL (``loss_type="dft"``, ``label_smoothing_factor``, ``compute_loss_func``)
are refused. The logs gain ``ce``, ``penalty`` (mean ``b * D``), ``mean_token_accuracy`` and ``entropy``
(the mean softmax entropy of the counted tokens).
"""

from __future__ import annotations

import transformers
from trl import SFTTrainer

from .hf_patch import applied_prsl, apply_prsl, base_model


class PRSLSFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` whose training loss is the model's PRSL loss (see the module docstring)."""

    def __init__(self, *args, prsl: dict | None = None, **kwargs):
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("PRSLSFTTrainer: compute_loss_func would replace PRSL; the loss is the model's own")
        super().__init__(*args, **kwargs)
        if self.args.loss_type != "nll":
            raise ValueError(f"PRSLSFTTrainer: loss_type={self.args.loss_type!r} is TRL's own loss; PRSL replaces it "
                             f"(leave loss_type='nll')")
        if self.args.label_smoothing_factor:
            raise ValueError("PRSLSFTTrainer: use PRSL's label_smoothing option (prsl={..., 'label_smoothing': eps}) "
                             "rather than label_smoothing_factor, which TRL applies to its own loss")
        base = base_model(self.model)
        # SFTTrainer replaced base.forward (an instance attribute) by its fused head; the class's
        # forward, which apply_prsl wraps, computes the loss again.
        base.__dict__.pop("forward", None)
        if prsl is not None:
            self.prsl_loss = apply_prsl(self.model, **prsl)
        elif applied_prsl(self.model) is not None:
            self.prsl_loss = applied_prsl(self.model)
        else:
            raise ValueError("PRSLSFTTrainer: pass prsl={'k': ..., 'b': ...} or call apply_prsl(model, k, b) first")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs["use_cache"] = False
        # Trainer's own compute_loss: model(**inputs, num_items_in_batch=...).loss, scaled for
        # average_tokens_across_devices as it does for any model that takes loss kwargs.
        return transformers.Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                                 num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        return transformers.Trainer.prediction_step(self, model, inputs, prediction_loss_only,
                                                    ignore_keys=ignore_keys)

    def log(self, logs, start_time=None):
        stats = self.prsl_loss.pop_stats()
        if stats is not None:
            prefix = "eval_" if next(iter(logs), "").startswith("eval_") else ""
            logs.update({f"{prefix}ce": stats["ce"], f"{prefix}penalty": stats["penalty"],
                         f"{prefix}mean_token_accuracy": stats["accuracy"], f"{prefix}entropy": stats["entropy"]})
        super().log(logs, start_time)


__all__ = ["PRSLSFTTrainer"]
