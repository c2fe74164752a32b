"""binary_cross_entropy(_with_logits) against torch in fp64, on the PyTorch reference and the Triton kernels."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import triton_losses as tl_
from tests.fp64_checks import check_against_fp64
from tests.helpers import budget_close, same_error
from triton_losses.reference import _chunks

REDUCTIONS = ["none", "mean", "sum"]
# (input shape, weight shape, pos_weight shape): broadcasts along every axis, a layout that
# collapses to 4 dims (the materialising fallback), an empty batch.
BROADCASTS = [
    ((), (), ()),
    ((7,), (7,), (1,)),
    ((4, 5), (5,), (5,)),
    ((4, 5), (4, 1), (4, 1)),
    ((4, 5), (1, 5), ()),
    ((4, 5), (4, 5), (5,)),
    ((2, 3, 4), (3, 1), (4,)),
    ((2, 3, 4), (2, 1, 4), (3, 1)),
    ((2, 3, 4, 5), (3, 1, 5), (4, 1)),
    ((3, 1000), (1000,), (3, 1)),
    ((0, 5), (5,), (5,)),
]
OPTIONS = ["plain", "weight", "pos_weight", "both"]


def _bcewl_tensors(shape, w_shape, pw_shape, opt, device):
    return {
        "input": torch.randn(shape, device=device) * 3,
        "target": torch.rand(shape, device=device),
        "weight": torch.rand(w_shape, device=device) + 0.1 if opt in ("weight", "both") else None,
        "pos_weight": torch.rand(pw_shape, device=device) * 3 if opt in ("pos_weight", "both") else None,
    }


def check_bce_with_logits_matches_fp64(backend, device, shapes, opt, reduction, dtype=torch.float64):
    tensors = _bcewl_tensors(*shapes, opt, device)
    out, _ = check_against_fp64(
        lambda **kw: tl_.binary_cross_entropy_with_logits(**kw, reduction=reduction),
        lambda **kw: F.binary_cross_entropy_with_logits(**kw, reduction=reduction),
        tensors, ("input", "target"), dtype,
    )  # fmt: skip
    assert out.shape == (shapes[0] if reduction == "none" else ())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opt", OPTIONS)
@pytest.mark.parametrize("shapes", BROADCASTS, ids=str)
def test_bce_with_logits_matches_fp64(backend, device, shapes, opt, reduction):
    check_bce_with_logits_matches_fp64(backend, device, shapes, opt, reduction)


def check_bce_matches_fp64(backend, device, shapes, weighted, reduction, dtype=torch.float64):
    shape, w_shape, _ = shapes
    tensors = {
        "input": torch.rand(shape, device=device) * 0.98 + 0.01,
        "target": torch.rand(shape, device=device),
        "weight": torch.rand(w_shape, device=device) + 0.1 if weighted else None,
    }
    out, _ = check_against_fp64(
        lambda **kw: tl_.binary_cross_entropy(**kw, reduction=reduction),
        lambda **kw: F.binary_cross_entropy(**kw, reduction=reduction),
        tensors, ("input", "target"), dtype,
    )  # fmt: skip
    assert out.shape == (shape if reduction == "none" else ())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shapes", BROADCASTS, ids=str)
def test_bce_matches_fp64(backend, device, shapes, weighted, reduction):
    check_bce_matches_fp64(backend, device, shapes, weighted, reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shapes", [BROADCASTS[2], BROADCASTS[7], BROADCASTS[8]], ids=str)
def test_fp32_within_budget(backend, device, shapes, reduction):
    """fp32 inputs, fp32 accumulation: within twice torch's own fp32 error of the fp64 result."""
    check_bce_with_logits_matches_fp64(backend, device, shapes, "both", reduction, torch.float32)
    check_bce_matches_fp64(backend, device, shapes, True, reduction, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shapes", [BROADCASTS[7], BROADCASTS[8], BROADCASTS[9]], ids=str)
def test_reference_many_chunks(backend, device, shapes, dtype, monkeypatch):
    """The CPU reference with tiny chunks: many chunks per call, and single leading indices whose rest
    is chunked again (computed into the output in place for fp32 / fp64, copied for bf16)."""
    if backend != "torch":
        pytest.skip("the chunking is the reference's")
    monkeypatch.setattr(_chunks, "CHUNK_ELEMS", 7)
    for reduction in REDUCTIONS:
        check_bce_with_logits_matches_fp64(backend, device, shapes, "both", reduction, dtype)
        check_bce_with_logits_matches_fp64(backend, device, shapes, "plain", reduction, dtype)
        check_bce_matches_fp64(backend, device, shapes, True, reduction, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_low_precision_within_budget(backend, device, reduction, dtype):
    shape = (64, 33)
    tensors = _bcewl_tensors(shape, (33,), (64, 1), "both", device)
    check_against_fp64(
        lambda **kw: tl_.binary_cross_entropy_with_logits(**kw, reduction=reduction),
        lambda **kw: F.binary_cross_entropy_with_logits(**kw, reduction=reduction),
        tensors, ("input", "target"), dtype,
    )  # fmt: skip
    probs = {"input": torch.rand(shape, device=device) * 0.9 + 0.05, "target": torch.rand(shape, device=device)}
    probs["weight"] = torch.rand(33, device=device) + 0.5
    check_against_fp64(
        lambda **kw: tl_.binary_cross_entropy(**kw, reduction=reduction),
        lambda **kw: F.binary_cross_entropy(**kw, reduction=reduction),
        probs, ("input", "target"), dtype,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("pos", [False, True])
def test_extreme_logits_are_finite_and_exact(backend, device, pos, dtype):
    x = torch.tensor([100.0, -100.0, 0.0, -120.0, 120.0, 30.0, -30.0, 1e-4, 17.0, -17.0], device=device)
    y = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.5, 1.0, 0.0], device=device)
    tensors = {"input": x, "target": y, "pos_weight": torch.full((10,), 3.0, device=device) if pos else None}
    out, _ = check_against_fp64(
        lambda **kw: tl_.binary_cross_entropy_with_logits(**kw, reduction="none"),
        lambda **kw: F.binary_cross_entropy_with_logits(**kw, reduction="none"),
        tensors, ("input", "target"), dtype,
    )  # fmt: skip
    assert torch.isfinite(out).all()
    assert out[0].item() == pytest.approx(100.0) and out[1].item() == pytest.approx(300.0 if pos else 100.0)
    x0 = torch.zeros(1, device=device, requires_grad=True)
    (g,) = torch.autograd.grad(tl_.binary_cross_entropy_with_logits(x0, y[2:3], reduction="sum"), x0)
    assert g.item() == pytest.approx(0.5)


def test_infinite_logits_give_torchs_nan_and_inf(backend, device):
    x = torch.tensor([float("inf"), float("inf"), float("-inf"), float("-inf"), 0.5], device=device)
    y = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5], device=device)
    for pw in (None, torch.full((5,), 2.0, device=device)):
        tensors = {"input": x, "target": y, "pos_weight": pw}
        check_against_fp64(
            lambda **kw: tl_.binary_cross_entropy_with_logits(**kw, reduction="none"),
            lambda **kw: F.binary_cross_entropy_with_logits(**kw, reduction="none"),
            tensors, ("input", "target"), torch.float32,
        )  # fmt: skip


