"""The one call that makes a Hugging Face model train on PRSL: :func:`apply_prsl`.

``apply_prsl(model, k, b)`` makes ``model(..., labels=labels).loss`` PRSL for any HF causal LM or
image-text-to-text model whose LM head is an ``nn.Linear`` on the final hidden states (Llama,
Mistral, Qwen2/3, Gemma 2/3, Phi-3, Cohere, Granite, LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, PaliGemma, Idefics3, SmolVLM, Mllama, InternVL, GPT-2, OPT, BLIP-2 and
``VisionEncoderDecoderModel``), also wrapped in a PEFT ``PeftModel``.

How, without knowing each architecture (``fused_linear=True``, the default):

* ``apply_prsl`` installs two dispatchers on the instance: the LM head's ``forward`` and the
  model's ``loss_function``. Outside a patched forward with labels they call the head's and the
  model's own; during one, what they do is set on the patch object (never by swapping module
  attributes per call, which ``torch.compile`` could not trace).
* During a forward with labels the LM head is called as usual (so FSDP2 / ZeRO-3 hooks gather
  its weight) but returns a placeholder with zero columns and the input's positions. It costs
  nothing, and any slicing the model does to "the logits" (BLIP-2 keeps the last
  ``labels.shape[1]`` positions) maps back to rows of the head's input through the placeholder's
  storage offset and strides (eager mode; under ``torch.compile`` only the shape is read, and a
  model that slices after the head is refused there).
* The model's ``loss_function`` receives exactly the labels, ``shift_labels`` and
  ``num_items_in_batch`` it would give HF's ``ForCausalLMLoss``, so each model's own label rules
  hold (and labels of the wrong length raise).
* A placeholder that comes back as a new tensor was transformed by the model after the head;
  the transform is read from the config (Gemma 2 / PaliGemma 2 ``final_logit_softcapping`` ->
  the kernel's ``softcap``; Cohere ``logit_scale``, Granite ``logits_scaling`` -> a scale of the
  hidden states) or the call raises. A dtype cast alone (Mllama's ``.float()``) changes no value.
* The loss is computed by calling the head module again, its dispatcher set to
  ``linear_prsl_loss``: FSDP2 (the head in the root unit or its own, with or without
  ``reshard_after_forward``) and ZeRO-3 gather the weight around it and register their backward
  hooks on the loss, so the sharded head is never read outside its own forward.
* An evaluation forward with labels (no grad) also returns ``predictions``, each position's
  argmax token id, computed in row chunks inside that same head call: what ``Trainer.evaluate``
  hands ``compute_metrics`` in place of the logits.

``fused_linear=False`` leaves the head alone and computes PRSL on the model's own logits (its
``loss_function`` dispatched the same way). ``VisionEncoderDecoderModel`` computes its own CE
instead of calling ``loss_function``: its adapter feeds the decoder ``[start] + labels`` and scores
the labels unshifted. Other encoder-decoders (T5, BART) are refused.

Never silently off: a forward with labels whose loss did not go through PRSL raises at that
step (a model that computes its own loss, TRL's ``SFTTrainer`` calling its own fused head, any
other forward replacement); use :class:`prsl_kernels.sft.PRSLSFTTrainer` with TRL. So does a
training forward that a ``transformers.Trainer`` makes without labels because it computes the
loss itself (``label_smoothing_factor``, ``compute_loss_func``); the error names PRSL's own
equivalent.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys

import torch

from .hf_losses import PRSLLinearTokenLoss, PRSLTokenLoss
from .linear import default_chunk_size
from .spec import IGNORE_INDEX
from .validation import check_options
from .vocab_parallel import dtensor_linear_argmax, is_dtensor, local_value

_PATCH_ATTR = "_prsl_patch"  # on an instance: its _Patch; on a class's forward: the wrapper's marker

# Models that never call ``self.loss_function``: their own CE is replaced by calling the model
# without labels and scoring the head's input here. Value: the labels are shifted for the loss?
_OWN_LOSS_MODELS = {"VisionEncoderDecoderModel": False}

# Logit scales after the head, by model_type: (config attribute, multiply or divide).
_LOGIT_SCALES = {
    "cohere": ("logit_scale", "multiply"),
    "cohere2": ("logit_scale", "multiply"),
    "granite": ("logits_scaling", "divide"),
    "granitemoe": ("logits_scaling", "divide"),
    "granitemoeshared": ("logits_scaling", "divide"),
    "granitemoehybrid": ("logits_scaling", "divide"),
}
# Config attributes that scale the logits in some architecture: unknown pairs are refused.
_SCALE_ATTRIBUTES = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")


class _Patch:
    """What one patched instance needs at each forward."""

    def __init__(self, loss, fused, model_softcap, scale, own_loss_shift, eval_predictions=True):
        self.loss, self.fused, self.eval_predictions = loss, fused, eval_predictions
        self.model_softcap, self.scale = model_softcap, scale
        self.own_loss_shift = own_loss_shift  # None: the model calls loss_function
        self.calls = 0  # losses computed by PRSL: the guard compares it around each forward
        self.guard_handles = []
        self.guard_depth = []
        # What the head's forward and the model's loss_function do during the patched forward in
        # progress (None: their own). Installed once by apply_prsl as dispatchers (_HeadForward,
        # _LossFunction), so a forward swaps attributes of this object, never of the modules:
        # torch.compile traces that, and FSDP2 / ZeRO-3 hooks see the same modules throughout.
        self.head_call = None
        self.loss_call = None
        self.saved_head_forward = None
        self.saved_loss_function = None

    def post_processing(self, transformed: bool, recast: bool, model_name: str):
        """(softcap, scale) the kernel applies, from whether the model transformed the head's output."""
        if not transformed:
            return None, 1.0
        if self.model_softcap is None and self.scale == 1.0:
            if recast:
                return None, 1.0
            raise NotImplementedError(
                f"apply_prsl: {model_name} changes its logits after the LM head in a way its config does not "
                f"describe (no final_logit_softcapping or known logit scale); the fused loss would not be "
                f"exact. Use apply_prsl(..., fused_linear=False) to compute PRSL on the model's own logits.")
        return self.model_softcap, self.scale


