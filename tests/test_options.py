"""The options (spec, "Options"): softcap, label smoothing, z-loss, and the `correct`
row stat (token accuracy), in every fused backend against the reference.

The C++ kernels run natively; the Triton kernels compiled on CUDA, or in the CPU
interpreter without one (tests/conftest.py), on tiny shapes with the tile shrunk (block_width) so that
a row streams through several tiles, which covers the two-pass kernel (k < 128),
the exact kernel (k >= 128, and rows the two-pass kernel flags), the torch path
above MAX_K, and the backward.

Tolerances: the kernels sum in another order than torch and use their own exp /
tanh (a few ulp), so float32 values agree to ~1e-6 relative, float64 to ~1e-12;
tau, |T| and `correct` are selections on values both sides compute from the same
capped logits, and are compared exactly where the test makes them robust (ties
built from saturated caps, integer-valued logits).
"""

import pytest
import torch
import torch.nn.functional as F

import reference as ref
from conftest import backend_device
from prsl_kernels import PRSLLoss, linear_prsl_loss, prsl_loss
from prsl_kernels import triton_kernels as tk
from prsl_kernels.spec import CORRECT, NUM_ROW_STATS, ROW_STATS

# The interpreter evaluates both sides of every tl.where: the tanh branch not taken
# (e.g. on -inf padding) produces NaNs that numpy warns about and the where discards.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

# (label_smoothing, z_loss, softcap): each alone, then all together.
OPTIONS = [(0.1, 0.0, None), (0.0, 1e-3, None), (0.0, 0.0, 4.0), (0.2, 1e-2, 3.0)]
OPTION_IDS = ["smooth", "zloss", "softcap", "all"]
LOSS_TOL = {torch.float32: dict(rtol=2e-6, atol=2e-6), torch.bfloat16: dict(rtol=2e-6, atol=2e-6),
            torch.float64: dict(rtol=1e-12, atol=1e-12)}
# 16-bit gradients differ from the fp32 closed form by their output rounding only.
GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-7), torch.bfloat16: dict(rtol=2.0 ** -8, atol=1e-7),
            torch.float64: dict(rtol=1e-10, atol=1e-12)}


def _kwargs(options):
    eps, lam, cap = options
    return dict(label_smoothing=eps, z_loss=lam, softcap=cap)


@pytest.fixture
def block(block_width):
    return block_width