def test_bce_log_clamp_and_gradient_eps(backend, device):
    p = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5, 1e-30], dtype=torch.float64, device=device)
    y = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 1.0], dtype=torch.float64, device=device)
    out, _ = check_against_fp64(
        lambda **kw: tl_.binary_cross_entropy(**kw, reduction="none"),
        lambda **kw: F.binary_cross_entropy(**kw, reduction="none"),
        {"input": p, "target": y}, ("input", "target"), torch.float64,
        up=torch.ones(6, dtype=torch.float64),
    )  # fmt: skip
    assert out[:4].tolist() == [100.0, 100.0, 0.0, 0.0]
    gp, gy = torch.autograd.grad(
        tl_.binary_cross_entropy(p.requires_grad_(), y.requires_grad_(), reduction="sum"), (p, y)
    )
    eps = torch.tensor(1e-12, dtype=torch.float32).item()  # torch divides by 1e-12 rounded to fp32
    assert gp[:2].tolist() == [-1 / eps, 1 / eps] and gy[:2].tolist() == [float("inf"), float("-inf")]


def test_noncontiguous_and_broadcast_views_match_contiguous(backend, device):
    base = torch.randn(6, 10, device=device)
    x = base[:, ::2]  # strided columns
    xt = torch.randn(5, 6, device=device).t()  # transposed
    t = torch.rand(1, 5, device=device).expand(6, 5)  # stride-0 target
    pw = torch.rand(5, device=device)
    for inp in (x, xt):
        a = inp.detach().requires_grad_()
        b = inp.detach().contiguous().requires_grad_()
        tb = t.contiguous()
        for reduction in REDUCTIONS:
            la = tl_.binary_cross_entropy_with_logits(a, t, pos_weight=pw, reduction=reduction)
            lb = tl_.binary_cross_entropy_with_logits(b, tb, pos_weight=pw, reduction=reduction)
            torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
            up = torch.randn_like(la)
            torch.testing.assert_close(torch.autograd.grad(la, a, up)[0], torch.autograd.grad(lb, b, up)[0])


