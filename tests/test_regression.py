"""The regression family (l1, mse, smooth_l1, huber, poisson_nll, gaussian_nll) against torch, on both backends."""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import triton_losses as tl_
from tests.fp64_checks import check_against_fp64
from tests.helpers import budget_close, same_error
from triton_losses.kernels import _elementwise
from triton_losses.reference import _chunks

REDUCTIONS = ["none", "mean", "sum"]
# (input shape, target shape): same shape, target broadcast along rows / columns, input broadcast, 0-d.
SHAPES = [((4, 5), (4, 5)), ((3, 4, 5), (4, 1)), ((5,), (3, 5)), ((), ())]


def _rand(shape, device, kind="normal"):
    if kind == "positive":
        return torch.rand(shape, device=device) * 3 + 0.05
    if kind == "counts":
        return torch.randint(0, 5, shape, device=device).float() + torch.rand(shape, device=device) * 0.5
    return torch.randn(shape, device=device) * 2


# name -> (ours, torch, kind of input, kind of target, grads): every option of every loss.
LOSSES = {
    "l1": (tl_.l1_loss, F.l1_loss, {}, "normal", "normal"),
    "mse": (tl_.mse_loss, F.mse_loss, {}, "normal", "normal"),
    "smooth_l1": (tl_.smooth_l1_loss, F.smooth_l1_loss, {"beta": 0.8}, "normal", "normal"),
    "smooth_l1_beta0": (tl_.smooth_l1_loss, F.smooth_l1_loss, {"beta": 0.0}, "normal", "normal"),
    "huber": (tl_.huber_loss, F.huber_loss, {"delta": 0.7}, "normal", "normal"),
    "poisson": (tl_.poisson_nll_loss, F.poisson_nll_loss, {}, "normal", "counts"),
    "poisson_full": (tl_.poisson_nll_loss, F.poisson_nll_loss, {"full": True}, "normal", "counts"),
    "poisson_rates": (tl_.poisson_nll_loss, F.poisson_nll_loss, {"log_input": False, "eps": 1e-3}, "positive",
                      "counts"),
    "poisson_rates_full": (tl_.poisson_nll_loss, F.poisson_nll_loss, {"log_input": False, "full": True}, "positive",
                           "counts"),
}  # fmt: skip


