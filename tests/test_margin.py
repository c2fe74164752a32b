"""The margin family (soft_margin, hinge_embedding, margin_ranking) against torch, on both backends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import triton_losses as tl_
from tests.fp64_checks import check_against_fp64
from tests.helpers import same_error
from triton_losses.reference import _chunks

REDUCTIONS = ["none", "mean", "sum"]


def _labels(shape, device, other=False):
    """+-1 labels; with ``other`` also 0 and 2 (hinge adds both of its terms there, as torch)."""
    values = torch.tensor([1.0, -1.0, 0.0, 2.0] if other else [1.0, -1.0], device=device)
    return values[torch.randint(0, len(values), shape, device=device)]


def check_soft_margin_matches_fp64(backend, device, shapes, reduction, dtype):
    tensors = {"input": torch.randn(shapes[0], device=device) * 3, "target": _labels(shapes[1], device)}
    out, ref = check_against_fp64(
        lambda **t: tl_.soft_margin_loss(**t, reduction=reduction),
        lambda **t: F.soft_margin_loss(**t, reduction=reduction),
        tensors, ("input",), dtype,
    )  # fmt: skip
    assert out.shape == ref.shape


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shapes", [((4, 5), (4, 5)), ((3, 4, 5), (4, 1)), ((), ())], ids=str)
def test_soft_margin_matches_fp64(backend, device, shapes, reduction, dtype):
    check_soft_margin_matches_fp64(backend, device, shapes, reduction, dtype)


def check_hinge_embedding_matches_fp64(backend, device, shapes, reduction, margin, dtype):
    tensors = {"input": torch.randn(shapes[0], device=device) * 2, "target": _labels(shapes[1], device, other=True)}
    check_against_fp64(
        lambda **t: tl_.hinge_embedding_loss(**t, margin=margin, reduction=reduction),
        lambda **t: F.hinge_embedding_loss(**t, margin=margin, reduction=reduction),
        tensors, ("input",), dtype,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("margin", [1.0, 0.3])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shapes", [((4, 5), (4, 5)), ((3, 5), (5,)), ((5,), (2, 5))], ids=str)
def test_hinge_embedding_matches_fp64(backend, device, shapes, reduction, margin, dtype):
    check_hinge_embedding_matches_fp64(backend, device, shapes, reduction, margin, dtype)


def check_margin_ranking_matches_fp64(backend, device, shapes, reduction, margin, dtype):
    tensors = {
        "input1": torch.randn(shapes[0], device=device),
        "input2": torch.randn(shapes[1], device=device),
        "target": _labels(shapes[2], device) * (torch.rand(shapes[2], device=device) + 0.5),
    }
    check_against_fp64(
        lambda **t: tl_.margin_ranking_loss(**t, margin=margin, reduction=reduction),
        lambda **t: F.margin_ranking_loss(**t, margin=margin, reduction=reduction),
        tensors, ("input1", "input2", "target"), dtype,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("margin", [0.0, 0.4])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shapes", [((6,), (6,), (6,)), ((4, 5), (1, 5), (4, 1)), ((), (), ())], ids=str)
def test_margin_ranking_matches_fp64(backend, device, shapes, reduction, margin, dtype):
    check_margin_ranking_matches_fp64(backend, device, shapes, reduction, margin, dtype)


def test_ties_nan_and_extremes_as_torch(backend, device):
    nan = float("nan")
    x1 = torch.tensor([0.0, 1.0, nan, 2.0, 0.5], dtype=torch.float64, device=device)
    x2 = torch.tensor([0.0, 1.0, 0.0, nan, 0.5], dtype=torch.float64, device=device)
    t = torch.tensor([1.0, -1.0, 1.0, 1.0, nan], dtype=torch.float64, device=device)
    check_against_fp64(  # u == 0 passes the gradient (clamp_min's >=); NaN gives torch's NaN gradients
        lambda **k: tl_.margin_ranking_loss(**k, reduction="none"),
        lambda **k: F.margin_ranking_loss(**k, reduction="none"),
        {"input1": x1, "input2": x2, "target": t}, ("input1", "input2", "target"), torch.float64,
    )  # fmt: skip
    x = torch.tensor([1.0, nan, nan, nan, 2.0, 1.0], dtype=torch.float64, device=device)
    lab = torch.tensor([-1.0, 1.0, -1.0, 0.0, nan, 1.0], dtype=torch.float64, device=device)
    check_against_fp64(
        lambda **k: tl_.hinge_embedding_loss(**k, reduction="none"),
        lambda **k: F.hinge_embedding_loss(**k, reduction="none"),
        {"input": x, "target": lab}, ("input",), torch.float64,
    )  # fmt: skip
    big = torch.tensor([-100.0, 100.0, -30.0, 1e-3], device=device, requires_grad=True)
    lab = torch.tensor([1.0, -1.0, 1.0, 1.0], device=device)
    out = tl_.soft_margin_loss(big, lab, reduction="none")
    ref = F.soft_margin_loss(big.detach().double(), lab.double(), reduction="none")
    torch.testing.assert_close(out.double(), ref)  # finite: torch's fp32 overflows to inf here
    (g,) = torch.autograd.grad(out.sum(), big)
    assert torch.isfinite(g).all() and g[0].item() == pytest.approx(-1.0)


def test_integer_targets_and_mixed_dtypes(backend, device):
    x = torch.randn(4, 5, device=device, requires_grad=True)
    lab = torch.randint(0, 2, (4, 5), device=device) * 2 - 1
    for fn in (
        lambda m: m.hinge_embedding_loss(x, lab),
        lambda m: m.soft_margin_loss(x, lab),
        lambda m: m.margin_ranking_loss(x, x.detach().double(), lab),
        lambda m: m.hinge_embedding_loss(x.half(), lab.double()),
    ):
        ours, ref = fn(tl_), fn(F)
        assert ours.dtype == ref.dtype
        torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3)
        (g,) = torch.autograd.grad(ours, x)
        (r,) = torch.autograd.grad(ref, x)
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)


def test_target_gradient_rules(backend, device):
    """hinge: the target gets no gradient; soft_margin refuses a target that requires grad (torch's error)."""
    x = torch.randn(3, 4, device=device)
    lab = _labels((3, 4), device).requires_grad_()
    out = tl_.hinge_embedding_loss(x, lab)
    assert not out.requires_grad and not F.hinge_embedding_loss(x, lab).requires_grad
    same_error(F.soft_margin_loss, tl_.soft_margin_loss, x, lab)


def test_fused_backward_twice_and_upstream_scale(backend, device):
    a = torch.randn(4, 6, device=device, requires_grad=True)
    ar = a.detach().clone().requires_grad_()
    t = _labels((4, 6), device)
    loss = tl_.margin_ranking_loss(a, a.detach().flip(0), t, margin=0.2, reduction="sum") * 1.5
    ref = F.margin_ranking_loss(ar, ar.detach().flip(0), t, margin=0.2, reduction="sum") * 1.5
    loss.backward(retain_graph=True)
    ref.backward(retain_graph=True)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, ar.grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_reference_many_chunks(backend, device, dtype, monkeypatch):
    if backend != "torch":
        pytest.skip("the chunking is the reference's")
    monkeypatch.setattr(_chunks, "CHUNK_ELEMS", 7)
    for reduction in REDUCTIONS:
        check_soft_margin_matches_fp64(backend, device, ((3, 4, 5), (4, 1)), reduction, dtype)
        check_hinge_embedding_matches_fp64(backend, device, ((3, 5), (5,)), reduction, 0.5, dtype)
        check_margin_ranking_matches_fp64(backend, device, ((4, 5), (1, 5), (4, 1)), reduction, 0.1, dtype)


def test_legacy_arguments_and_empty_inputs(backend, device):
    x = torch.randn(3, 4, device=device)
    lab = _labels((3, 4), device)
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        out = tl_.soft_margin_loss(x, lab, size_average=False)
    torch.testing.assert_close(out, F.soft_margin_loss(x, lab, reduction="sum"))
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        out = tl_.hinge_embedding_loss(x, lab, reduce=False)
    assert out.shape == x.shape
    e = torch.randn(0, 2, device=device, requires_grad=True)
    el = torch.ones(0, 2, device=device)
    for reduction in REDUCTIONS:
        for fn in (
            lambda m, r=reduction: m.soft_margin_loss(e, el, reduction=r),
            lambda m, r=reduction: m.hinge_embedding_loss(e, el, reduction=r),
            lambda m, r=reduction: m.margin_ranking_loss(e, e, el, reduction=r),
        ):
            ours, ref = fn(tl_), fn(F)
            assert ours.shape == ref.shape and torch.equal(ours.isnan(), ref.isnan())


def _bad_calls(device):
    x = torch.randn(3, 4, device=device)
    lab = torch.ones(3, 4, device=device)
    return {
        "soft_shapes": lambda m: m.soft_margin_loss(x[0], lab),
        "soft_reduction": lambda m: m.soft_margin_loss(x, lab, reduction="avg"),
        "soft_integer": lambda m: m.soft_margin_loss(x.long(), lab.long()),
        "hinge_shapes": lambda m: m.hinge_embedding_loss(x, torch.ones(5, device=device)),
        "hinge_reduction": lambda m: m.hinge_embedding_loss(x, lab, reduction="avg"),
        "hinge_integer": lambda m: m.hinge_embedding_loss(x.long(), lab),
        "ranking_dims": lambda m: m.margin_ranking_loss(x, x[0], lab),
        "ranking_shapes": lambda m: m.margin_ranking_loss(x, torch.randn(3, 5, device=device), lab),
        "ranking_reduction": lambda m: m.margin_ranking_loss(x, x, lab, reduction="avg"),
    }


@pytest.mark.parametrize("case", list(_bad_calls("cpu")))
def test_errors_match_torch(backend, device, case):
    fn = _bad_calls(device)[case]
    same_error(lambda: fn(F), lambda: fn(tl_))


@pytest.mark.parametrize("reduction", ["mean", pytest.param("none", marks=pytest.mark.slow)])
def test_double_backward(backend, device, reduction):
    x = torch.randn(2, 2, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.randn(2, 2, dtype=torch.float64, device=device, requires_grad=True)
    lab = _labels((2, 2), device).double()
    fns = [
        lambda a, b: tl_.soft_margin_loss(a, lab, reduction=reduction),
        lambda a, b: tl_.hinge_embedding_loss(a, lab, margin=2.0, reduction=reduction),
        lambda a, b: tl_.margin_ranking_loss(a, b, lab * 0.7, margin=0.1, reduction=reduction),
    ]
    for fn in fns:
        assert torch.autograd.gradgradcheck(fn, (x, y))


@pytest.mark.parametrize(
    "ours_cls, torch_cls, kwargs",
    [
        (tl_.nn.SoftMarginLoss, nn.SoftMarginLoss, {"reduction": "sum"}),
        (tl_.nn.HingeEmbeddingLoss, nn.HingeEmbeddingLoss, {"margin": 0.5}),
        (tl_.nn.MarginRankingLoss, nn.MarginRankingLoss, {"margin": 0.2, "reduction": "none"}),
    ],
    ids=lambda c: getattr(c, "__name__", ""),
)
def test_modules_match_torch(backend, device, ours_cls, torch_cls, kwargs):
    ours, ref = ours_cls(**kwargs), torch_cls(**kwargs)
    assert isinstance(ours, torch_cls) and ours.state_dict().keys() == ref.state_dict().keys()
    assert repr(ours) == repr(ref)
    x, y, lab = torch.randn(6, device=device), torch.randn(6, device=device), _labels((6,), device)
    args = (x, y, lab) if torch_cls is nn.MarginRankingLoss else (x, lab)
    torch.testing.assert_close(ours(*args), ref(*args))


def test_custom_ops_pass_opcheck(device):
    pytest.importorskip("triton")
    from triton_losses.kernels import margin as k

    a, b, g = (torch.randn(3, 5, device=device) for _ in range(3))
    t = _labels((3, 5), device)
    torch.library.opcheck(k._margin_fwd_op, (a, b, t, "ranking", 0.1, False, torch.float32))
    torch.library.opcheck(k._margin_fwd_op, (a, t, None, "soft_margin", 0.0, True, torch.float32))
    torch.library.opcheck(k._margin_bwd_op, (a, b, t, "ranking", 0.1, g, True, True, True))
    torch.library.opcheck(k._margin_bwd_op, (a, t, None, "hinge", 1.0, g, True, False, False))


def test_fullgraph_compile_matches_eager(backend, device):
    """Every margin loss in one ``torch.compile(fullgraph=True)`` graph (custom ops on the triton backend)."""
    torch._dynamo.reset()

    def losses(m, x, y, t):
        return m.soft_margin_loss(x, t) + m.hinge_embedding_loss(x, t, margin=0.5) + m.margin_ranking_loss(x, y, t)

    x = torch.randn(4, 6, device=device, requires_grad=True)
    y = torch.randn(4, 6, device=device, requires_grad=True)
    t = _labels((4, 6), device)
    compiled = torch.compile(lambda a, b, c: losses(tl_, a, b, c), fullgraph=True, backend="aot_eager")
    out = compiled(x, y, t)
    ref = losses(F, x, y, t)
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out, (x, y)), torch.autograd.grad(ref, (x, y))):
        torch.testing.assert_close(a, b)