def test_target_gradient_alone_and_inputs_untouched(backend, device):
    x = torch.randn(4, 5, device=device)
    t = torch.rand(4, 5, device=device, requires_grad=True)
    pw = torch.rand(5, device=device) * 2
    x0, t0 = x.clone(), t.detach().clone()
    (gt,) = torch.autograd.grad(tl_.binary_cross_entropy_with_logits(x, t, pos_weight=pw), t)
    (rt,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(x, t, pos_weight=pw), t)
    torch.testing.assert_close(gt, rt)
    assert torch.equal(x, x0) and torch.equal(t.detach(), t0)


def test_backward_twice_with_retain_graph(backend, device):
    x = torch.randn(3, 7, device=device, requires_grad=True)
    t = torch.rand(3, 7, device=device)
    loss = tl_.binary_cross_entropy_with_logits(x, t, weight=torch.rand(7, device=device)) * 2.5
    loss.backward(retain_graph=True)
    g1 = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * g1)


def test_gradcheck_fp64(backend, device):
    x = torch.randn(3, 4, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.rand(3, 4, dtype=torch.float64, device=device, requires_grad=True)
    w, pw = torch.rand(4, dtype=torch.float64, device=device), torch.rand(3, 1, dtype=torch.float64, device=device)
    assert torch.autograd.gradcheck(
        lambda a, b: tl_.binary_cross_entropy_with_logits(a, b, w, pos_weight=pw, reduction="sum"), (x, t)
    )
    p = (torch.rand(3, 4, dtype=torch.float64, device=device) * 0.8 + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: tl_.binary_cross_entropy(a, b, w, reduction="sum"), (p, t))


def _recorded(fn, *args, **kw):
    """``fn``'s result and the messages of the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kw)
    return out, [str(w.message) for w in caught]


def test_legacy_size_average_and_reduce(backend, device):
    x, t = torch.randn(4, 5, device=device), torch.rand(4, 5, device=device)
    for sa, rd in [(False, None), (True, None), (None, False)]:
        for ours_fn, ref_fn, inp in [
            (tl_.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x),
            (tl_.binary_cross_entropy, F.binary_cross_entropy, x.sigmoid()),
        ]:
            ours, w_ours = _recorded(ours_fn, inp, t, size_average=sa, reduce=rd)
            ref, w_ref = _recorded(ref_fn, inp, t, size_average=sa, reduce=rd)
            assert w_ours == w_ref and len(w_ref) == 1
            torch.testing.assert_close(ours, ref)


def test_empty_input_reductions(backend, device):
    x, t = torch.randn(0, 3, device=device), torch.rand(0, 3, device=device)
    assert tl_.binary_cross_entropy_with_logits(x, t).isnan()
    assert tl_.binary_cross_entropy(x.sigmoid(), t, reduction="sum").item() == 0.0
    assert tl_.binary_cross_entropy(x.sigmoid(), t, reduction="none").shape == (0, 3)


def test_cpu_autocast_computes_in_fp32_like_torch(backend, device):
    if device != "cpu":
        pytest.skip("CPU autocast")
    x = torch.randn(6, 5, dtype=torch.bfloat16)
    t = torch.rand(6, 5, dtype=torch.bfloat16)
    pw = torch.rand(5, dtype=torch.bfloat16) * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [
            (
                tl_.binary_cross_entropy_with_logits(x, t, pos_weight=pw),
                F.binary_cross_entropy_with_logits(x, t, pos_weight=pw),
            ),
            (tl_.binary_cross_entropy(t, t), F.binary_cross_entropy(t, t)),
        ]
    for ours, ref in outs:
        assert ours.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(ours, ref)


def test_mixed_dtypes_are_left_to_torch(backend, device):
    x, t = torch.randn(4, 5, device=device), torch.rand(4, 5, device=device, dtype=torch.float64)
    if backend == "triton":
        with pytest.raises(NotImplementedError, match="binary_cross_entropy_with_logits"):
            tl_.binary_cross_entropy_with_logits(x, t)
    else:
        ours = tl_.binary_cross_entropy_with_logits(x, t)
        torch.testing.assert_close(ours, F.binary_cross_entropy_with_logits(x, t))


def _x(*shape, device):
    return torch.randn(*shape, device=device)


def _p(*shape, device):
    return torch.rand(*shape, device=device)


def _xt(d, x=None, t=None):
    """Default logits and targets ``(4, 5)``, or the given ones."""
    return (_x(4, 5, device=d) if x is None else x), (_p(4, 5, device=d) if t is None else t)


def _pt(d, p=None, t=None):
    """Default probabilities and targets ``(4, 5)``, or the given ones."""
    return (_p(4, 5, device=d) if p is None else p), (_p(4, 5, device=d) if t is None else t)


def _with(t, idx, value):
    t = t.clone()
    t[idx] = value
    return t


BCEWL_ERRORS = {
    "target-size": lambda d: (_xt(d, t=_p(4, 6, device=d)), {}),
    "target-broadcastable-size": lambda d: (_xt(d, t=_p(4, 1, device=d)), {}),
    "weight-not-broadcastable": lambda d: ((*_xt(d), _p(3, device=d)), {}),
    "pos-weight-not-broadcastable": lambda d: (_xt(d), {"pos_weight": _p(3, device=d)}),
    "weight-enlarges": lambda d: ((*_xt(d), _p(3, 4, 5, device=d)), {}),
    "pos-weight-enlarges": lambda d: (_xt(d), {"pos_weight": _p(1, 4, 5, device=d)}),
    "long-target": lambda d: (_xt(d, t=torch.ones(4, 5, dtype=torch.long, device=d)), {}),
    "integer-input": lambda d: (_xt(d, x=torch.ones(4, 5, dtype=torch.long, device=d)), {}),
    "weight-requires-grad": lambda d: ((*_xt(d), _p(5, device=d).requires_grad_()), {}),
    "pos-weight-requires-grad": lambda d: (_xt(d), {"pos_weight": _p(5, device=d).requires_grad_()}),
    "bad-reduction": lambda d: (_xt(d), {"reduction": "avg"}),
}

BCE_ERRORS = {
    "input-above-one": lambda d: (_pt(d, p=_with(_p(4, 5, device=d), (1, 2), 1.5)), {}),
    "input-negative": lambda d: (_pt(d, p=_with(_p(4, 5, device=d), (3, 0), -0.1)), {"reduction": "none"}),
    "input-nan": lambda d: (_pt(d, p=_with(_p(4, 5, device=d), (0, 0), float("nan"))), {"reduction": "sum"}),
    "target-above-one": lambda d: (_pt(d, t=_with(_p(4, 5, device=d), (2, 2), 2.0)), {}),
    "target-nan": lambda d: (_pt(d, t=_with(_p(4, 5, device=d), (2, 2), float("nan"))), {}),
    "target-bad-first": lambda d: (
        _pt(d, p=_with(_p(4, 5, device=d), (1, 2), 1.5), t=_with(_p(4, 5, device=d), (0, 3), -1.0)),
        {},
    ),
    "input-bad-first": lambda d: (
        _pt(d, p=_with(_p(4, 5, device=d), (1, 2), 1.5), t=_with(_p(4, 5, device=d), (2, 0), 2.0)),
        {},
    ),
    "target-size": lambda d: (_pt(d, p=_p(4, 1, device=d)), {}),
    "long-target": lambda d: (_pt(d, t=torch.ones(4, 5, dtype=torch.long, device=d)), {}),
    "double-target": lambda d: (_pt(d, t=_p(4, 5, device=d).double()), {}),
    "weight-not-broadcastable": lambda d: ((*_pt(d), _p(3, device=d)), {}),
    "weight-enlarges": lambda d: ((*_pt(d), _p(3, 4, 5, device=d)), {}),
    "weight-requires-grad": lambda d: ((*_pt(d), _p(5, device=d).requires_grad_()), {}),
    "bad-reduction": lambda d: (_pt(d), {"reduction": "avg"}),
}


@pytest.mark.parametrize("case", BCEWL_ERRORS)
def test_bce_with_logits_errors_match_torch(backend, device, case):
    args, kw = BCEWL_ERRORS[case](device)
    same_error(F.binary_cross_entropy_with_logits, tl_.binary_cross_entropy_with_logits, *args, **kw)


@pytest.mark.parametrize("case", BCE_ERRORS)
def test_bce_errors_match_torch(backend, device, case, monkeypatch):
    monkeypatch.setenv("TRITON_LOSSES_CHECK_TARGETS", "1")  # CUDA: the eager error (its default is a device assert)
    args, kw = BCE_ERRORS[case](device)
    same_error(F.binary_cross_entropy, tl_.binary_cross_entropy, *args, **kw)


@pytest.mark.parametrize(
    "ours_cls,torch_cls", [(tl_.nn.BCELoss, nn.BCELoss), (tl_.nn.BCEWithLogitsLoss, nn.BCEWithLogitsLoss)]
)
def test_modules_state_dict_and_results_match_torch(backend, device, ours_cls, torch_cls):
    assert issubclass(ours_cls, torch_cls)
    kw = {"weight": torch.rand(5) + 0.1, "reduction": "sum"}
    if torch_cls is nn.BCEWithLogitsLoss:
        kw["pos_weight"] = torch.rand(5) * 2
    ours, ref = ours_cls(**kw), torch_cls(**kw)
    assert repr(ours) == repr(ref)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v)
    assert set(dict(ours.named_buffers())) == set(kw) - {"reduction"}
    ours2 = ours_cls(**{k: torch.zeros_like(v) if k != "reduction" else v for k, v in kw.items()})
    ours2.load_state_dict(ref.state_dict())
    ours2, ref = ours2.to(device=device, dtype=torch.float64), ref.to(device=device, dtype=torch.float64)
    assert ours2.weight.dtype == torch.float64
    x = torch.randn(4, 5, dtype=torch.float64, device=device)
    x = x if torch_cls is nn.BCEWithLogitsLoss else x.sigmoid()
    x.requires_grad_()
    t = torch.rand(4, 5, dtype=torch.float64, device=device)
    a, b = ours2(x, t), ref(x, t)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(a, x)[0], torch.autograd.grad(b, x)[0])
    plain = ours_cls()
    assert plain.weight is None and plain.reduction == "mean"


def test_bce_with_logits_module_default_mean(backend, device):
    m = tl_.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0], device=device))
    x, t = torch.randn(3, 4, device=device), torch.rand(3, 4, device=device)
    budget_close(m(x, t), F.binary_cross_entropy_with_logits(x.double(), t.double(), pos_weight=m.pos_weight.double()))


# ---- torch's exact gradient at the ends of [0, 1] in low precision ------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_low_precision_gradient_at_zero_and_one_is_torchs(backend, device, dtype, reduction):
    """torch rounds its 1e-12 floor to the data dtype: fp16 gives 0, so inputs of exactly 0 or 1 get
    +-inf (and NaN where input == target); bf16 gives 1.0018652574217413e-12 (gradients of +-9.9643e11)."""
    x = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5, 1e-3, 0.999], dtype=dtype, device=device, requires_grad=True)
    y = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.0, 1.0], dtype=dtype, device=device, requires_grad=True)
    up = torch.ones(7, dtype=dtype, device=device) if reduction == "none" else None
    ours = torch.autograd.grad(tl_.binary_cross_entropy(x, y, reduction=reduction), (x, y), up)
    ref = torch.autograd.grad(F.binary_cross_entropy(x, y, reduction=reduction), (x, y), up)
    for a, b in zip(ours, ref):
        assert torch.equal(a.isnan(), b.isnan()), (a, b)
        assert torch.equal(a[:4].nan_to_num(0.0), b[:4].nan_to_num(0.0)), (a, b)  # the ends: bitwise
        budget_close(a[4:], b[4:].double(), b[4:])


# ---- second derivatives -------------------------------------------------------------------------


def _double_backward(fn, x, y, up):
    """``d/d(x, y) sum(up * dloss/dx)``: the gradient's own gradient, through create_graph=True."""
    (gx,) = torch.autograd.grad(fn(x, y), x, create_graph=True)
    return torch.autograd.grad((gx * up).sum(), (x, y))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_double_backward_matches_torch(backend, device, reduction):
    d = torch.float64
    x = torch.randn(3, 4, dtype=d, device=device, requires_grad=True)
    p = (torch.rand(3, 4, dtype=d, device=device) * 0.8 + 0.1).requires_grad_()
    y = torch.rand(3, 4, dtype=d, device=device, requires_grad=True)
    w, pw = torch.rand(4, dtype=d, device=device) + 0.2, torch.rand(3, 1, dtype=d, device=device) * 2
    up = torch.randn(3, 4, dtype=d, device=device)
    red = (lambda v: (v * up).sum()) if reduction == "none" else (lambda v: v)
    cases = [
        (tl_.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x, {"weight": w, "pos_weight": pw}),
        (tl_.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x, {}),
        (tl_.binary_cross_entropy, F.binary_cross_entropy, p, {"weight": w}),
    ]
    for ours_fn, torch_fn, inp, kw in cases:
        ours = _double_backward(lambda a, b: red(ours_fn(a, b, reduction=reduction, **kw)), inp, y, up)  # noqa: B023
        ref = _double_backward(lambda a, b: red(torch_fn(a, b, reduction=reduction, **kw)), inp, y, up)  # noqa: B023
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradgradcheck_fp64(backend, device):
    d = torch.float64
    x = torch.randn(2, 3, dtype=d, device=device, requires_grad=True)
    p = (torch.rand(2, 3, dtype=d, device=device) * 0.8 + 0.1).requires_grad_()
    y = torch.rand(2, 3, dtype=d, device=device, requires_grad=True)
    w, pw = torch.rand(3, dtype=d, device=device) + 0.2, torch.rand(3, dtype=d, device=device) * 2
    assert torch.autograd.gradgradcheck(
        lambda a, b: tl_.binary_cross_entropy_with_logits(a, b, w, pos_weight=pw, reduction="none"), (x, y)
    )
    assert torch.autograd.gradgradcheck(lambda a, b: tl_.binary_cross_entropy(a, b, w, reduction="mean"), (p, y))


# ---- strided and stride-0 weights, non-tensor inputs ------------------------------------------


def test_sliced_and_stride0_weights_are_read_in_place(backend, device):
    """Every pointer argument honours its strides: a sliced weight, a stride-0 (expanded) weight and
    pos_weight, a transposed pos_weight, against contiguous copies and torch in fp64."""
    x = torch.randn(4, 5, dtype=torch.float64, device=device)
    p = torch.rand(4, 5, dtype=torch.float64, device=device) * 0.9 + 0.05
    t = torch.rand(4, 5, dtype=torch.float64, device=device)
    weights = [
        torch.rand(10, dtype=torch.float64, device=device)[::2],  # stride 2
        torch.rand(1, dtype=torch.float64, device=device).expand(5),  # stride 0
        torch.rand(5, 4, dtype=torch.float64, device=device).t(),  # (4, 5), transposed
        torch.rand(4, 1, dtype=torch.float64, device=device).expand(4, 5),  # stride 0 along the last dim
    ]
    pos_weights = [weights[2], weights[0], weights[1], torch.rand(4, 10, dtype=torch.float64, device=device)[:, 1::2]]
    for w, pw in zip(weights, pos_weights):
        for reduction in REDUCTIONS:
            for ours, ref in (
                (lambda w, pw: tl_.binary_cross_entropy_with_logits(x, t, w, pos_weight=pw, reduction=reduction),  # noqa: B023
                 lambda w, pw: F.binary_cross_entropy_with_logits(x, t, w, pos_weight=pw, reduction=reduction)),  # noqa: B023
                (lambda w, pw: tl_.binary_cross_entropy(p, t, w, reduction=reduction),  # noqa: B023
                 lambda w, pw: F.binary_cross_entropy(p, t, w, reduction=reduction)),  # noqa: B023
            ):  # fmt: skip
                torch.testing.assert_close(ours(w, pw), ref(w.contiguous(), pw.contiguous()), rtol=1e-12, atol=1e-12)
    xg = x.clone().requires_grad_()
    tg = t.clone().requires_grad_()
    w, pw = weights[1], pos_weights[3]
    got = torch.autograd.grad(tl_.binary_cross_entropy_with_logits(xg, tg, w, pos_weight=pw), (xg, tg))
    want = torch.autograd.grad(F.binary_cross_entropy_with_logits(xg, tg, w, pos_weight=pw), (xg, tg))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


LIST_INPUTS = {
    "bce-input": (F.binary_cross_entropy, tl_.binary_cross_entropy, lambda t: ([0.5, 0.5, 0.5], t), {}),
    "bce-target": (F.binary_cross_entropy, tl_.binary_cross_entropy, lambda t: (t, [0.5, 0.5, 0.5]), {}),
    "bce-weight": (F.binary_cross_entropy, tl_.binary_cross_entropy, lambda t: (t, t, [1.0, 1.0, 1.0]), {}),
    "bcewl-input": (F.binary_cross_entropy_with_logits, tl_.binary_cross_entropy_with_logits,
                    lambda t: ([0.5, 0.5, 0.5], t), {}),
    "bcewl-target": (F.binary_cross_entropy_with_logits, tl_.binary_cross_entropy_with_logits,
                     lambda t: (t, [0.5, 0.5, 0.5]), {}),
    "bcewl-pos-weight": (F.binary_cross_entropy_with_logits, tl_.binary_cross_entropy_with_logits,
                         lambda t: (t, t), {"pos_weight": [1.0, 2.0, 3.0]}),
}  # fmt: skip


@pytest.mark.parametrize("case", LIST_INPUTS)
def test_python_lists_raise_torchs_error(backend, device, case):
    torch_fn, ours_fn, make, kw = LIST_INPUTS[case]
    same_error(torch_fn, ours_fn, *make(torch.rand(3, device=device)), **kw)


# ---- autocast -----------------------------------------------------------------------------------


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
def test_cpu_autocast_follows_torchs_policy(backend, device, autocast_dtype, dtype):
    """torch's CPU autocast lists both BCE losses as fp32 ops: fp16 / bf16 operands (weights too) are
    computed and returned in fp32, fp64 is left alone; the gradient comes back in the input's dtype."""
    if device != "cpu":
        pytest.skip("CPU autocast")
    x = torch.randn(6, 5, dtype=dtype, requires_grad=True)
    p = (torch.rand(6, 5, dtype=dtype) * 0.9 + 0.05).requires_grad_()
    t = torch.rand(6, 5, dtype=dtype)
    w, pw = torch.rand(5, dtype=torch.bfloat16) + 0.5, torch.rand(5, dtype=torch.float16) * 2
    if dtype == torch.float64:
        w, pw = w.double(), pw.double()
    calls = [
        (lambda m: m.binary_cross_entropy_with_logits(x, t, weight=w, pos_weight=pw), x),
        (lambda m: m.binary_cross_entropy(p, t, weight=w, reduction="sum"), p),
    ]
    for call, inp in calls:
        with torch.autocast("cpu", dtype=autocast_dtype):
            ours, ref = call(tl_), call(F)
        assert ours.dtype == ref.dtype, (ours.dtype, ref.dtype)
        torch.testing.assert_close(ours, ref)
        g_ours, g_ref = torch.autograd.grad(ours, inp), torch.autograd.grad(ref, inp)
        assert g_ours[0].dtype == g_ref[0].dtype == dtype
        torch.testing.assert_close(g_ours[0], g_ref[0])


# ---- what a call runs on the device --------------------------------------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_mean_is_at_most_three_device_ops(device, dtype, monkeypatch):
    """binary_cross_entropy_with_logits 'mean' on the Triton path: one launch (partial sums already
    divided by the element count), one sum, one cast (none for fp32); no host sync; and the backward
    loads the one-value upstream gradient once per program (G_SCALAR)."""
    from tests.op_counts import HOST_SYNCS, count_ops
    from triton_losses.kernels import bce as k_bce

    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "triton")
    x = torch.randn(64, 33, dtype=dtype, device=device, requires_grad=True)
    t = torch.rand(64, 33, dtype=dtype, device=device)
    out = []
    ops, launches = count_ops(lambda: out.append(tl_.binary_cross_entropy_with_logits(x, t)),
                              [(k_bce, "launch_forward")], monkeypatch)  # fmt: skip
    assert launches["launch_forward"] == 1 and len(ops) + 1 <= 3 and not HOST_SYNCS & set(ops), ops
    budget_close(out[0], F.binary_cross_entropy_with_logits(x.double(), t.double()))
    seen = []
    original = k_bce.launch_backward
    monkeypatch.setattr(k_bce, "launch_backward", lambda *a, **kw: seen.append(kw["G_SCALAR"]) or original(*a, **kw))
    (g_mean,) = torch.autograd.grad(out[0], x)
    loss_none = tl_.binary_cross_entropy_with_logits(x, t, reduction="none")
    (g_none,) = torch.autograd.grad(loss_none, x, torch.full_like(loss_none, 1.0 / x.numel()))
    assert seen == [True, False]
    torch.testing.assert_close(g_mean, g_none)


