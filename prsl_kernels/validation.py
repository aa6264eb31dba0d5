"""Input checks shared by every backend: clear errors before any kernel runs; the loss options
as one validated value (:class:`Options`)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .spec import BACKENDS, REDUCTIONS


def check_inputs(logits, target, k, b, ignore_index, reduction, backend):
    """Raise ``TypeError``/``ValueError`` naming the bad argument (spec, "Errors")."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {_describe(logits)}")
    if logits.dim() < 1:
        raise ValueError("logits must have at least 1 dimension (..., V), got a 0-d tensor")
    _check_target(target, logits, "logits")
    vocab = logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 0 or k > vocab - 1:
        raise ValueError(f"k must be in [0, V-1] = [0, {vocab - 1}] (V = logits.shape[-1] = {vocab}: "
                         f"there are only V-1 non-target classes), got k={k}")
    check_b(b)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_b(b):
    """``b``: a finite real number (NaN or inf would make every loss and gradient non-finite)."""
    if isinstance(b, bool) or not isinstance(b, numbers.Real):
        raise TypeError(f"b must be a real number, got {type(b).__name__}")
    if not math.isfinite(b):
        raise ValueError(f"b must be finite, got b={b}")


@dataclass(frozen=True)
class Options:
    """The loss options (spec, "Options"), validated on construction: one frozen, hashable value
    that every Python layer carries unchanged down to the ops, where :meth:`op_args` unpacks it
    into the schemas' explicit floats.

    ``label_smoothing``: ``eps`` in [0, 1]; ``z_loss``: ``lam >= 0``, finite; ``softcap``: ``None``
    (off) or a finite ``c > 0``. The default value is all off (the plain loss)."""
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None

    def __post_init__(self):
        eps, lam, cap = self.label_smoothing, self.z_loss, self.softcap
        for name, value in (("label_smoothing", eps), ("z_loss", lam)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got label_smoothing={eps}")
        if not lam >= 0.0 or not math.isfinite(lam):
            raise ValueError(f"z_loss must be a finite number >= 0, got z_loss={lam}")
        if cap is not None:
            if isinstance(cap, bool) or not isinstance(cap, numbers.Real):
                raise TypeError(f"softcap must be None or a real number > 0, got {type(cap).__name__}")
            if not cap > 0.0 or not math.isfinite(cap):
                raise ValueError(f"softcap must be None (off) or a finite number > 0, got softcap={cap}")
        # Plain floats (not numpy scalars or ints), so that equal options compare and hash equal.
        object.__setattr__(self, "label_smoothing", float(eps))
        object.__setattr__(self, "z_loss", float(lam))
        object.__setattr__(self, "softcap", None if cap is None else float(cap))

    @property
    def is_off(self) -> bool:
        """All three off: the kernels run the plain loss, bit for bit."""
        return self.label_smoothing == 0.0 and self.z_loss == 0.0 and self.softcap is None

    def op_args(self):
        """``(label_smoothing, z_loss, softcap)`` as the ops' schemas take them: floats, 0.0 = off."""
        return self.label_smoothing, self.z_loss, 0.0 if self.softcap is None else self.softcap

    def as_kwargs(self) -> dict:
        """The keyword arguments of the public API (``prsl_loss(..., **options.as_kwargs())``)."""
        return {"label_smoothing": self.label_smoothing, "z_loss": self.z_loss, "softcap": self.softcap}


def check_options(label_smoothing, z_loss, softcap) -> Options:
    """The public keyword arguments as one validated :class:`Options` (errors name the argument)."""
    return Options(label_smoothing, z_loss, softcap)


def check_target_range(target, vocab, ignore_index, name="target"):
    """Targets must lie in [0, V) unless equal to ignore_index.

    On the CPU an out-of-range target raises a ValueError that names its position
    in ``name`` (the caller's own tensor: ``labels[0, 6]``, not a flattened row).
    On CUDA, and under torch.compile, the check is an asynchronous device assert:
    no host synchronisation and no graph break; a bad target stops the step at the
    next synchronisation with a CUDA device-side assert (run with
    ``CUDA_LAUNCH_BLOCKING=1`` to see where). Either way no kernel reads the
    target, so no NaN reaches the weights.
    """
    bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
    if target.is_cuda or torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), f"{name} out of range [0, {vocab}) and not ignore_index={ignore_index}")
        return
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        position = f"{name}[{', '.join(map(str, where))}]" if where else name
        raise ValueError(f"{name} values must be in [0, V) = [0, {vocab}) or equal ignore_index={ignore_index}; "
                         f"found {int(target[where])} at {position}")


def check_linear_inputs(hidden, weight, bias, target, k):
    """linear_prsl_loss: clear errors naming the bad argument, before any matmul or kernel runs."""
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor (..., H), got {_describe(hidden)}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least 1 dimension (..., H), got a 0-d tensor")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor (V, H), got {_describe(weight)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V, H), the nn.Linear layout of an LM head; got shape "
                         f"{tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"hidden.shape[-1] (H = {hidden.shape[-1]}) must equal weight.shape[1] = "
                         f"{weight.shape[1]} (weight is (V, H)); got hidden {tuple(hidden.shape)} and weight "
                         f"{tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight must have the same dtype, got hidden {hidden.dtype} and weight "
                        f"{weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"hidden and weight must be on the same device, got {hidden.device} and {weight.device}")
    vocab = weight.shape[0]
    if vocab < 1:
        raise ValueError("weight must have at least one row (V >= 1), got shape " f"{tuple(weight.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise TypeError(f"bias must be None or a floating-point tensor (V,), got {_describe(bias)}")
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"bias must have shape (V,) = ({vocab},) (V = weight.shape[0]), got "
                             f"{tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias must have the weight's dtype {weight.dtype}, got {bias.dtype}")
        if bias.device != weight.device:
            raise ValueError(f"bias must be on the weight's device {weight.device}, got {bias.device}")
    _check_target(target, hidden, "hidden")
    if isinstance(k, int) and not isinstance(k, bool) and not 0 <= k <= vocab - 1:
        raise ValueError(f"k must be in [0, V-1] = [0, {vocab - 1}] (V = weight.shape[0] = {vocab}: there are "
                         f"only V-1 non-target classes), got k={k}")


def _check_target(target, rows, rows_name):
    """``target``: integers, one per row of ``rows`` (``logits`` or ``hidden``), on its device."""
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.is_complex() \
            or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor, got {_describe(target)}")
    if tuple(target.shape) != tuple(rows.shape[:-1]):
        raise ValueError(f"target must have shape {rows_name}.shape[:-1] = {tuple(rows.shape[:-1])}, "
                         f"got {tuple(target.shape)}")
    if target.device != rows.device:
        raise ValueError(f"{rows_name} and target must be on the same device, got {rows.device} and {target.device}")


def _describe(x):
    if isinstance(x, torch.Tensor):
        return f"a tensor of dtype {x.dtype}"
    return type(x).__name__
