"""Hugging Face hooks: PRSL as a model ``loss_function`` or a ``Trainer(compute_loss_func=...)``.

Alignment: in a causal LM (GPT-2, OPT, BLIP-2's OPT) ``logits[:, t]`` predicts
``labels[:, t + 1]``; in a ``VisionEncoderDecoderModel`` (decoder fed
``[bos] + text``) ``logits[:, t]`` predicts ``labels[:, t]``. We shift the
*labels* (``labels[:, 1:]`` padded with ``ignore_index``), never the logits,
so no ``N x V`` copy of the logits is made.

Normalisation follows Hugging Face's ``ForCausalLMLoss``: with
``num_items_in_batch`` (the number of counted tokens over all the micro-batches
of one optimiser step) the loss is ``sum / num_items_in_batch``, so gradient
accumulation is exact; without it, the mean over counted tokens.

Fused linear + PRSL (issue 10): :func:`apply_prsl_fused_linear` patches a model
so that ``model(..., labels=labels).loss`` is computed from the LM head's input
(the last hidden states) by ``linear_prsl_loss``: the N x V logits are never
built when labels are given (``.logits`` is then None); without labels the model
is unchanged and returns its logits. Covered: ``GPT2LMHeadModel``,
``OPTForCausalLM``, ``VisionEncoderDecoderModel`` with a GPT-2 decoder and
``Blip2ForConditionalGeneration`` with an OPT language model (what the drivers train).

Only the public API (``prsl_loss``, ``linear_prsl_loss``) is used here.

Example (any HF causal LM)::

    model.loss_function = prsl_loss_function(k=20, b=0.5)          # model(..., labels=...) -> PRSL
    trainer = Trainer(model, args, compute_loss_func=PRSLComputeLoss(k=20, b=0.5, shift=True), ...)
    loss_fn = apply_prsl_fused_linear(model, k=20, b=0.5)          # fused: no logits in training
"""

from __future__ import annotations

import functools
import inspect

import torch

from .linear import linear_prsl_loss
from .loss import prsl_loss
from .spec import IGNORE_INDEX, stats_dtype
from .validation import check_options