def test_range_check_is_eager_on_cpu_and_opt_in_on_cuda(backend, device, monkeypatch):
    """CPU tensors: torch's CPU error (a host read). CUDA: none by default (the kernel asserts on the
    device, as torch's CUDA kernel does); ``TRITON_LOSSES_CHECK_TARGETS=1`` turns the eager error on."""
    from tests.op_counts import HOST_SYNCS, count_ops
    from triton_losses import _checks

    monkeypatch.delenv("TRITON_LOSSES_CHECK_TARGETS", raising=False)
    assert _checks.eager_checks(torch.device("cpu"))
    assert not _checks.eager_checks(torch.device("cuda"))
    monkeypatch.setenv("TRITON_LOSSES_CHECK_TARGETS", "1")
    assert _checks.eager_checks(torch.device("cuda"))
    monkeypatch.delenv("TRITON_LOSSES_CHECK_TARGETS")
    p, t = torch.rand(4, 5, device=device) * 0.9 + 0.05, torch.rand(4, 5, device=device)
    ops, _ = count_ops(lambda: tl_.binary_cross_entropy(p, t), [], monkeypatch)
    assert bool(HOST_SYNCS & set(ops)) == (device == "cpu"), ops
    import triton_losses.bce as bce_module

    monkeypatch.setattr(bce_module, "eager_checks", lambda dev: False)  # as on CUDA by default
    ops, _ = count_ops(lambda: tl_.binary_cross_entropy(p, t), [], monkeypatch)
    assert not HOST_SYNCS & set(ops), ops