def apply_prsl(model: torch.nn.Module, k: int, b: float, *, fused_linear: bool = True, shift: bool | None = None,
               ignore_index: int = IGNORE_INDEX, backend: str = "auto", chunk_size: int | None = None,
               label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
               check_target: bool = True, eval_predictions: bool = True):
    """Make ``model(..., labels=labels).loss`` PRSL (one call, like Liger's ``apply_liger_kernel_to_*``).

    Returns the loss object (``pop_stats()`` gives CE, the penalty and token accuracy since the
    last call). ``fused_linear=True``: the loss comes from the LM head's input by
    :func:`prsl_kernels.linear_prsl_loss`, the N x V logits are never built and ``.logits`` is
    absent from forwards with labels; without labels (generation, inference) the model is
    unchanged. An evaluation forward with labels (no grad) returns ``predictions`` instead, each
    position's argmax token id (``eval_predictions=False`` skips that matmul), which
    ``Trainer.evaluate`` hands to ``compute_metrics``. Patch before ``torch.compile``.
    ``fused_linear=False``: PRSL on the model's own logits. ``shift`` (optional) must agree with
    the model's alignment (causal LMs shift, ``VisionEncoderDecoderModel`` does not).
    ``softcap``: only for a model that does not cap its logits itself (one whose config has
    ``final_logit_softcapping`` is capped by the model; giving it again raises).
    Other options: those of :func:`prsl_kernels.prsl_loss`. A ``PeftModel`` is accepted (its
    base model is patched). Only this instance is affected; :func:`remove_prsl` undoes it.
    ``check_target`` (default on): a label outside ``[0, V)`` that is not ``ignore_index`` raises
    at that forward, naming ``labels[batch, position]`` (on CUDA an asynchronous device assert:
    no host sync); turn it off only for labels already known to be valid.

    Refused here, with the reason: a head that is not an ``nn.Linear``, ``k`` outside
    ``[0, V - 1]`` for the head's vocabulary, and encoder-decoder models (T5, BART, ...) whose
    decoder computes its own loss.
    """
    outer = model
    model = base_model(model)
    name = type(model).__name__
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"apply_prsl: the LM head (get_output_embeddings()) of {name} must be an nn.Linear, got "
                        f"{type(head).__name__} (a LoRA adapter or modules_to_save on the head is not supported: "
                        f"leave lm_head out of the PEFT target modules)")
    vocab = head.out_features
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= vocab - 1:
        raise ValueError(f"apply_prsl: k must be an int in [0, V-1] = [0, {vocab - 1}] for {name}'s LM head "
                         f"(V = lm_head.out_features = {vocab}: there are only V-1 non-target classes), got k={k!r}")
    own_loss_shift = _OWN_LOSS_MODELS.get(name)
    if own_loss_shift is None:
        if getattr(model.config, "is_encoder_decoder", False):
            raise NotImplementedError(
                f"apply_prsl: {name} is an encoder-decoder model; its decoder computes its own loss, which "
                f"apply_prsl cannot route through PRSL. Supported: causal LMs, image-text-to-text models and "
                f"VisionEncoderDecoderModel. For a seq2seq model compute prsl_loss(outputs.logits, labels, k, b) "
                f"yourself (labels unshifted) or pass PRSLComputeLoss(k, b, shift=False) to Trainer.")
        _check_causal_lm_loss(model, name)
        if name.startswith("Blip2") and not getattr(model.config, "use_decoder_only_language_model", True):
            raise NotImplementedError(f"apply_prsl: {name} with an encoder-decoder language model computes its "
                                      f"loss inside that model; only decoder-only (OPT) language models are supported")
    model_shift = own_loss_shift if own_loss_shift is not None else True
    if shift is not None and bool(shift) != model_shift:
        raise ValueError(f"apply_prsl: shift={shift} contradicts {name}'s own label alignment (shift={model_shift})")
    config = model.decoder.config if name == "VisionEncoderDecoderModel" else model.config.get_text_config()
    model_softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None and model_softcap is not None:
        raise ValueError(f"apply_prsl: {name} already caps its logits (config final_logit_softcapping="
                         f"{model_softcap}); softcap={softcap} would cap them twice. Leave softcap=None: the "
                         f"model's cap is applied exactly.")
    scale = _logit_scale(config, name)
    options = check_options(label_smoothing, z_loss, softcap)  # a bad option raises here, before any patching
    if fused_linear:
        loss = PRSLLinearTokenLoss(k, b, shift=model_shift, ignore_index=ignore_index, backend=backend,
                                   chunk_size=chunk_size, check_target=check_target, **options.as_kwargs())
    else:
        loss = PRSLTokenLoss(k, b, shift=model_shift, ignore_index=ignore_index, backend=backend,
                             check_target=check_target, **options.as_kwargs())
    remove_prsl(outer)
    patch = _Patch(loss, bool(fused_linear), model_softcap, scale, own_loss_shift, bool(eval_predictions))
    _install_forward(type(model))
    model.__dict__[_PATCH_ATTR] = patch
    patch.saved_head_forward = head.__dict__.get("forward")
    head.forward = _HeadForward(head, patch)
    if own_loss_shift is None:
        patch.saved_loss_function = model.__dict__.get("_loss_function", _MISSING)
        model.loss_function = _LossFunction(model.loss_function, patch)
    for module in {id(m): m for m in (outer, model)}.values():
        patch.guard_handles += [module.register_forward_pre_hook(functools.partial(_guard_enter, patch),
                                                                 with_kwargs=True),
                                module.register_forward_hook(functools.partial(_guard_exit, patch, name),
                                                             with_kwargs=True, always_call=True)]
    if outer is not model:
        outer.__dict__[_PATCH_ATTR] = patch
    return loss