def align_labels(labels: torch.Tensor, shift: bool, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Targets aligned with the logits: ``labels`` itself, or shifted left by one for causal LMs."""
    if not shift:
        return labels
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)


def _normalise(loss_sum, count, num_items_in_batch):
    denom = num_items_in_batch if num_items_in_batch is not None else count
    if torch.is_tensor(denom):
        denom = denom.to(loss_sum.device)
    return loss_sum / denom


class PRSLTokenLoss:
    """Token-level PRSL from ``(logits, labels)``; keeps detached running sums of CE and the penalty.

    ``loss = CE + b * D`` summed over counted tokens, divided by ``num_items_in_batch``
    when given (else by the counted tokens). ``variant="released"`` computes the
    authors' released-code penalty instead (reference PyTorch, for comparison;
    ``k`` is then the window end, ``start`` its start). ``k == 0`` or ``b == 0``
    is plain cross-entropy.

    The options ``label_smoothing``, ``z_loss`` and ``softcap`` are those of
    :func:`prsl_loss` (fused kernels; "ce" is then the loss minus ``b * D``).

    The running sums (``ce_sum``, ``penalty_sum``, ``tokens``, correct tokens) are
    device tensors, accumulated without host syncs; :meth:`pop_stats` reads and
    resets them.
    """

    def __init__(self, k: int, b: float, *, shift: bool, ignore_index: int = IGNORE_INDEX, backend: str = "auto",
                 variant: str = "paper", start: int = 0, check_target: bool = False, label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: float | None = None):
        if variant not in ("paper", "released"):
            raise ValueError(f"variant must be 'paper' or 'released', got {variant!r}")
        if int(k) < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        check_options(label_smoothing, z_loss, softcap)
        self.options = {"label_smoothing": label_smoothing, "z_loss": z_loss, "softcap": softcap}
        self._has_options = bool(label_smoothing or z_loss or softcap is not None)
        if variant == "released" and self._has_options:
            raise ValueError("label_smoothing / z_loss / softcap are not available with variant='released'")
        self.k, self.b, self.shift, self.ignore_index = int(k), float(b), bool(shift), int(ignore_index)
        self.backend, self.variant, self.start, self.check_target = backend, variant, int(start), check_target
        self._sums = None

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None, *,
                 aligned: bool = False) -> torch.Tensor:
        """``aligned=True``: ``labels`` already line up with ``logits`` (HF's ``shift_labels``)."""
        targets = labels.to(logits.device)
        if not aligned:
            targets = align_labels(targets, self.shift, self.ignore_index)
        if (self.k == 0 or self.b == 0) and not self._has_options:
            # Plain cross-entropy: torch's own kernel, the baseline a user would compare against.
            loss_sum = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                         ignore_index=self.ignore_index, reduction="sum")
            loss_sum = loss_sum.to(stats_dtype(logits.dtype))  # the loss dtype of prsl_loss
            count = (targets != self.ignore_index).sum()
            self._record(loss_sum, loss_sum.new_zeros(()), count, self._correct_sum(logits, targets))
            return _normalise(loss_sum, count, num_items_in_batch)
        if self.variant == "released":
            loss_sum, ce_sum, penalty_sum, count = self._released(logits, targets)
            correct_sum = self._correct_sum(logits, targets)
        else:
            loss_sum, stats = prsl_loss(logits, targets, self.k, self.b, ignore_index=self.ignore_index,
                                        reduction="sum", backend=self.backend, check_target=self.check_target,
                                        return_stats=True, **self.options)
            counted = (targets != self.ignore_index).reshape(-1)
            penalty_sum = self.b * (stats.dist * counted).sum()
            ce_sum = loss_sum.detach() - penalty_sum
            count = counted.sum()
            correct_sum = stats.correct.sum()  # 0 on ignored rows
        self._record(ce_sum, penalty_sum, count, correct_sum)
        return _normalise(loss_sum, count, num_items_in_batch)

    def _correct_sum(self, logits, targets):
        """Tokens whose target logit is the row maximum (ties count), as ``RowStats.correct``:
        one extra max over the logits, for the paths that do not run the fused kernels."""
        with torch.no_grad():
            flat, t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
            counted = t != self.ignore_index
            z_s = flat.gather(1, torch.where(counted, t, 0)[:, None]).squeeze(1)
            return ((z_s >= flat.max(-1).values) & counted).sum()

    def _released(self, logits, targets):
        from prsl_reference import prsl_released_loss_reference

        counted = targets != self.ignore_index
        count = counted.sum()
        flat_logits, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        ce_sum = torch.nn.functional.cross_entropy(flat_logits.float(), flat_targets,
                                                   ignore_index=self.ignore_index, reduction="sum")
        # The released loss is mean CE + b * (a penalty over the batch's rows); written as a
        # sum over counted rows it is ce_sum + b * penalty * count.
        total = prsl_released_loss_reference(flat_logits, flat_targets, self.start, self.k, self.b,
                                             ignore_index=self.ignore_index)
        ce_mean = ce_sum / count.clamp_min(1)
        penalty_batch = total - ce_mean
        loss_sum = ce_sum + penalty_batch * count
        return loss_sum, ce_sum.detach(), (penalty_batch * count).detach(), count

    def _record(self, ce_sum, penalty_sum, count, correct_sum):
        vals = torch.stack([ce_sum.detach().float(), torch.as_tensor(penalty_sum).detach().float().to(ce_sum.device),
                            count.detach().float().to(ce_sum.device), correct_sum.detach().float().to(ce_sum.device)])
        self._sums = vals if self._sums is None else self._sums + vals

    def pop_stats(self) -> dict | None:
        """``{"ce": mean CE, "penalty": mean b*D, "tokens": n, "accuracy": token accuracy}`` since
        the last call (None if no call). Accuracy: the target's logit is the row maximum (ties count)."""
        if self._sums is None:
            return None
        ce, pen, n, correct = self._sums.tolist()
        self._sums = None
        n = max(n, 1.0)
        return {"ce": ce / n, "penalty": pen / n, "tokens": int(n), "accuracy": correct / n}


def prsl_loss_function(k: int, b: float, *, shift: bool = True, ignore_index: int = IGNORE_INDEX,
                       backend: str = "auto", label_smoothing: float = 0.0, z_loss: float = 0.0,
                       softcap: float | None = None) -> PRSLTokenLoss:
    """A drop-in for a model's ``loss_function`` (signature of HF's ``ForCausalLMLoss``).

    ``model.loss_function = prsl_loss_function(k, b)`` makes ``model(..., labels=labels).loss``
    PRSL for any HF causal LM (``shift=True``, the default). ``shift_labels``, when HF passes it,
    is used as the already aligned targets. The options are those of :func:`prsl_loss`.
    """
    token_loss = PRSLTokenLoss(k, b, shift=shift, ignore_index=ignore_index, backend=backend,
                               label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)

    class _LossFunction:
        def __call__(self, logits, labels=None, vocab_size=None, num_items_in_batch=None,
                     ignore_index=ignore_index, shift_labels=None, **kwargs):
            if shift_labels is not None:
                return token_loss(logits, shift_labels, num_items_in_batch, aligned=True)
            return token_loss(logits, labels, num_items_in_batch)

        pop_stats = staticmethod(token_loss.pop_stats)
        token = token_loss

        def __repr__(self):
            return f"prsl_loss_function(k={token_loss.k}, b={token_loss.b}, shift={token_loss.shift})"

    return _LossFunction()


