"""Every bad input in the spec's error list gives a clear error naming the argument."""

import dataclasses

import pytest
import torch

from conftest import backend_device
from prsl_kernels import LinearPRSLLoss, PRSLLoss, cpp_kernels, linear_prsl_loss, prsl_loss
from prsl_kernels.hf_losses import PRSLTokenLoss
from prsl_kernels.validation import Options, check_options

V = 10


def _ok():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, V, generator=g), torch.randint(0, V, (4,), generator=g)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("case, exc, match", [
    (lambda z, t: (z.long(), t, 2, 0.5, {}), TypeError, "logits must be a floating-point"),
    (lambda z, t: (z.numpy(), t, 2, 0.5, {}), TypeError, "logits must be a floating-point"),
    (lambda z, t: (torch.tensor(1.5), t, 0, 0.5, {}), ValueError, "at least 1 dimension"),
    (lambda z, t: (z, t.float(), 2, 0.5, {}), TypeError, "target must be an integer"),
    (lambda z, t: (z, t.bool(), 2, 0.5, {}), TypeError, "target must be an integer"),
    (lambda z, t: (z, t[:3], 2, 0.5, {}), ValueError, r"target must have shape .*\(4,\)"),
    (lambda z, t: (z, t[:, None], 2, 0.5, {}), ValueError, "target must have shape"),
    (lambda z, t: (z, t.to("meta"), 2, 0.5, {}), ValueError, "same device"),
    (lambda z, t: (z, t, -1, 0.5, {}), ValueError, r"k must be in \[0, V-1\]"),
    (lambda z, t: (z, t, V, 0.5, {}), ValueError, r"k must be in \[0, V-1\] = \[0, 9\]"),
    (lambda z, t: (z, t, 2.0, 0.5, {}), TypeError, "k must be an int"),
    (lambda z, t: (z, t, 2, "0.5", {}), TypeError, "b must be a real number"),
    (lambda z, t: (z, t, 2, float("nan"), {}), ValueError, "b must be finite"),
    (lambda z, t: (z, t, 2, float("-inf"), {}), ValueError, "b must be finite"),
    (lambda z, t: (z, t, 2, 0.5, {"reduction": "avg"}), ValueError, "reduction must be one of"),
    (lambda z, t: (z, t, 2, 0.5, {"backend": "cuda"}), ValueError, "backend must be one of"),
    (lambda z, t: (z, t, 2, 0.5, {"ignore_index": 1.0}), TypeError, "ignore_index must be an int"),
])
def test_bad_inputs(case, exc, match, backend):
    z, t = _ok()
    logits, target, k, b, kw = case(z, t)
    with pytest.raises(exc, match=match):
        prsl_loss(logits, target, k, b, **{"backend": backend, **kw})


@pytest.mark.parametrize("bad", [V, V + 5, -1, -99])
def test_target_out_of_range(bad):
    z, t = _ok()
    t[2] = bad
    with pytest.raises(ValueError, match=rf"target values must be in \[0, V\) = \[0, {V}\).*found {bad}"):
        prsl_loss(z, t, 2, 0.5, backend="reference")


def test_ignore_index_is_not_out_of_range():
    z, t = _ok()
    t[1] = -100
    t[2] = 3
    assert torch.isfinite(prsl_loss(z, t, 2, 0.5, backend="reference"))
    t[1] = 0
    t[2] = 77
    assert torch.isfinite(prsl_loss(z, t, 2, 0.5, ignore_index=77, backend="reference"))
    t[1] = -100
    with pytest.raises(ValueError, match="found -100"):
        prsl_loss(z, t, 2, 0.5, ignore_index=77, backend="reference")