def apply_prsl_fused_linear(model: torch.nn.Module, k: int, b: float, **kwargs):
    """:func:`apply_prsl` with ``fused_linear=True`` (the name of the first release)."""
    return apply_prsl(model, k, b, fused_linear=True, **kwargs)


def remove_prsl(model: torch.nn.Module) -> None:
    """Undo :func:`apply_prsl` on ``model`` (its class stays patched, inert for other instances)."""
    base = base_model(model)
    for module in {id(m): m for m in (model, base)}.values():
        patch = module.__dict__.pop(_PATCH_ATTR, None)
        if patch is not None:
            for handle in patch.guard_handles:
                handle.remove()
            patch.guard_handles = []
            _uninstall_dispatchers(base, patch)


def _uninstall_dispatchers(model, patch):
    head = model.get_output_embeddings()
    if isinstance(head.__dict__.get("forward"), _HeadForward):
        if patch.saved_head_forward is None:
            del head.forward
        else:
            head.forward = patch.saved_head_forward
    if isinstance(model.__dict__.get("_loss_function"), _LossFunction):
        if patch.saved_loss_function is _MISSING:
            del model.__dict__["_loss_function"]
        else:
            model.loss_function = patch.saved_loss_function


remove_prsl_fused_linear = remove_prsl


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model :func:`apply_prsl` patches: a PEFT ``PeftModel``'s base model, else ``model``."""
    if type(model).__module__.split(".")[0] == "peft" and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def applied_prsl(model: torch.nn.Module):
    """The loss object :func:`apply_prsl` installed on ``model`` (or its PEFT base model), or None."""
    patch = base_model(model).__dict__.get(_PATCH_ATTR)
    return None if patch is None else patch.loss