class PRSLComputeLoss(PRSLTokenLoss):
    """For ``Trainer(compute_loss_func=...)``: called as ``(outputs, labels, num_items_in_batch)``."""

    def __call__(self, outputs, labels, num_items_in_batch=None):
        if labels is None:
            raise ValueError("PRSLComputeLoss needs labels in the batch")
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        return super().__call__(logits, labels, num_items_in_batch)


class CEComputeLoss(PRSLComputeLoss):
    """Plain cross-entropy (``torch.nn.functional.cross_entropy``), logged like the PRSL runs."""

    def __init__(self, *, shift: bool, ignore_index: int = IGNORE_INDEX, backend: str = "auto", **options):
        # options (label_smoothing, z_loss, softcap): then the fused kernels with k = 0, not torch's CE.
        super().__init__(0, 0.0, shift=shift, ignore_index=ignore_index, backend=backend, **options)


class PRSLLinearTokenLoss(PRSLTokenLoss):
    """Token-level PRSL from hidden states and an LM head's weight, by ``linear_prsl_loss``.

    Same normalisation and running CE / penalty sums as :class:`PRSLTokenLoss`; the logits
    are never materialised. ``k == 0`` or ``b == 0`` is plain (fused) cross-entropy.
    """

    def __init__(self, k: int, b: float, *, shift: bool, ignore_index: int = IGNORE_INDEX, backend: str = "auto",
                 chunk_size: int | None = None, check_target: bool = False, **options):
        super().__init__(k, b, shift=shift, ignore_index=ignore_index, backend=backend, check_target=check_target,
                         **options)
        self.chunk_size = chunk_size

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None, *,
                 bias: torch.Tensor | None = None, aligned: bool = False) -> torch.Tensor:
        """``hidden (..., T, H)``, ``weight (V, H)``; ``aligned=True``: ``labels`` already line up."""
        targets = labels.to(hidden.device)
        if not aligned:
            targets = align_labels(targets, self.shift, self.ignore_index)
        loss_sum, stats = linear_prsl_loss(hidden, weight, targets, self.k, self.b, bias=bias,
                                           ignore_index=self.ignore_index, reduction="sum", backend=self.backend,
                                           chunk_size=self.chunk_size, check_target=self.check_target,
                                           return_stats=True, **self.options)
        counted = (targets != self.ignore_index).reshape(-1)
        penalty_sum = self.b * (stats.dist * counted).sum() if self.k and self.b else loss_sum.new_zeros(())
        count = counted.sum()
        self._record(loss_sum.detach() - penalty_sum, penalty_sum, count, stats.correct.sum())
        return _normalise(loss_sum, count, num_items_in_batch)


# --------------------------------------------------------------------------- fused linear patch

# Model class -> (labels shifted for the loss?, attribute holding the inner causal LM or None).
# Verified here: the head is an nn.Linear called once per forward on the last hidden states,
# and the logits are used as they come out of it (no softcap, no scale).
_FUSED_MODELS = {
    "GPT2LMHeadModel": (True, None),
    "OPTForCausalLM": (True, None),
    "VisionEncoderDecoderModel": (False, "decoder"),
    "Blip2ForConditionalGeneration": (True, "language_model"),
}
_FUSED_ATTR = "_prsl_fused_linear"


def apply_prsl_fused_linear(model: torch.nn.Module, k: int, b: float, *, shift: bool | None = None,
                            ignore_index: int = IGNORE_INDEX, backend: str = "auto",
                            chunk_size: int | None = None, label_smoothing: float = 0.0, z_loss: float = 0.0,
                            softcap: float | None = None) -> PRSLLinearTokenLoss:
    """Make ``model(..., labels=labels).loss`` the fused linear + PRSL loss (one call, like
    Liger's ``apply_liger_kernel_to_*``); returns the loss object (``pop_stats()`` for logging).

    With labels, the LM head's matmul runs on zero rows and its input (the last hidden
    states) goes to ``linear_prsl_loss`` with the head's weight and bias: the logits are never
    built and ``.logits`` is None. Without labels (generation, inference) nothing changes.
    ``num_items_in_batch`` (Trainer with ``model_accepts_loss_kwargs``) and HF's
    ``shift_labels`` are honoured and are not passed on to the model. ``shift``: labels
    shifted for causal LMs (GPT-2, OPT, BLIP-2), not for ``VisionEncoderDecoderModel``
    (default: by model class). Only this instance is affected; :func:`remove_prsl_fused_linear`
    undoes it. ``label_smoothing``, ``z_loss``, ``softcap``: the options of :func:`prsl_loss`.
    """
    name = type(model).__name__
    if name not in _FUSED_MODELS:
        raise NotImplementedError(f"apply_prsl_fused_linear supports {', '.join(_FUSED_MODELS)}; got {name}")
    default_shift, inner = _FUSED_MODELS[name]
    if inner is not None:
        inner_name = type(getattr(model, inner)).__name__
        if inner_name not in ("GPT2LMHeadModel", "OPTForCausalLM"):
            raise NotImplementedError(f"apply_prsl_fused_linear: {name}.{inner} must be a GPT2LMHeadModel or "
                                      f"OPTForCausalLM, got {inner_name}")
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"apply_prsl_fused_linear: the output embeddings of {name} must be an nn.Linear, "
                        f"got {type(head).__name__}")
    loss_fn = PRSLLinearTokenLoss(k, b, shift=default_shift if shift is None else shift, ignore_index=ignore_index,
                                  backend=backend, chunk_size=chunk_size, label_smoothing=label_smoothing,
                                  z_loss=z_loss, softcap=softcap)
    _install_fused_forward(type(model))
    setattr(model, _FUSED_ATTR, loss_fn)
    return loss_fn