def test_k_equal_v_minus_1_is_allowed():
    z, t = _ok()
    assert torch.isfinite(prsl_loss(z, t, V - 1, 0.5, backend="reference"))


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("linear", [False, True])
def test_all_ignored_rows_give_zero_gradients(backend, linear):
    """Every target ignored (an answer truncated away): the mean is 0 / 0 = NaN as in
    F.cross_entropy, the sum 0; the gradients are exact zeros, also when the caller divides the sum
    by a zero token count (HF's num_items_in_batch = 0), never NaN."""
    from prsl_kernels import linear_prsl_loss

    g = torch.Generator().manual_seed(3)
    device = backend_device(backend)
    hidden = torch.randn(6, 8, generator=g).to(device).requires_grad_(True)
    weight = torch.randn(V, 8, generator=g).to(device).requires_grad_(True)
    target = torch.full((6,), -100, device=device)
    for reduction in ("mean", "sum"):
        hidden.grad = weight.grad = None
        if linear:
            loss = linear_prsl_loss(hidden, weight, target, 3, 0.5, reduction=reduction, backend=backend)
        else:
            loss = prsl_loss(hidden @ weight.t(), target, 3, 0.5, reduction=reduction, backend=backend)
        assert torch.isnan(loss) if reduction == "mean" else loss.item() == 0.0
        (loss if reduction == "mean" else loss / (target != -100).sum()).backward()
        for grad in (hidden.grad, weight.grad):
            assert torch.equal(grad, torch.zeros_like(grad)), (reduction, grad)


def test_target_out_of_range_names_its_position():
    # The position in the caller's own target tensor, not a row of the flattened logits.
    g = torch.Generator().manual_seed(7)
    z = torch.randn(3, 4, V, generator=g)
    t = torch.randint(0, V, (3, 4), generator=g)
    t[2, 1] = V + 2
    t[2, 3] = -7
    with pytest.raises(ValueError, match=rf"found {V + 2} at target\[2, 1\]"):
        prsl_loss(z, t, 2, 0.5, backend="reference")


# ---------------------------------------------------------------- the options value


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\], got label_smoothing=1.5"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing must be in"),
    (dict(label_smoothing="0.1"), TypeError, "label_smoothing must be a real number"),
    (dict(label_smoothing=True), TypeError, "label_smoothing must be a real number, got bool"),
    (dict(z_loss=-1e-3), ValueError, "z_loss must be a finite number >= 0"),
    (dict(z_loss=float("inf")), ValueError, "z_loss must be a finite number >= 0"),
    (dict(z_loss=float("nan")), ValueError, "z_loss must be a finite number >= 0"),
    (dict(z_loss=None), TypeError, "z_loss must be a real number"),
    (dict(softcap=0.0), ValueError, "softcap must be None"),
    (dict(softcap=float("inf")), ValueError, "softcap must be None"),
    (dict(softcap=True), TypeError, "softcap must be None or a real number"),
])
def test_options_validate_naming_the_argument(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Options(**kwargs)
    with pytest.raises(exc, match=match):
        check_options(**{**Options().as_kwargs(), **kwargs})


def test_options_is_one_frozen_hashable_value():
    options = check_options(0.1, 0, 5)
    assert type(options) is Options and options == Options(0.1, 0.0, 5.0)
    assert hash(options) == hash(Options(0.1, 0.0, 5.0)) and {options: 1}[Options(0.1, 0.0, 5.0)] == 1
    assert all(type(v) is float for v in options.op_args())  # ints and numpy scalars become floats
    assert options.op_args() == (0.1, 0.0, 5.0) and Options().op_args() == (0.0, 0.0, 0.0)  # the ops' 0.0 = off
    assert options.as_kwargs() == {"label_smoothing": 0.1, "z_loss": 0.0, "softcap": 5.0}
    assert Options().is_off and not options.is_off and Options().softcap is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.z_loss = 1.0


@pytest.mark.skipif(not cpp_kernels.available(), reason="C++ extension unavailable")
def test_the_options_value_is_what_the_layers_carry():
    """Validated once at the API, the same value reaches the autograd Functions (and the modules
    and Hugging Face losses hold it)."""
    kwargs = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    want = Options(**kwargs)
    logits, target = _ok()
    x = logits.requires_grad_(True)
    assert prsl_loss(x, target, 2, 0.5, backend="cpp", **kwargs).grad_fn.options == want  # grad in the forward
    rows = prsl_loss(x, target, 2, 0.5, backend="cpp", reduction="none", **kwargs)
    assert rows.grad_fn.next_functions[0][0].options == want  # PRSLFunction, under the reshape
    hidden, weight = torch.randn(4, 3, requires_grad=True), torch.randn(V, 3)
    assert linear_prsl_loss(hidden, weight, target, 2, 0.5, backend="cpp", **kwargs).grad_fn.options == want
    assert PRSLLoss(2, 0.5, **kwargs).options == want and LinearPRSLLoss(2, 0.5, **kwargs).options == want
    assert PRSLTokenLoss(2, 0.5, shift=True, **kwargs).options == want