def _check_causal_lm_loss(model, name):
    from transformers.loss.loss_utils import ForCausalLMLoss

    loss_function = getattr(model, "loss_function", None)
    if loss_function is not ForCausalLMLoss and not isinstance(getattr(loss_function, "token", None), PRSLTokenLoss):
        raise NotImplementedError(
            f"apply_prsl supports models whose training loss is Hugging Face's causal-LM loss (ForCausalLMLoss: "
            f"causal LMs and image-text-to-text models) and VisionEncoderDecoderModel; {name}'s loss_function is "
            f"{getattr(loss_function, '__name__', type(loss_function).__name__)}")


def _logit_scale(config, name) -> float:
    """The factor the model multiplies its logits by after the head (1.0: none)."""
    rule = _LOGIT_SCALES.get(getattr(config, "model_type", None))
    if rule is not None:
        value = float(getattr(config, rule[0]))
        if not math.isfinite(value) or value == 0.0:
            raise ValueError(f"apply_prsl: {name}'s config {rule[0]}={value} is not a finite non-zero scale")
        return value if rule[1] == "multiply" else 1.0 / value
    for attribute in _SCALE_ATTRIBUTES:
        value = getattr(config, attribute, None)
        if value is not None and value != 1.0:
            raise NotImplementedError(f"apply_prsl: {name}'s config sets {attribute}={value}, a logit scale this "
                                      f"package has not verified for model_type {config.model_type!r}")
    return 1.0


# --------------------------------------------------------------------------- the guard


def _has_labels(kwargs):
    return kwargs.get("labels") is not None or kwargs.get("shift_labels") is not None


def _guard_enter(patch, module, args, kwargs):
    has_labels = _has_labels(kwargs)
    patch.guard_depth.append(patch.calls if has_labels else None)  # popped by _guard_exit, always
    if not has_labels and module.training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        _refuse_trainer_own_loss(_calling_trainer())
    if kwargs.get("fused_lm_head"):
        raise RuntimeError(
            "PRSL is applied to this model, but TRL's SFTTrainer computes its own loss from its fused LM head "
            "(fused_lm_head=True), which would train plain cross-entropy. Use prsl_kernels.sft.PRSLSFTTrainer "
            "(SFTTrainer with the loss taken from the model) instead.")


def _calling_trainer():
    """The ``transformers.Trainer`` whose ``compute_loss`` is running this forward, if any.

    Only looked for on a training forward without labels, which a patched model should not
    see from a Trainer: Trainer takes the labels out of the batch when it computes the loss
    itself (``label_smoothing_factor``, ``compute_loss_func``), so the model cannot tell.
    """
    trainer_module = sys.modules.get("transformers.trainer")
    if trainer_module is None:
        return None
    frame = sys._getframe(2)
    for _ in range(64):
        if frame is None:
            return None
        if frame.f_code.co_name == "compute_loss" and isinstance(frame.f_locals.get("self"), trainer_module.Trainer):
            return frame.f_locals["self"]
        frame = frame.f_back
    return None