def _check(name, shapes, reduction, device, dtype=torch.float64):
    ours, ref, kw, kx, ky = LOSSES[name]
    tensors = {"input": _rand(shapes[0], device, kx), "target": _rand(shapes[1], device, ky)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the size-mismatch warning (tested below)
        return check_against_fp64(
            lambda **t: ours(**t, **kw, reduction=reduction), lambda **t: ref(**t, **kw, reduction=reduction),
            tensors, ("input", "target"), dtype,
        )  # fmt: skip


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shapes", SHAPES, ids=str)
@pytest.mark.parametrize("name", list(LOSSES))
def test_matches_fp64(backend, device, name, shapes, reduction):
    out, ref = _check(name, shapes, reduction, device)
    assert out.shape == ref.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("name", ["l1", "mse", "smooth_l1", "huber", "poisson_full", "poisson_rates"])
def test_low_precision_within_budget(backend, device, name, reduction, dtype):
    _check(name, ((6, 33), (6, 33)), reduction, device, dtype)


# (input, target, var): heteroscedastic, var one dimension short, var with a size-1 dimension.
VAR_SHAPES = [
    ((4, 5), (4, 5), (4, 5)),
    ((4, 5), (4, 5), (4,)),
    ((4, 5), (5,), (4, 1)),
    ((2, 3, 4), (2, 3, 4), (1, 3, 4)),
]


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shapes", VAR_SHAPES, ids=str)
def test_gaussian_nll_matches_fp64(backend, device, shapes, reduction, full):
    var = torch.rand(shapes[2], device=device) + 0.05
    var.view(-1)[0] = 1e-9  # clamped to eps: the gradient still flows (torch clamps under no_grad)
    tensors = {"input": _rand(shapes[0], device), "target": _rand(shapes[1], device), "var": var}
    check_against_fp64(
        lambda **t: tl_.gaussian_nll_loss(**t, full=full, eps=1e-4, reduction=reduction),
        lambda **t: F.gaussian_nll_loss(**t, full=full, eps=1e-4, reduction=reduction),
        tensors, ("input", "target", "var"), torch.float64,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gaussian_nll_number_var_and_low_precision(backend, device, reduction, dtype):
    var = torch.rand(6, 7, device=device) + 0.1
    tensors = {"input": _rand((6, 7), device), "target": _rand((6, 7), device), "var": var}
    check_against_fp64(
        lambda **t: tl_.gaussian_nll_loss(**t, reduction=reduction),
        lambda **t: F.gaussian_nll_loss(**t, reduction=reduction),
        tensors, ("input", "target", "var"), dtype,
    )  # fmt: skip
    x = _rand((6, 7), device).to(dtype).requires_grad_()
    ours = tl_.gaussian_nll_loss(x, x.detach() * 0.5, 0.37, full=True, reduction=reduction)
    x64 = x.detach().double().requires_grad_()
    ref = F.gaussian_nll_loss(x64, x64.detach() * 0.5, 0.37, full=True, reduction=reduction)
    low = F.gaussian_nll_loss(x.detach(), x.detach() * 0.5, 0.37, full=True, reduction=reduction)
    assert ours.dtype == dtype
    budget_close(ours, ref, low)


@pytest.mark.parametrize("weight_grad", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ["l1_loss", "mse_loss", "huber_loss"])
def test_weight_and_its_normalisation(backend, device, name, reduction, weight_grad):
    """l1 / mse 'mean' divide by sum(weight), huber's by the element count; the weight gets torch's gradient."""
    weight = torch.rand(4, 6, device=device) + 0.1
    tensors = {"input": _rand((4, 6), device), "target": _rand((3, 4, 6), device), "weight": weight}
    grads = ("input", "target", "weight") if weight_grad else ("input", "target")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_against_fp64(
            lambda **t: getattr(tl_, name)(**t, reduction=reduction),
            lambda **t: getattr(F, name)(**t, reduction=reduction),
            tensors, grads, torch.float64,
        )  # fmt: skip


def test_mixed_and_integer_dtypes_follow_torchs_promotion(backend, device):
    x16 = torch.randn(4, 5, device=device).half().requires_grad_()
    y32 = torch.randn(4, 5, device=device)
    counts = torch.randint(0, 4, (4, 5), device=device)
    w64 = torch.rand(4, 5, device=device, dtype=torch.float64)
    cases = [
        (lambda m: m.mse_loss(x16, y32), torch.float32),
        (lambda m: m.huber_loss(x16, y32), torch.float16),
        (lambda m: m.l1_loss(x16, counts), torch.float16),
        (lambda m: m.l1_loss(y32, y32, weight=w64), torch.float64),
        (lambda m: m.poisson_nll_loss(y32, counts, full=True), torch.float32),
        (lambda m: m.gaussian_nll_loss(x16, y32, w64), torch.float64),
    ]
    # weighted 'mean' is sum(w * loss) / sum(w), two 0-d tensors: a 0-d fp16 weight promotes bf16 to fp32
    x0, y3, w0 = torch.tensor(0.5, device=device).bfloat16(), y32[0, :3].bfloat16(), torch.tensor(2.0).half()
    cases += [
        (lambda m: m.mse_loss(x0, y3, weight=w0.to(device)), torch.float32),
        (lambda m: m.l1_loss(x0, y3, weight=w0.to(device), reduction="sum"), torch.bfloat16),
    ]
    for fn, dtype in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the size-mismatch warning of the 0-d cases
            ours, ref = fn(tl_), fn(F)
        assert ours.dtype == ref.dtype == dtype
        torch.testing.assert_close(ours, ref, rtol=1e-2, atol=2e-3)
    (g,) = torch.autograd.grad(tl_.mse_loss(x16, y32), x16)
    # torch's own mixed-dtype backward ('Found dtype Float but expected Half' in torch 2.11): promote first.
    (r,) = torch.autograd.grad(F.mse_loss(x16.float(), y32), x16)
    assert g.dtype == torch.float16
    torch.testing.assert_close(g, r, rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("name", ["l1_loss", "mse_loss"])
def test_weighted_difference_under_autocast_has_torchs_dtype(backend, device, name):
    """torch's weighted l1 / mse is a composite that autocast casts op by op (not the loss to fp32): torch
    serves it (``TRITON_LOSSES_BACKEND=triton`` says the kernels do not)."""
    x, y = _rand((4, 6), device).bfloat16(), _rand((4, 6), device).bfloat16()
    w = (torch.rand(4, 6, device=device) + 0.1).bfloat16()
    for reduction in REDUCTIONS:
        with torch.autocast(device, dtype=torch.bfloat16):
            if backend == "triton":
                with pytest.raises(NotImplementedError, match="do not support"):
                    getattr(tl_, name)(x, y, weight=w, reduction=reduction)
                continue
            ours = getattr(tl_, name)(x, y, weight=w, reduction=reduction)
            ref = getattr(F, name)(x, y, weight=w, reduction=reduction)
        assert ours.dtype == ref.dtype
        torch.testing.assert_close(ours.float(), ref.float(), rtol=2e-2, atol=1e-2)


def test_nan_inf_and_ties_as_torch(backend, device):
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([nan, 1.0, 0.0, 2.0, -inf, 0.5, 1.7], device=device)
    y = torch.tensor([0.0, nan, 0.0, 1.0, 0.0, 1.5, 0.7], device=device)  # 0 ties, |d| = beta = delta = 1
    for name in ("l1", "mse", "smooth_l1", "huber"):
        ours, ref, kw, _, _ = LOSSES[name]
        kw = dict(kw, **({"beta": 1.0} if name == "smooth_l1" else {"delta": 1.0} if name == "huber" else {}))
        check_against_fp64(
            lambda ours=ours, kw=kw, **t: ours(**t, **kw, reduction="none"),
            lambda ref=ref, kw=kw, **t: ref(**t, **kw, reduction="none"),
            {"input": x, "target": y}, ("input", "target"), torch.float64,
        )  # fmt: skip
    counts = torch.tensor([0.0, 0.5, 1.0, 2.0, -1.0, 3.0, 1.0], device=device)  # Stirling term only where > 1
    check_against_fp64(
        lambda **t: tl_.poisson_nll_loss(**t, full=True, reduction="none"),
        lambda **t: F.poisson_nll_loss(**t, full=True, reduction="none"),
        {"input": x.nan_to_num(0.3, 1.0, -1.0), "target": counts}, ("input", "target"), torch.float64,
    )  # fmt: skip


def test_noncontiguous_inputs_and_fused_backward_twice(backend, device):
    base = torch.randn(6, 10, device=device)
    x = base[:, ::2].requires_grad_()
    y = torch.randn(5, 6, device=device).t().requires_grad_()
    xr, yr = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    loss = tl_.smooth_l1_loss(x, y, beta=0.5) * 3.0
    ref = F.smooth_l1_loss(xr, yr, beta=0.5) * 3.0
    torch.testing.assert_close(loss, ref)
    loss.backward(retain_graph=True)
    ref.backward(retain_graph=True)
    torch.testing.assert_close(x.grad, xr.grad)
    loss.backward()  # the second backward recomputes (the fused gradient was handed out)
    ref.backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(y.grad, yr.grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_reference_many_chunks(backend, device, dtype, monkeypatch):
    if backend != "torch":
        pytest.skip("the chunking is the reference's")
    monkeypatch.setattr(_chunks, "CHUNK_ELEMS", 7)
    for name in ("mse", "huber", "poisson_full"):
        for reduction in REDUCTIONS:
            _check(name, ((3, 4, 5), (4, 1)), reduction, device, dtype)


def test_size_mismatch_and_legacy_warnings(backend, device):
    x, y = torch.randn(3, 4, device=device), torch.randn(4, device=device)
    for name in ("l1_loss", "mse_loss", "smooth_l1_loss", "huber_loss"):
        with pytest.warns(UserWarning, match=r"Using a target size \(torch.Size\(\[4\]\)\) that is different"):
            getattr(tl_, name)(x, y)
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        out = tl_.mse_loss(x, x * 2, size_average=False)
    torch.testing.assert_close(out, F.mse_loss(x, x * 2, reduction="sum"))
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        out = tl_.poisson_nll_loss(x, x.abs(), reduce=False)
    assert out.shape == x.shape


def test_empty_inputs(backend, device):
    x = torch.randn(0, 3, device=device, requires_grad=True)
    for name in ("l1_loss", "mse_loss", "smooth_l1_loss", "huber_loss", "poisson_nll_loss"):
        for reduction in REDUCTIONS:
            ours, ref = (
                getattr(tl_, name)(x, x.detach(), reduction=reduction),
                getattr(F, name)(x, x, reduction=reduction),
            )
            assert ours.shape == ref.shape and torch.equal(ours.isnan(), ref.isnan())
            if reduction == "sum":
                assert ours.item() == 0.0
    out = tl_.gaussian_nll_loss(x, x.detach(), torch.ones(0, 3, device=x.device))
    assert out.isnan() and torch.autograd.grad(out, x)[0].shape == (0, 3)


def _bad_calls(device):
    x, y = torch.randn(3, 4, device=device), torch.randn(3, 4, device=device)
    return {
        "shapes": lambda m: m.mse_loss(x, torch.randn(5, device=device)),
        "reduction": lambda m: m.l1_loss(x, y, reduction="avg"),
        "weighted_reduction": lambda m: m.l1_loss(x, y, reduction="avg", weight=torch.rand(3, 4)),
        "weight_size": lambda m: m.mse_loss(x, y, weight=torch.rand(4)),
        "beta": lambda m: m.smooth_l1_loss(x, y, beta=-1.0),
        "delta": lambda m: m.huber_loss(x, y, delta=0.0),
        "integer_input": lambda m: m.mse_loss(x.long(), y.long()),
        "poisson_reduction": lambda m: m.poisson_nll_loss(x, y, reduction="avg"),
        "var_negative": lambda m: m.gaussian_nll_loss(x, y, -torch.rand(3, 4)),
        "var_negative_number": lambda m: m.gaussian_nll_loss(x, y, -1.0),
        "var_size": lambda m: m.gaussian_nll_loss(x, y, torch.rand(4)),
        "var_two_dims": lambda m: m.gaussian_nll_loss(x, y, torch.rand(1, 1)),
        "gaussian_reduction": lambda m: m.gaussian_nll_loss(x, y, torch.rand(3, 4), reduction="avg"),
        "var_int": lambda m: m.gaussian_nll_loss(x, y, 1),
        # torch subtracts a bool target in these (its RuntimeError); mse and smooth_l1 with beta > 0 accept it
        "bool_target_l1": lambda m: m.l1_loss(x, y > 0),
        "bool_target_smooth_l1_beta_0": lambda m: m.smooth_l1_loss(x, y > 0, beta=0.0),
        "bool_target_poisson_full": lambda m: m.poisson_nll_loss(x, y > 0, full=True),
    }


@pytest.mark.parametrize("case", list(_bad_calls("cpu")))
def test_errors_match_torch(backend, device, case):
    fn = _bad_calls(device)[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same_error(lambda: fn(F), lambda: fn(tl_))


@pytest.mark.parametrize(
    "reduction", ["mean", pytest.param("none", marks=pytest.mark.slow), pytest.param("sum", marks=pytest.mark.slow)]
)
def test_double_backward(backend, device, reduction):
    """Double backward is torch's own (rebuilt from its differentiable functions); tiny fp64 shapes."""
    x = torch.randn(2, 2, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.randn(2, 2, dtype=torch.float64, device=device, requires_grad=True)
    v = (torch.rand(2, 2, dtype=torch.float64, device=device) + 0.2).requires_grad_()
    w = torch.rand(2, 2, dtype=torch.float64, device=device)
    fns = [
        lambda a, b, c: tl_.mse_loss(a, b, reduction=reduction, weight=w),
        lambda a, b, c: tl_.huber_loss(a, b, reduction=reduction, delta=0.5),
        lambda a, b, c: tl_.poisson_nll_loss(a, b.abs() * 3, full=True, reduction=reduction),
        lambda a, b, c: tl_.gaussian_nll_loss(a, b, c, reduction=reduction),
    ]
    for fn in fns:
        assert torch.autograd.gradgradcheck(fn, (x, y, v))


MODULES = [
    (tl_.nn.L1Loss, nn.L1Loss, {"reduction": "sum"}),
    (tl_.nn.MSELoss, nn.MSELoss, {}),
    (tl_.nn.SmoothL1Loss, nn.SmoothL1Loss, {"beta": 0.3}),
    (tl_.nn.HuberLoss, nn.HuberLoss, {"delta": 0.4, "reduction": "none"}),
    (tl_.nn.PoissonNLLLoss, nn.PoissonNLLLoss, {"log_input": False, "full": True, "eps": 1e-4}),
]


@pytest.mark.parametrize("ours_cls, torch_cls, kwargs", MODULES, ids=lambda c: getattr(c, "__name__", ""))
def test_modules_match_torch(backend, device, ours_cls, torch_cls, kwargs):
    ours, ref = ours_cls(**kwargs), torch_cls(**kwargs)
    assert isinstance(ours, torch_cls) and ours.state_dict().keys() == ref.state_dict().keys()
    assert repr(ours) == repr(ref)
    x, y = torch.rand(4, 5, device=device) + 0.1, torch.rand(4, 5, device=device) * 3
    torch.testing.assert_close(ours(x, y), ref(x, y))
    g = tl_.nn.GaussianNLLLoss(full=True, eps=1e-3)
    assert isinstance(g, nn.GaussianNLLLoss)
    torch.testing.assert_close(g(x, y, x), nn.GaussianNLLLoss(full=True, eps=1e-3)(x, y, x))


def test_custom_ops_pass_opcheck(device):
    pytest.importorskip("triton")
    from triton_losses.kernels import regression as k

    x, y, v, g = (torch.randn(3, 5, device=device) for _ in range(4))
    v = v.abs() + 0.1
    torch.library.opcheck(k._regression_fwd_op, (x, y, v, "gaussian", 1e-6, 0.0, True, True, False, torch.float32))
    torch.library.opcheck(k._regression_fwd_op, (x, y, None, "huber", 0.5, 0.0, False, True, True, torch.float32))
    torch.library.opcheck(k._regression_bwd_op, (x, y, v, "gaussian", 1e-6, 0.0, False, True, g, True, True, True))
    counts = y.abs() * 3  # full=True: positive targets (the target gradient is NaN where it is <= 0)
    torch.library.opcheck(
        k._regression_bwd_op, (x, counts, None, "poisson", 1e-8, 0.0, True, True, g, True, True, False)
    )


def test_fullgraph_compile_matches_eager(backend, device):
    """Every regression loss in one ``torch.compile(fullgraph=True)`` graph (custom ops on the triton backend)."""
    torch._dynamo.reset()

    def losses(m, x, y, v):
        return (
            m.l1_loss(x, y) + m.mse_loss(x, y, reduction="sum") + m.smooth_l1_loss(x, y, beta=0.5)
            + m.huber_loss(x, y, delta=0.5) + m.poisson_nll_loss(x, y.abs(), full=True)
            + m.gaussian_nll_loss(x, y, v)
        )  # fmt: skip

    x = torch.randn(4, 6, device=device, requires_grad=True)
    y = torch.randn(4, 6, device=device, requires_grad=True)
    v = torch.rand(4, 6, device=device) + 0.1
    compiled = torch.compile(lambda a, b, c: losses(tl_, a, b, c), fullgraph=True, backend="aot_eager")
    out = compiled(x, y, v)
    ref = losses(F, x, y, v)
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out, (x, y)), torch.autograd.grad(ref, (x, y))):
        torch.testing.assert_close(a, b)


@pytest.mark.interpreter
@pytest.mark.parametrize("rows_i32", [True, False], ids=["int32 rows", "int64 rows"])
def test_elementwise_rows_divided_in_int32_and_int64(device, monkeypatch, rows_i32):
    """The elementwise kernels (regression, margin, BCE, KL) split a row index into broadcast coordinates
    with an int32 division below 2**31 rows (``ROWS_I32``) and an int64 one above: both give torch's values."""
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "triton")
    seen = []

    def recorded(dims, block_r):
        seen.append((dims[1], rows_i32 and shipped(dims, block_r)))
        return seen[-1][1]

    shipped = _elementwise.rows_i32
    monkeypatch.setattr(_elementwise, "rows_i32", recorded)
    x, y = (torch.randn(*shape, device=device, dtype=torch.float64) for shape in ((3, 4, 5), (4, 1)))
    pairs = [
        (tl_.soft_margin_loss, F.soft_margin_loss, y.sign()),
        (tl_.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, y.sigmoid()),
        (partial(tl_.kl_div, log_target=True), partial(F.kl_div, log_target=True), y),
    ]
    for reduction in ("none", "mean"):
        _check("mse", ((3, 4, 5), (4, 1)), reduction, device)
        for ours, ref, target in pairs:
            t = target.expand_as(x)
            budget_close(ours(x, t, reduction=reduction), ref(x, t, reduction=reduction))
    assert any(d1 > 1 for d1, _ in seen) and {flag for _, flag in seen} == {rows_i32}, seen