def make_rows(n, vocab, dtype, seed, scale=4.0):
    """Random logits; targets at the row maximum, a random column, and one ignored row."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=gen, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, vocab, (n,), generator=gen)
    target[0] = logits[0].float().argmax()
    target[n - 1] = -100
    return logits, target


def check_against_reference(logits, target, k, b, options, backend, grad_rows=None):
    """Per-row loss, every row stat (spec.ROW_STATS) and the gradient of prsl_loss vs the reference."""
    dtype, device = logits.dtype, backend_device(backend)
    x = logits.detach().clone().to(device).requires_grad_(True)
    loss, stats = prsl_loss(x, target.to(device), k, b, reduction="none", backend=backend, return_stats=True,
                            **_kwargs(options))
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(5), dtype=loss.dtype) \
        if grad_rows is None else grad_rows
    (loss * upstream.to(device)).sum().backward()
    loss, stats, grad = loss.detach().cpu(), type(stats)(*(s.cpu() for s in stats)), x.grad.cpu()

    want_loss, want_stats = ref.loss_rows_reference(logits, target, k, b, **_kwargs(options))
    torch.testing.assert_close(loss, want_loss, **LOSS_TOL[dtype])
    counted = target != -100
    for name, got, want in zip(ROW_STATS, stats, want_stats):
        got, want = got[counted], want[counted]
        if name in ("tie_count", "correct"):
            assert torch.equal(got, want), name
        elif name == "tau" and options[2] is None:  # an input value: exact
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        else:
            torch.testing.assert_close(got, want, **LOSS_TOL[dtype], msg=name)
    assert torch.equal(stats.correct[~counted], torch.zeros_like(stats.correct[~counted]))

    want_grad = ref.grad_closed_form(logits, target, k, b, grad_rows=upstream, **_kwargs(options))
    torch.testing.assert_close(grad.to(want_grad.dtype), want_grad, **GRAD_TOL[dtype])
    # ... and the closed form is what autograd gives through the reference.
    y = logits.detach().to(want_grad.dtype).requires_grad_(True)
    (ref.prsl_loss_reference(y, target, k, b, reduction="none", **_kwargs(options)) * upstream).sum().backward()
    torch.testing.assert_close(y.grad, want_grad, **GRAD_TOL[torch.float64 if dtype == torch.float64 else
                                                           torch.float32])


# ---------------------------------------------------------------- C++ kernels

@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("k", [0, 5, 40])
def test_cpp_matches_reference(options, dtype, k):
    # V = 301: a partial last block (32 and 16 lanes a block) with capped padding.
    logits, target = make_rows(9, 301, dtype, seed=k)
    check_against_reference(logits, target, k, 0.7, options, "cpp")


# ---------------------------------------------------------------- Triton kernels (interpreter)

@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_triton_two_pass_matches_reference(block, options, dtype):
    block(64)
    logits, target = make_rows(4, 203, dtype, seed=1)
    check_against_reference(logits, target, 6, 0.7, options, "triton")


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_triton_exact_kernel_matches_reference(block, options):
    block(64)
    logits, target = make_rows(3, 203, torch.float32, seed=2)
    check_against_reference(logits, target, 150, 0.7, options, "triton")


def test_triton_flagged_rows_and_torch_path(block, monkeypatch):
    """Heavy ties make the two-pass kernel flag rows (the exact kernel recomputes them);
    above MAX_K the torch path runs. Both with every option on."""
    block(64)
    options = OPTIONS[-1]
    logits, target = make_rows(4, 203, torch.float32, seed=3)
    logits[:3] = torch.randint(-3, 3, (3, 203), generator=torch.Generator().manual_seed(3)).float()  # heavy ties
    device = backend_device("triton")
    loss, stats, flags = tk.forward_with_flags(logits.to(device), target.to(device), 6, 0.7, -100, 0.2, 1e-2, 3.0)
    assert flags is not None and int(flags[:3].sum()) >= 1
    check_against_reference(logits, target, 6, 0.7, options, "triton")
    monkeypatch.setattr(tk, "MAX_K", 5)
    check_against_reference(logits, target, 6, 0.7, options, "triton")


# ---------------------------------------------------------------- softcap ties from rounding

@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softcap_ties_created_by_rounding(block, backend, dtype):
    """Distinct logits far above the cap all become exactly c (tanh rounds to 1): the
    selection sees them as ties at tau, exactly as the reference, which caps first."""
    block(64)
    cap = 2.0
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 150, generator=gen, dtype=torch.float64)
    logits[:, 10:19] = torch.linspace(60.0, 90.0, 9, dtype=torch.float64)  # all cap to exactly 2.0
    logits = logits.to(dtype)
    target = torch.tensor([3, 12, 149])  # row 1: the target is one of the capped ones
    device = backend_device(backend)
    for k in (4, 12):  # tau inside the saturated block (ties) and below it
        _, stats = prsl_loss(logits.to(device), target.to(device), k, 0.5, reduction="none", backend=backend,
                             softcap=cap, return_stats=True)
        stats = type(stats)(*(s.cpu() for s in stats))
        _, want = ref.loss_rows_reference(logits, target, k, 0.5, softcap=cap)
        assert torch.equal(stats.tau[:1], want[1][:1]) and torch.equal(stats.tie_count, want[4])
        if k == 4:
            assert stats.tau[0].item() == cap and stats.tie_count[0].item() == 9
            assert stats.tie_count[1].item() == 8  # the target is never in T
        assert torch.equal(stats.correct, torch.tensor([0.0, 1.0, 0.0], dtype=stats.correct.dtype))
    if backend != "reference":
        check_against_reference(logits, target, 4, 0.5, (0.1, 1e-3, cap), backend)


# ---------------------------------------------------------------- label smoothing = torch's

@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_smoothing_b0_is_torch_cross_entropy(block, backend, reduction):
    block(64)
    logits, target = make_rows(5, 97, torch.float32, seed=4)
    device = backend_device(backend)
    for eps in (0.1, 1.0):
        x = logits.clone().to(device).requires_grad_(True)
        y = logits.clone().requires_grad_(True)
        got = prsl_loss(x, target.to(device), 6, 0.0, reduction=reduction, backend=backend, label_smoothing=eps)
        want = F.cross_entropy(y, target, label_smoothing=eps, reduction=reduction)
        torch.testing.assert_close(got.cpu(), want, rtol=2e-6, atol=2e-6)
        got.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(x.grad.cpu(), y.grad, rtol=1e-5, atol=1e-7)


def test_label_smoothing_with_masked_vocabulary_is_inf_as_torch():
    logits, target = make_rows(3, 40, torch.float32, seed=6)
    logits[:, 7] = float("-inf")
    target[:2] = torch.tensor([0, 1])
    for backend in ("cpp", "triton", "reference"):
        device = backend_device(backend)
        got = prsl_loss(logits.to(device), target.to(device), 3, 0.5, reduction="none", backend=backend,
                        label_smoothing=0.1)
        want = F.cross_entropy(logits, target, label_smoothing=0.1, reduction="none")
        assert torch.isposinf(got[:2]).all() and torch.isposinf(want[:2]).all()


# ---------------------------------------------------------------- gradcheck

@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_gradcheck_fp64_with_options(block, backend):
    block(16)
    gen = torch.Generator().manual_seed(8)
    device = backend_device(backend)
    logits = (torch.randn(3, 23, generator=gen, dtype=torch.float64) * 2).to(device).requires_grad_(True)
    target = torch.tensor([4, 0, -100], device=device)
    for options in OPTIONS[2:]:
        fn = lambda z: prsl_loss(z, target, 4, 0.6, reduction="none", backend=backend, **_kwargs(options))  # noqa: E731
        assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------- defaults, errors, correct

@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_defaults_are_the_plain_loss_bit_for_bit(block, backend):
    """Options off (explicitly or by default) run the plain kernels: identical bits."""
    block(64)
    logits, target = make_rows(4, 150, torch.float32, seed=9)
    logits, target = logits.to(backend_device(backend)), target.to(backend_device(backend))
    runs = []
    for kwargs in ({}, dict(label_smoothing=0.0, z_loss=0.0, softcap=None)):
        x = logits.clone().requires_grad_(True)
        loss, stats = prsl_loss(x, target, 6, 0.5, reduction="none", backend=backend, return_stats=True, **kwargs)
        loss.sum().backward()
        runs.append((loss, torch.stack(stats), x.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, message", [
    (dict(label_smoothing=-0.1), "label_smoothing must be in \\[0, 1\\]"),
    (dict(label_smoothing=1.5), "label_smoothing must be in \\[0, 1\\]"),
    (dict(label_smoothing=float("nan")), "label_smoothing must be in \\[0, 1\\]"),
    (dict(z_loss=-1e-4), "z_loss must be a finite number >= 0"),
    (dict(z_loss=float("inf")), "z_loss must be a finite number >= 0"),
    (dict(softcap=0.0), "softcap must be None \\(off\\) or a finite number > 0"),
    (dict(softcap=-30.0), "softcap must be None \\(off\\) or a finite number > 0"),
])
def test_bad_option_values(kwargs, message):
    logits, target = make_rows(2, 11, torch.float32, seed=0)
    with pytest.raises(ValueError, match=message):
        prsl_loss(logits, target, 2, 0.5, **kwargs)
    with pytest.raises(ValueError, match=message):
        PRSLLoss(2, 0.5, **kwargs)
    with pytest.raises(ValueError, match=message):
        linear_prsl_loss(torch.randn(2, 4), torch.randn(11, 4), target, 2, 0.5, **kwargs)


def test_bad_option_types():
    logits, target = make_rows(2, 11, torch.float32, seed=0)
    with pytest.raises(TypeError, match="label_smoothing must be a real number"):
        prsl_loss(logits, target, 2, 0.5, label_smoothing="0.1")
    with pytest.raises(TypeError, match="softcap must be None or a real number"):
        prsl_loss(logits, target, 2, 0.5, softcap=True)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_correct_is_target_at_row_maximum_ties_count(backend):
    """correct = 1 where z_s equals the row maximum (a tie for the maximum counts), 0 on
    ignored rows; token accuracy is correct.sum() / counted rows."""
    logits = torch.tensor([[1.0, 5.0, 2.0, 0.0],    # target 1 is the maximum
                           [3.0, 3.0, 1.0, 0.0],    # target 0 ties with class 1 for the maximum
                           [3.0, 3.0, 1.0, 0.0],    # target 2 is not the maximum
                           [9.0, 1.0, 1.0, 0.0]])   # ignored
    target = torch.tensor([1, 0, 2, -100])
    device = backend_device(backend)
    logits, target = logits.to(device), target.to(device)
    _, stats = prsl_loss(logits, target, 2, 0.5, backend=backend, return_stats=True)
    assert stats.correct.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert len(stats) == NUM_ROW_STATS and ROW_STATS[CORRECT] == "correct"
    # With a softcap, on the capped logits: 40 and 50 both cap to 1.0 (a tie).
    capped = torch.tensor([[40.0, 50.0, 0.0, 1.0]])
    _, stats = prsl_loss(capped.to(device), torch.tensor([0], device=device), 1, 0.5, backend=backend, softcap=1.0,
                         return_stats=True)
    assert stats.correct.tolist() == [1.0]


def test_module_and_ops_carry_the_options():
    logits, target = make_rows(4, 31, torch.float32, seed=10)
    module = PRSLLoss(3, 0.5, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, backend="cpp")
    assert "label_smoothing=0.1" in repr(module) and "softcap=5.0" in repr(module)
    torch.testing.assert_close(module(logits, target),
                               ref.prsl_loss_reference(logits, target, 3, 0.5, label_smoothing=0.1, z_loss=1e-3,
                                                       softcap=5.0), rtol=2e-6, atol=2e-6)
    assert "softcap" not in repr(PRSLLoss(3, 0.5))


def test_compile_fullgraph_with_options():
    logits, target = make_rows(4, 31, torch.float32, seed=11)

    def fn(z):
        return prsl_loss(z, target, 3, 0.5, backend="cpp", check_target=False, label_smoothing=0.1, z_loss=1e-3,
                         softcap=5.0)

    x = logits.clone().requires_grad_(True)
    y = logits.clone().requires_grad_(True)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    want = fn(y)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.backward()
    want.backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=0)


# ---------------------------------------------------------------- fused linear + PRSL

@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_prsl_loss_with_options(block, backend, reduction):
    """The fused linear op runs the same kernels with the options: same loss, stats and
    gradients (hidden, weight, bias) as prsl_loss on F.linear's logits, chunked."""
    from prsl_kernels import LinearPRSLLoss

    block(64)
    gen = torch.Generator().manual_seed(12)
    device = backend_device(backend)
    hidden = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64).float().to(device)
    weight = (torch.randn(67, 8, generator=gen, dtype=torch.float64) * 0.8).float().to(device)
    bias = torch.randn(67, generator=gen, dtype=torch.float64).float().to(device)
    target = torch.randint(0, 67, (2, 5), generator=gen)
    target[1, 3] = -100
    target = target.to(device)
    kwargs = dict(label_smoothing=0.1, z_loss=1e-3, softcap=3.0)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss_fn = LinearPRSLLoss(4, 0.5, reduction=reduction, backend=backend, chunk_size=4, **kwargs)
    assert "softcap=3.0" in repr(loss_fn)
    got = loss_fn(leaves[0], leaves[1], target, bias=leaves[2])
    _, got_stats = linear_prsl_loss(*leaves[:2], target, 4, 0.5, bias=leaves[2], reduction=reduction,
                                    backend=backend, chunk_size=4, return_stats=True, **kwargs)
    refs = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    want, want_stats = prsl_loss(F.linear(refs[0], refs[1], refs[2]), target, 4, 0.5, reduction=reduction,
                                 backend=backend, return_stats=True, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack(got_stats), torch.stack(want_stats), rtol=1e-5, atol=1e-6)
    upstream = torch.linspace(0.5, 1.5, got.numel(), device=device).reshape(got.shape)
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    for a, b in zip(leaves, refs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- HF hooks (tests/test_hf.py is shared work in
# progress; these cover only what the options add)

def test_hf_token_losses_take_the_options_and_log_accuracy():
    from prsl_kernels.hf import CEComputeLoss, PRSLLinearTokenLoss, PRSLTokenLoss, align_labels

    gen = torch.Generator().manual_seed(13)
    hidden = torch.randn(2, 6, 8, generator=gen)
    weight = torch.randn(41, 8, generator=gen)
    logits = F.linear(hidden, weight)
    labels = torch.randint(0, 41, (2, 6), generator=gen)
    labels[0, :2] = -100
    kwargs = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    targets = align_labels(labels, True)
    counted = targets != -100
    want = ref.prsl_loss_reference(logits, targets, 4, 0.5, **kwargs)
    capped = 5.0 * torch.tanh(logits / 5.0)
    want_accuracy = ((capped.gather(-1, targets.clamp_min(0)[..., None])[..., 0] >= capped.max(-1).values)
                     & counted).sum().item() / counted.sum().item()
    for fn, args in ((PRSLTokenLoss(4, 0.5, shift=True, backend="cpp", **kwargs), (logits, labels)),
                     (PRSLLinearTokenLoss(4, 0.5, shift=True, backend="cpp", **kwargs), (hidden, weight, labels))):
        torch.testing.assert_close(fn(*args), want, rtol=1e-5, atol=1e-6)
        stats = fn.pop_stats()
        assert stats["accuracy"] == pytest.approx(want_accuracy) and stats["tokens"] == counted.sum().item()
    # Plain CE (torch's kernel) logs the same accuracy, of the uncapped logits; with an option
    # the CE baseline runs the fused kernels (k = 0) instead.
    plain = CEComputeLoss(shift=True)
    plain({"logits": logits}, labels)
    raw_accuracy = ((logits.gather(-1, targets.clamp_min(0)[..., None])[..., 0] >= logits.max(-1).values)
                    & counted).sum().item() / counted.sum().item()
    assert plain.pop_stats()["accuracy"] == pytest.approx(raw_accuracy)
    smoothed = CEComputeLoss(shift=True, backend="cpp", label_smoothing=0.1)({"logits": logits}, labels)
    torch.testing.assert_close(smoothed, F.cross_entropy(logits.reshape(-1, 41), targets.reshape(-1),
                                                         label_smoothing=0.1), rtol=2e-6, atol=2e-6)
    with pytest.raises(ValueError, match="z_loss must be a finite number >= 0"):
        PRSLTokenLoss(4, 0.5, shift=True, z_loss=-1.0)
    with pytest.raises(ValueError, match="not available with variant='released'"):
        PRSLTokenLoss(4, 0.5, shift=True, variant="released", softcap=30.0)