def _refuse_trainer_own_loss(trainer):
    if trainer is None:
        return
    name = type(trainer).__name__
    if getattr(trainer, "label_smoother", None) is not None:
        raise RuntimeError(
            f"PRSL is applied to this model, but {name}(args.label_smoothing_factor="
            f"{trainer.args.label_smoothing_factor}) takes the labels out of the batch and trains its own "
            f"label-smoothed cross-entropy instead. Use PRSL's option: apply_prsl(model, k, b, label_smoothing="
            f"{trainer.args.label_smoothing_factor}) and leave label_smoothing_factor=0.")
    if getattr(trainer, "compute_loss_func", None) is not None:
        raise RuntimeError(
            f"PRSL is applied to this model, but {name}(compute_loss_func=...) takes the labels out of the batch "
            f"and trains that function's loss instead. Leave compute_loss_func unset (the model's loss is PRSL), "
            f"or drop apply_prsl and pass compute_loss_func=prsl_kernels.hf.PRSLComputeLoss(k, b, shift=True).")
    raise RuntimeError(
        f"PRSL is applied to this model, but {name}.compute_loss called it in training without labels, so the "
        f"step's loss does not go through PRSL. Keep the labels in the batch (the model's loss is PRSL).")


def _guard_exit(patch, name, module, args, kwargs, output):
    start = patch.guard_depth.pop() if patch.guard_depth else None
    if start is not None and patch.calls == start and output is not None:
        raise RuntimeError(
            f"PRSL is applied to {name}, but this forward with labels computed its loss without it (its forward "
            f"was replaced, or the model computes its own loss): the step would train another loss.")


# --------------------------------------------------------------------------- the forward wrapper


def _install_forward(cls) -> None:
    """Wrap ``cls.forward`` once; instances without a patch run the original forward."""
    if getattr(cls.forward, _PATCH_ATTR, False):
        return
    original = cls.forward
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        patch = self.__dict__.get(_PATCH_ATTR)
        if patch is None:
            return original(self, *args, **kwargs)
        arguments = _bind(signature, self, args, kwargs)
        if arguments.get("labels") is None and arguments.get("shift_labels") is None:
            arguments.pop("shift_labels", None)
            arguments.pop("num_items_in_batch", None)  # a loss argument: not the model's business
            return original(self, **arguments)
        if patch.own_loss_shift is not None:
            return _own_loss_forward(self, original, patch, arguments)
        return _loss_function_forward(self, original, patch, arguments)

    setattr(forward, _PATCH_ATTR, True)
    cls.forward = forward


def _bind(signature, model, args, kwargs):
    bound = signature.bind(model, *args, **kwargs)
    arguments = {key: value for key, value in bound.arguments.items() if key != "self"}
    for key, param in signature.parameters.items():  # flatten **kwargs
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(key, {}))
    return arguments


class _HeadCapture:
    """The head's ``forward`` during a fused forward: keeps its input, returns a placeholder.

    The placeholder has no elements (no logits are computed) but the input's leading shape,
    strides and storage offset, in a storage of its own (``marker``): whatever views the model
    takes of it (slices of positions) map back to rows of the input exactly. It is not a view of
    the input and needs no gradient, so FSDP2 hooks no backward to it.
    """

    def __init__(self, predictions: bool = False):
        self.inputs, self.marker = [], None
        self.want_predictions, self.predictions = predictions, None

    def __call__(self, hidden):
        self.inputs.append(hidden)
        if torch.compiler.is_compiling():
            # Storage offsets and set_ do not trace: under torch.compile the placeholder is a
            # zero-column view, and only its shape is read (see _traced_rows).
            return hidden.detach()[..., :0]
        local = local_value(hidden)
        self.marker = torch.empty(1, dtype=local.dtype, device=local.device).untyped_storage()
        placeholder = local.new_empty(0).set_(self.marker, local.storage_offset(), local.shape[:-1] + (0,),
                                              local.stride()[:-1] + (1,))
        if is_dtensor(hidden):  # a tensor-parallel head: its output hook takes logits sharded over the vocabulary
            from torch.distributed.tensor import DTensor, Shard

            return DTensor.from_local(placeholder, hidden.device_mesh, [Shard(placeholder.dim() - 1)], run_check=False)
        return placeholder

    def hidden(self, model_name):
        if len(self.inputs) != 1:
            raise RuntimeError(f"apply_prsl: expected one call of {model_name}'s LM head per forward, got "
                               f"{len(self.inputs)}")
        return self.inputs[0]


_MISSING = object()