# ---- custom ops, torch.compile ---------------------------------------------------------------------


@pytest.mark.interpreter
def test_custom_ops_pass_opcheck(device):
    pytest.importorskip("triton")
    from triton_losses.kernels import bce as k_bce

    x, y = torch.randn(3, 4, device=device), torch.rand(3, 4, device=device)
    w, pw = torch.rand(4, device=device).expand(3, 4), torch.rand(3, 1, device=device).expand(3, 4)
    g = torch.ones((), device=device).expand(3, 4)
    torch.library.opcheck(k_bce._bce_fwd_op, (x, y, w, pw, True, True, 12))
    torch.library.opcheck(k_bce._bce_fwd_op, (x.sigmoid(), y, None, None, False, False, 1))
    torch.library.opcheck(k_bce._bce_bwd_op, (x, y, w, pw, True, g, 1e-12, True, True))
    torch.library.opcheck(k_bce._bce_bwd_op, (x.sigmoid(), y, w, None, False, g, 1e-12, False, True))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
def test_fullgraph_compile_matches_eager(backend, device):
    torch._dynamo.reset()
    x = torch.randn(4, 5, device=device, requires_grad=True)
    p = (torch.rand(4, 5, device=device) * 0.9 + 0.05).requires_grad_()
    t = torch.rand(4, 5, device=device)

    def losses(m, x, p, t):
        a = m.binary_cross_entropy_with_logits(x, t, weight=t[0], pos_weight=torch.full_like(t[0], 2.0))
        return a + m.binary_cross_entropy(p, t, reduction="none").sum()

    compiled = torch.compile(functools.partial(losses, tl_), fullgraph=True,
                             backend="aot_eager" if backend == "triton" else "inductor")  # fmt: skip
    out = compiled(x, p, t)
    ref = losses(F, x, p, t)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(torch.autograd.grad(out, (x, p)), torch.autograd.grad(ref, (x, p))):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