def remove_prsl_fused_linear(model: torch.nn.Module) -> None:
    """Undo :func:`apply_prsl_fused_linear` on ``model`` (its class stays patched, inert)."""
    model.__dict__.pop(_FUSED_ATTR, None)


def _install_fused_forward(cls) -> None:
    """Wrap ``cls.forward`` once: instances without the attribute run the original forward."""
    if getattr(cls.forward, _FUSED_ATTR, False):
        return
    original = cls.forward
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        loss_fn = self.__dict__.get(_FUSED_ATTR)
        if loss_fn is None:
            return original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        arguments = {key: value for key, value in bound.arguments.items() if key != "self"}
        for key, param in signature.parameters.items():  # flatten **kwargs
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(key, {}))
        if arguments.get("labels") is None and arguments.get("shift_labels") is None:
            arguments.pop("shift_labels", None)
            arguments.pop("num_items_in_batch", None)  # a loss argument: not the model's business
            return original(self, **arguments)
        return _fused_forward(self, original, loss_fn, arguments)

    setattr(forward, _FUSED_ATTR, True)
    cls.forward = forward


def _fused_forward(model, original, loss_fn, arguments):
    from transformers.utils import ModelOutput

    labels = arguments.pop("labels", None)
    shift_labels = arguments.pop("shift_labels", None)
    num_items_in_batch = arguments.pop("num_items_in_batch", None)
    return_dict = arguments.pop("return_dict", None)
    if type(model).__name__ == "VisionEncoderDecoderModel" and labels is not None \
            and arguments.get("decoder_input_ids") is None and arguments.get("decoder_inputs_embeds") is None:
        from transformers.models.vision_encoder_decoder.modeling_vision_encoder_decoder import shift_tokens_right
        arguments["decoder_input_ids"] = shift_tokens_right(labels, model.config.pad_token_id,
                                                            model.config.decoder_start_token_id)
    head = model.get_output_embeddings()
    seen = {"inputs": [], "outputs": []}

    def take_hidden(module, inputs):  # the head then multiplies zero rows: no logits are built
        seen["inputs"].append(inputs[0])
        return (inputs[0].narrow(-2, 0, 0),) + tuple(inputs[1:])

    def note_output(module, inputs, output):
        seen["outputs"].append(output)

    handles = [head.register_forward_pre_hook(take_hidden), head.register_forward_hook(note_output)]
    try:
        out = original(model, **arguments, return_dict=True)
    finally:
        for handle in handles:
            handle.remove()
    if len(seen["inputs"]) != 1:
        raise RuntimeError(f"apply_prsl_fused_linear: expected one call of the LM head per forward, got "
                           f"{len(seen['inputs'])}")
    hidden = seen["inputs"][0]
    targets = shift_labels if shift_labels is not None else labels
    if hidden.shape[-2] > targets.shape[-1]:  # BLIP-2 scores the last labels.shape[1] positions
        hidden = hidden[..., -targets.shape[-1]:, :]
    loss = loss_fn(hidden, head.weight, targets, num_items_in_batch, bias=head.bias,
                   aligned=shift_labels is not None)
    out = _without(out, seen["outputs"][0], ModelOutput, loss=loss)
    return out.to_tuple() if return_dict is False else out


def _without(out, placeholder, model_output_cls, **extra):
    """``out`` rebuilt (fields in their declared order) without the head's empty placeholder output."""
    fields = {}
    for key, value in out.items():
        if value is placeholder:
            continue
        fields[key] = _without(value, placeholder, model_output_cls) if isinstance(value, model_output_cls) else value
    fields.update(extra)
    return type(out)(**fields)


__all__ = ["align_labels", "PRSLTokenLoss", "PRSLLinearTokenLoss", "PRSLComputeLoss", "CEComputeLoss",
           "prsl_loss_function", "apply_prsl_fused_linear", "remove_prsl_fused_linear"]