class _HeadForward:
    """The LM head's ``forward`` while a patch is installed: the head's own forward, unless the
    patched forward in progress set ``patch.head_call`` (capture the input, or compute the loss).
    The head is still called as a module, so its hooks (FSDP2, ZeRO-3) run around either."""

    def __init__(self, head, patch):
        self.head, self.patch = head, patch

    def __call__(self, *args, **kwargs):
        call = self.patch.head_call
        if call is not None:
            return call(*args, **kwargs)
        if self.patch.saved_head_forward is not None:
            return self.patch.saved_head_forward(*args, **kwargs)
        return type(self.head).forward(self.head, *args, **kwargs)


class _LossFunction:
    """The model's ``loss_function`` while a patch is installed: PRSL during a patched forward with
    labels (``patch.loss_call``), the model's own loss function otherwise."""

    def __init__(self, own, patch):
        self.own, self.patch = own, patch
        self.token = patch.loss  # marks it as PRSL for a later apply_prsl's check

    def __call__(self, *args, **kwargs):
        call = self.patch.loss_call
        return (self.own if call is None else call)(*args, **kwargs)


class _Swap:
    """``patch.<name> = value`` for a ``with`` block, restored after (nested calls keep their own)."""

    def __init__(self, patch, name, value):
        self.patch, self.name, self.value = patch, name, value

    def __enter__(self):
        self.saved = getattr(self.patch, self.name)
        setattr(self.patch, self.name, self.value)

    def __exit__(self, *exc):
        setattr(self.patch, self.name, self.saved)


def _rows_of(placeholder, hidden, marker):
    """The rows of ``hidden`` that ``placeholder`` (what the model made of the head's placeholder)
    stands for, and whether the model transformed it (a new tensor rather than a view)."""
    lead = tuple(placeholder.shape[:-1])
    if placeholder.shape[-1] != 0:
        raise RuntimeError("apply_prsl: the model's loss received logits with a vocabulary; the LM head "
                           "placeholder was replaced (is another patch applied?)")
    if placeholder.untyped_storage().data_ptr() == marker.data_ptr():
        if (lead == tuple(hidden.shape[:-1]) and placeholder.storage_offset() == hidden.storage_offset()
                and placeholder.stride()[:-1] == hidden.stride()[:-1]):
            return hidden, False
        # A view: the model sliced the logits (e.g. BLIP-2 keeps the last labels.shape[1] positions).
        return hidden.as_strided(lead + (hidden.shape[-1],), placeholder.stride()[:-1] + (hidden.stride(-1),),
                                 placeholder.storage_offset()), False
    if lead != tuple(hidden.shape[:-1]):
        raise NotImplementedError(f"apply_prsl: the model reshaped its logits {tuple(hidden.shape[:-1])} -> {lead} "
                                  f"after transforming them; the fused loss cannot map them to hidden states")
    return hidden, True


def _traced_rows(patch, placeholder, hidden, model_name):
    """Under torch.compile: (rows, softcap, scale) without reading storages, which does not trace.

    The rows are the head's whole input: a model that slices its logits after the head
    (BLIP-2) is refused. The cap and scale are those its config declares, which the
    supported models apply whenever they are set; eager forwards check that against the
    placeholder itself (``_rows_of``).
    """
    if tuple(placeholder.shape[:-1]) != tuple(hidden.shape[:-1]):
        raise NotImplementedError(
            f"apply_prsl under torch.compile: {model_name} slices its logits after the LM head "
            f"({tuple(hidden.shape[:-1])} -> {tuple(placeholder.shape[:-1])}), which the fused loss maps back to "
            f"hidden rows only in eager mode. Run it eagerly, or use apply_prsl(..., fused_linear=False).")
    return hidden, patch.model_softcap, patch.scale


def _check_targets(targets, lead, aligned, model_name):
    if targets.dim() == len(lead) and tuple(targets.shape) == lead:
        return
    what = "shift_labels" if aligned else "labels"
    raise ValueError(f"{model_name}: {what} of shape {tuple(targets.shape)} do not match the logits' positions "
                     f"{lead} (Hugging Face's own loss raises on this too)")


def _loss_function_forward(model, original, patch, arguments):
    from transformers.utils import ModelOutput

    name = type(model).__name__
    return_dict = arguments.pop("return_dict", None)
    if arguments.get("labels") is None:  # only shift_labels: the model computes a loss only given labels
        arguments["labels"] = arguments["shift_labels"]
    head = model.get_output_embeddings()
    capture = _HeadCapture(_wants_predictions(patch)) if patch.fused else None

    def loss_function(logits, labels=None, vocab_size=None, num_items_in_batch=None, ignore_index=IGNORE_INDEX,
                      shift_labels=None, **kwargs):
        if ignore_index != patch.loss.ignore_index:
            raise ValueError(f"{name} passed ignore_index={ignore_index}; PRSL was applied with "
                             f"ignore_index={patch.loss.ignore_index}")
        aligned = shift_labels is not None
        return _prsl_of(patch, head, capture, logits, shift_labels if aligned else labels, num_items_in_batch,
                        aligned, name)

    with _Swap(patch, "loss_call", loss_function), _Swap(patch, "head_call", capture):
        out = original(model, **arguments, return_dict=True)
    if getattr(out, "loss", None) is None:
        raise RuntimeError(f"apply_prsl: {name} returned no loss for a forward with labels")
    if patch.fused:
        out = _with_predictions(_without_logits(out, ModelOutput), capture)
    return out.to_tuple() if return_dict is False else out


def _prsl_of(patch, head, capture, logits, targets, num_items_in_batch, aligned, name):
    """PRSL of what the model made of its head's output: its logits (``capture`` None), or, fused,
    the hidden rows the placeholder ``logits`` stands for, through the head's own forward."""
    if capture is None:
        # A tensor-parallel head with use_local_output=True (FSDP2's weight is a DTensor too, but the
        # logits it makes are whole).
        if is_dtensor(head.weight) and not is_dtensor(logits) and logits.shape[-1] != head.out_features:
            raise NotImplementedError(
                f"apply_prsl(fused_linear=False): {name}'s tensor-parallel LM head returns this rank's slice of the "
                f"logits as a plain tensor; give it ColwiseParallel(output_layouts=Shard(-1), use_local_output=False) "
                f"so PRSL gets them as a DTensor (or use the default fused_linear=True)")
        _check_targets(targets, tuple(logits.shape[:-1]), aligned, name)
        loss = patch.loss(logits, targets, num_items_in_batch, aligned=aligned)
    else:
        hidden = capture.hidden(name)
        mesh = hidden.device_mesh if is_dtensor(hidden) else None  # a tensor-parallel head
        hidden, logits = local_value(hidden), local_value(logits)
        if torch.compiler.is_compiling():
            rows, softcap, scale = _traced_rows(patch, logits, hidden, name)
        else:
            rows, transformed = _rows_of(logits, hidden, capture.marker)
            if mesh is not None and transformed and patch.model_softcap is None and patch.scale == 1.0 \
                    and logits.dtype == hidden.dtype:
                raise NotImplementedError(
                    f"apply_prsl: the output of {name}'s tensor-parallel LM head was changed after the head; give "
                    f"it ColwiseParallel(output_layouts=Shard(-1)) (use_local_output either way): PRSL is "
                    f"computed over the vocabulary shards and never needs the whole logits")
            softcap, scale = patch.post_processing(transformed, logits.dtype != hidden.dtype, name)
        _check_targets(targets, tuple(rows.shape[:-1]), aligned, name)
        if scale != 1.0:
            rows = rows * scale  # (s h) W^T + s c == s (h W^T + c): the bias is scaled too
        loss = _loss_through_head(patch, head, capture, rows, targets, num_items_in_batch, aligned, softcap, scale,
                                  mesh)
    patch.calls += 1
    return loss


def _loss_through_head(patch, head, capture, rows, targets, num_items_in_batch, aligned, softcap, scale, mesh=None):
    """The fused loss computed as the head module's forward: FSDP2 / ZeRO-3 unshard its weight around
    the call and hook the backward to the loss, as for the logits they would have made. An
    evaluation forward also takes the predictions there, while the weight is whole.

    A tensor-parallel head (``mesh``, its weight a ``Shard(0)`` DTensor) gets ``rows`` as a replicated
    DTensor, which its input hook leaves as it is whatever its ``input_layouts``; the loss (the same on
    every rank) leaves through its output hook as a one-element-per-rank DTensor ``Shard(0)``, which
    ``output_layouts=Shard(-1)`` keeps (and ``Replicate()`` gathers: this rank's own element is taken)."""

    def forward(hidden):
        bias = head.bias if head.bias is None or scale == 1.0 else head.bias * scale
        if capture.want_predictions:
            capture.predictions = _argmax_rows(hidden, head.weight, bias)
        loss = patch.loss(hidden, head.weight, targets, num_items_in_batch, bias=bias, aligned=aligned,
                          model_softcap=softcap)
        if mesh is not None:
            # Imported here, not shared with the enclosing function: a closure cell that only the
            # tensor-parallel branch fills would be an uninitialised read that torch.compile breaks on.
            from torch.distributed.tensor import DTensor, Shard

            loss = DTensor.from_local(loss.reshape(1), mesh, [Shard(0)], run_check=False)
        return loss

    if mesh is not None:
        from torch.distributed.tensor import DTensor, Replicate

        rows = DTensor.from_local(rows, mesh, [Replicate()], run_check=False)
    with _Swap(patch, "head_call", forward):
        loss = head(rows)
    if mesh is None:
        return loss
    loss = local_value(loss).reshape(-1)
    return loss[mesh.get_local_rank() if loss.numel() > 1 else 0]


def _argmax_rows(rows, weight, bias):
    """The token each row's logits ``rows @ weight.T + bias`` rank first, in row chunks of the fused
    loss's size: no N x V logits. A model's soft cap keeps the order, so its argmax is this one
    (up to ties)."""
    if is_dtensor(weight):  # a tensor-parallel head: no logits cross the group
        return dtensor_linear_argmax(rows, weight, bias)
    flat = rows.reshape(-1, rows.shape[-1])
    chunk = default_chunk_size(flat.shape[0], weight.shape[0], flat.dtype, flat.device)
    ids = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    for start in range(0, flat.shape[0], chunk):
        ids[start:start + chunk] = torch.nn.functional.linear(flat[start:start + chunk], weight, bias).argmax(-1)
    return ids.reshape(rows.shape[:-1])


def _with_predictions(out, capture):
    """``out`` with the evaluation forward's ``predictions`` last (what Trainer hands compute_metrics)."""
    if capture is not None and capture.predictions is not None:
        out["predictions"] = capture.predictions
    return out


def _wants_predictions(patch):
    return patch.fused and patch.eval_predictions and not torch.is_grad_enabled()


def _own_loss_forward(model, original, patch, arguments):
    """``VisionEncoderDecoderModel``: the decoder fed ``[start] + labels``, the labels scored unshifted."""
    from transformers.utils import ModelOutput

    name = type(model).__name__
    labels = arguments.pop("labels", None)
    shift_labels = arguments.pop("shift_labels", None)
    num_items_in_batch = arguments.pop("num_items_in_batch", None)
    return_dict = arguments.pop("return_dict", None)
    if labels is not None and arguments.get("decoder_input_ids") is None \
            and arguments.get("decoder_inputs_embeds") is None:
        from transformers.models.vision_encoder_decoder.modeling_vision_encoder_decoder import shift_tokens_right
        arguments["decoder_input_ids"] = shift_tokens_right(labels, model.config.pad_token_id,
                                                            model.config.decoder_start_token_id)
    aligned = shift_labels is not None
    head = model.get_output_embeddings()
    capture = _HeadCapture(_wants_predictions(patch)) if patch.fused else None
    with _Swap(patch, "head_call", capture):
        out = original(model, **arguments, return_dict=True)
    loss = _prsl_of(patch, head, capture, out.logits, shift_labels if aligned else labels, num_items_in_batch,
                    aligned, name)
    if patch.fused:
        out = _without_logits(out, ModelOutput)
    out = _with_predictions(type(out)(loss=loss, **{key: value for key, value in out.items() if key != "loss"}),
                            capture)
    return out.to_tuple() if return_dict is False else out


def _without_logits(out, model_output_cls):
    """``out`` rebuilt (fields in their declared order) without the head's empty placeholder."""
    fields = {}
    for key, value in out.items():
        if key == "logits":
            continue
        fields[key] = _without_logits(value, model_output_cls) if isinstance(value, model_output_cls) else value
    return type(out)(**fields)


__all__ = ["apply_prsl", "apply_prsl_fused_linear", "remove_prsl", "remove_prsl_fused_linear", "applied_prsl",
           "base_model"]
