"""multilabel_soft_margin_loss, multilabel_margin_loss and multi_margin_loss against torch.

Every test runs on the PyTorch reference and on the Triton kernels (interpreter) through the
``backend`` fixture; values and gradients are compared with torch in fp64 (error budget of
``tests.helpers.budget_close`` for the low precisions).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import triton_losses as tl_
from tests.helpers import budget_close, same_error
from triton_losses.kernels import multi_margin as kmm

REDUCTIONS = ["none", "mean", "sum"]


def _compare(ours, theirs, inputs: list, dtype=torch.float64, lowp: bool = True):
    """Loss and gradients (random upstream for 'none') of ``ours`` vs ``theirs`` in fp64 and in ``dtype``."""
    ref_in = [t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in inputs]
    my_in = [t.detach().to(dtype).requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in inputs]
    low_in = [t.detach().to(dtype).requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in inputs]
    out, ref = ours(*my_in), theirs(*ref_in)
    assert out.dtype == dtype and out.shape == ref.shape
    low = theirs(*low_in) if lowp and dtype != torch.float64 else None
    budget_close(out, ref, low)
    wants = [i for i, t in enumerate(inputs) if t.requires_grad]
    if not wants:
        return out
    up = torch.randn(ref.shape, dtype=torch.float64) if ref.dim() else torch.tensor(1.7, dtype=torch.float64)
    g_out = torch.autograd.grad(out, [my_in[i] for i in wants], up.to(dtype))
    g_ref = torch.autograd.grad(ref, [ref_in[i] for i in wants], up)
    g_low = torch.autograd.grad(low, [low_in[i] for i in wants], up.to(dtype)) if low is not None else [None] * 9
    for a, b, c in zip(g_out, g_ref, g_low):
        assert a.dtype == dtype
        budget_close(a, b, c)
    return out


def _lists(N: int, C: int, gen=None) -> torch.Tensor:
    """Random multilabel target lists: some classes (duplicates allowed), then -1, then junk."""
    y = torch.randint(0, C, (N, C), generator=gen)
    for i in range(N):
        n = int(torch.randint(0, C + 1, (1,), generator=gen))
        if n < C:
            y[i, n] = -1
    return y


# ---- multilabel_soft_margin_loss ---------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_mlsm_fp64(backend, reduction, weighted):
    x = torch.randn(6, 9, requires_grad=True) * 4
    t = torch.rand(6, 9, requires_grad=True)
    w = torch.rand(9) + 0.2
    args = [x, t] + ([w] if weighted else [])
    _compare(
        lambda *a: tl_.multilabel_soft_margin_loss(*a, reduction=reduction),
        lambda *a: F.multilabel_soft_margin_loss(*a, reduction=reduction),
        args,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mlsm_low_precision(backend, dtype):
    x = (torch.randn(5, 12) * 3).requires_grad_()
    t = torch.rand(5, 12).requires_grad_()
    _compare(tl_.multilabel_soft_margin_loss, F.multilabel_soft_margin_loss, [x, t, torch.rand(12)], dtype)


@pytest.mark.parametrize(
    "x_shape, t_shape, w_shape",
    [((7,), (7,), None), ((2, 3, 5), (3, 5), (5,)), ((4, 5), (1, 5), (4, 1)), ((4, 5), (5,), (4, 5))],
    ids=str,
)
def test_mlsm_shapes_and_broadcast(backend, x_shape, t_shape, w_shape):
    x = torch.randn(x_shape, requires_grad=True)
    t = torch.rand(t_shape, requires_grad=True)
    args = [x, t] + ([torch.rand(w_shape)] if w_shape else [])
    for reduction in REDUCTIONS:
        _compare(
            lambda *a, r=reduction: tl_.multilabel_soft_margin_loss(*a, reduction=r),
            lambda *a, r=reduction: F.multilabel_soft_margin_loss(*a, reduction=r),
            args,
        )


def test_mlsm_integer_target_and_promotion(backend):
    x = torch.randn(3, 4, requires_grad=True)
    t = torch.randint(0, 2, (3, 4))
    _compare(tl_.multilabel_soft_margin_loss, F.multilabel_soft_margin_loss, [x, t], torch.float32)
    out = tl_.multilabel_soft_margin_loss(x.float(), torch.rand(3, 4, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_mlsm_nonfinite_and_empty(backend):
    x = torch.tensor([[float("inf"), -float("inf"), 0.0, 40.0], [-40.0, 1.0, float("nan"), 2.0]])
    t = torch.tensor([[1.0, 1.0, 0.5, 0.0], [1.0, 0.0, 1.0, 0.25]])
    budget_close(
        tl_.multilabel_soft_margin_loss(x, t, reduction="none"), F.multilabel_soft_margin_loss(x, t, reduction="none")
    )
    for shape in [(0, 4), (3, 0)]:
        for reduction in REDUCTIONS:
            a, b = torch.randn(shape), torch.rand(shape)
            budget_close(
                tl_.multilabel_soft_margin_loss(a, b, reduction=reduction),
                F.multilabel_soft_margin_loss(a, b, reduction=reduction),
            )


def test_mlsm_errors_and_legacy(backend):
    x, t = torch.randn(3, 4), torch.rand(3, 4)
    same_error(F.multilabel_soft_margin_loss, tl_.multilabel_soft_margin_loss, x, t, reduction="avg")
    same_error(F.multilabel_soft_margin_loss, tl_.multilabel_soft_margin_loss, x, t[:, :3])
    same_error(F.multilabel_soft_margin_loss, tl_.multilabel_soft_margin_loss, x, t > 0.5)
    same_error(F.multilabel_soft_margin_loss, tl_.multilabel_soft_margin_loss, torch.randn(()), torch.rand(()))
    same_error(F.multilabel_soft_margin_loss, tl_.multilabel_soft_margin_loss, x, t, torch.rand(3))
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        out = tl_.multilabel_soft_margin_loss(x, t, size_average=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        budget_close(out, F.multilabel_soft_margin_loss(x, t, size_average=False))


def test_mlsm_weight_requiring_grad_goes_to_torch():
    x, t = torch.randn(3, 4, requires_grad=True), torch.rand(3, 4)
    w = torch.rand(4, requires_grad=True)
    g = torch.autograd.grad(tl_.multilabel_soft_margin_loss(x, t, w), w)[0]
    budget_close(g, torch.autograd.grad(F.multilabel_soft_margin_loss(x, t, w), w)[0])


# ---- multi_margin_loss -----------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("p, margin, weighted", [(1, 1.0, False), (2, 0.3, True), (1, -0.5, True), (2, 2.0, False)])
def test_multi_margin_fp64(backend, reduction, p, margin, weighted):
    x = torch.randn(7, 10, requires_grad=True)
    y = torch.randint(0, 10, (7,))
    args = [x, y] + ([torch.rand(10) + 0.1] if weighted else [])

    def ours(x, y, w=None):
        return tl_.multi_margin_loss(x, y, p, margin, w, reduction=reduction)

    def theirs(x, y, w=None):
        return F.multi_margin_loss(x, y, p, margin, w, reduction=reduction)

    _compare(ours, theirs, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_multi_margin_low_precision(backend, dtype):
    x = torch.randn(6, 11, requires_grad=True)
    y = torch.randint(0, 11, (6,))
    # torch's CPU kernel has no fp16 / bf16: the budget is the dtype's rounding (eps of budget_close)
    _compare(lambda a, b: tl_.multi_margin_loss(a, b, p=2), lambda a, b: F.multi_margin_loss(a, b, p=2), [x, y],
             dtype, lowp=dtype == torch.float32)  # fmt: skip


@pytest.mark.parametrize(
    "x_shape, y", [((6,), torch.tensor(2)), ((6,), torch.tensor([5])), ((), torch.tensor(0))], ids=str
)
def test_multi_margin_unbatched(backend, x_shape, y):
    x = torch.randn(x_shape, requires_grad=True)
    for reduction in REDUCTIONS:
        _compare(
            lambda a, b, r=reduction: tl_.multi_margin_loss(a, b, reduction=r),
            lambda a, b, r=reduction: F.multi_margin_loss(a, b, reduction=r),
            [x, y],
        )


def test_multi_margin_nonfinite_empty_and_strided(backend):
    x = torch.tensor([[float("nan"), 1.0, 0.5], [2.0, float("inf"), -1.0]])
    y = torch.tensor([1, 0])
    budget_close(tl_.multi_margin_loss(x, y, reduction="none"), F.multi_margin_loss(x, y, reduction="none"))
    e = torch.randn(0, 4)
    assert tl_.multi_margin_loss(e, y[:0], reduction="none").shape == (0,)
    assert float(tl_.multi_margin_loss(e, y[:0], reduction="sum")) == 0.0
    assert tl_.multi_margin_loss(e, y[:0]).isnan()  # torch's CPU kernel: uninitialised memory
    xt = torch.randn(9, 5).t().requires_grad_()  # classes strided
    _compare(tl_.multi_margin_loss, F.multi_margin_loss, [xt, torch.randint(0, 9, (5,))])


def test_multi_margin_errors(backend):
    x, y = torch.randn(3, 4), torch.tensor([0, 3, 1])
    f, g = F.multi_margin_loss, tl_.multi_margin_loss
    same_error(f, g, x, torch.tensor([0, 4, 1]))
    same_error(f, g, x, torch.tensor([0, -1, 1]))
    same_error(f, g, x, y, p=3)
    same_error(f, g, x, y.int())
    same_error(f, g, x, y[:2])
    same_error(f, g, torch.randn(2, 3, 4), y[:2])
    same_error(f, g, torch.randn(3, 0), y)
    same_error(f, g, x, y, weight=torch.ones(3))
    same_error(f, g, x, y, weight=torch.ones(2, 2))
    same_error(f, g, x, y, weight=torch.ones(4, dtype=torch.float64))
    same_error(f, g, x, y, weight=torch.ones(4, requires_grad=True))
    same_error(f, g, x, y, reduction="avg")
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        tl_.multi_margin_loss(x, y, reduce=False)


# ---- multilabel_margin_loss ------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_multilabel_margin_fp64(backend, reduction):
    x = torch.randn(8, 6, requires_grad=True)
    y = _lists(8, 6)
    y[0] = torch.tensor([2, 2, 5, 2, -1, 4])  # duplicates, and (in-range) junk after the end
    y[1] = torch.arange(6)  # every class listed: no open column
    y[2] = -1  # empty list
    _compare(
        lambda a, b: tl_.multilabel_margin_loss(a, b, reduction=reduction),
        lambda a, b: F.multilabel_margin_loss(a, b, reduction=reduction),
        [x, y],
    )


@pytest.mark.parametrize("bitmap", [True, False])
def test_multilabel_margin_multi_block(backend, monkeypatch, bitmap):
    """Rows over several column / target blocks, with and without the kernel's register bitmap."""
    monkeypatch.setattr(kmm, "MLM_BITMAP_MAX", 1 << 16 if bitmap else 8)
    x = torch.randn(3, 40, requires_grad=True)
    y = _lists(3, 40)
    y[0, :25] = torch.randint(0, 40, (25,))
    y[0, 25] = -1
    monkeypatch.setattr(kmm, "mlm_config", lambda C, acc_bytes=4: (16, 16, 4 if bitmap else 1, 1))
    _compare(tl_.multilabel_margin_loss, F.multilabel_margin_loss, [x, y])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_multilabel_margin_low_precision(backend, dtype):
    x = torch.randn(5, 9, requires_grad=True)
    _compare(
        tl_.multilabel_margin_loss, F.multilabel_margin_loss, [x, _lists(5, 9)], dtype, lowp=dtype == torch.float32
    )


def test_multilabel_margin_unbatched_and_empty(backend):
    for x, y in [(torch.randn(5), torch.tensor([3, 0, -1, 4, 4])), (torch.randn(()), torch.tensor(0))]:
        x.requires_grad_()
        for reduction in REDUCTIONS:
            _compare(
                lambda a, b, r=reduction: tl_.multilabel_margin_loss(a, b, reduction=r),
                lambda a, b, r=reduction: F.multilabel_margin_loss(a, b, reduction=r),
                [x, y],
            )
    e = torch.randn(0, 4)
    assert tl_.multilabel_margin_loss(e, e.long(), reduction="none").shape == (0,)
    assert float(tl_.multilabel_margin_loss(e, e.long(), reduction="sum")) == 0.0
    assert tl_.multilabel_margin_loss(e, e.long()).isnan()  # torch's CPU kernel: uninitialised memory


def test_multilabel_margin_errors(backend):
    x, y = torch.randn(2, 4), torch.tensor([[0, -1, 1, 1], [1, 2, -1, 0]])
    f, g = F.multilabel_margin_loss, tl_.multilabel_margin_loss
    same_error(f, g, x, torch.tensor([[0, -1, 7, 1], [1, 2, -1, 0]]))  # checked after the end too
    same_error(f, g, x, torch.tensor([[0, -2, 1, 1], [1, 2, -1, 0]]))
    same_error(f, g, x, y.int())
    same_error(f, g, x, y[:1])
    same_error(f, g, torch.randn(2, 0), y[:, :0])
    same_error(f, g, torch.randn(2, 3, 4), y)
    same_error(f, g, x.long(), y)
    same_error(f, g, x, y, reduction="avg")
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        tl_.multilabel_margin_loss(x, y, size_average=True)


# ---- autograd, modules, custom ops, compile --------------------------------------------------


def test_fused_gradient_then_second_backward(backend):
    """The fused gradient (scaled in the backward) and a recomputed second backward agree with torch."""
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 6, (4,))
    loss = tl_.multi_margin_loss(x, y, p=2) * 3.0
    g1 = torch.autograd.grad(loss, x, retain_graph=True)[0]
    g2 = torch.autograd.grad(loss, x)[0]
    ref = torch.autograd.grad(F.multi_margin_loss(x, y, p=2) * 3.0, x)[0]
    budget_close(g1, ref)
    budget_close(g2, ref)


def test_double_backward(monkeypatch):
    """``create_graph=True`` builds the gradient from torch ops (only the forward runs an engine)."""
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "torch")
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda a, b: tl_.multilabel_soft_margin_loss(a, b, reduction="sum"), (x, t))
    torch.autograd.gradgradcheck(lambda a: tl_.multilabel_soft_margin_loss(a, t.detach(), reduction="none"), (x,))
    y = torch.tensor([0, 3, 1])
    torch.autograd.gradgradcheck(lambda a: tl_.multi_margin_loss(a, y, p=2, margin=0.6), (x,))
    lists = torch.tensor([[0, -1, 1, 1], [1, 2, -1, 0], [3, 3, 0, -1]])
    torch.autograd.gradgradcheck(lambda a: tl_.multilabel_margin_loss(a, lists, reduction="none"), (x,))


def test_create_graph_gradient_at_a_hinge_tie_is_torchs(backend):
    """A term exactly at the hinge (z == 0) has no gradient in torch's kernels; the differentiable gradient
    (``create_graph=True``) must agree with them and with the plain backward."""
    x = torch.tensor([[1.0, 0.0, 2.0, 1.0]], dtype=torch.float64, requires_grad=True)
    xm = torch.tensor([[1.0, 0.0, 2.0, 1.0, 0.5]], dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, dtype=torch.float64) + 0.1
    calls = [
        (x, lambda m: m.multi_margin_loss(x, torch.tensor([0]), reduction="sum")),
        (x, lambda m: m.multi_margin_loss(x, torch.tensor([0]), weight=w)),
        (xm, lambda m: m.multilabel_margin_loss(xm, torch.tensor([[3, 0, -1, 1, 2]]), reduction="sum")),
    ]
    for inp, call in calls:
        ref = torch.autograd.grad(call(F), inp)[0]
        for create_graph in (False, True):
            ours = torch.autograd.grad(call(tl_), inp, create_graph=create_graph)[0]
            torch.testing.assert_close(ours, ref, rtol=0, atol=1e-15)


@pytest.mark.interpreter
def test_double_backward_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "triton")
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda a: tl_.multi_margin_loss(a, torch.tensor([2, 0]), p=2), (x,))


def test_modules_match_torch():
    w = torch.rand(5)
    pairs = [
        (tl_.nn.MultiLabelSoftMarginLoss(w, reduction="sum"), nn.MultiLabelSoftMarginLoss(w, reduction="sum")),
        (tl_.nn.MultiLabelMarginLoss(reduction="none"), nn.MultiLabelMarginLoss(reduction="none")),
        (tl_.nn.MultiMarginLoss(p=2, margin=0.5, weight=w), nn.MultiMarginLoss(p=2, margin=0.5, weight=w)),
    ]
    x = torch.randn(3, 5)
    targets = [torch.rand(3, 5), _lists(3, 5), torch.tensor([4, 0, 2])]
    for (ours, theirs), t in zip(pairs, targets):
        assert isinstance(ours, type(theirs))
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        assert repr(ours) == repr(theirs)
        budget_close(ours(x, t), theirs(x, t))
    with pytest.raises(ValueError, match="only p == 1 and p == 2 supported"):
        tl_.nn.MultiMarginLoss(p=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert tl_.nn.MultiMarginLoss(size_average=False).reduction == "sum"


@pytest.mark.interpreter  # the kernels on CPU tensors
def test_custom_ops_opcheck():
    x = torch.randn(3, 5)
    t, w = torch.rand(3, 5), torch.rand(5).expand(3, 5)
    g, coef = torch.randn(3), torch.ones(1)
    y, lists = torch.tensor([1, 0, 4]), _lists(3, 5)
    ops = torch.ops.triton_losses
    torch.library.opcheck(ops.mlsm_fwd, (x, t, w, coef))
    torch.library.opcheck(ops.mlsm_bwd, (x, t, None, g, True, True))
    torch.library.opcheck(ops.multi_margin_fwd, (x, y, torch.rand(5), 2, 0.5, coef))
    torch.library.opcheck(ops.multi_margin_bwd, (x, y, None, 1, 1.0, g))
    torch.library.opcheck(ops.multilabel_margin_fwd, (x, lists, coef))
    torch.library.opcheck(ops.multilabel_margin_bwd, (x, lists, g))


@pytest.mark.parametrize("which", ["mlsm", "multi_margin", "multilabel_margin"])
def test_compile_fullgraph(backend, which):
    torch._dynamo.reset()
    x = torch.randn(4, 6, requires_grad=True)
    targets = {"mlsm": torch.rand(4, 6), "multi_margin": torch.tensor([0, 5, 2, 2]), "multilabel_margin": _lists(4, 6)}
    fns = {
        "mlsm": (tl_.multilabel_soft_margin_loss, F.multilabel_soft_margin_loss),
        "multi_margin": (tl_.multi_margin_loss, F.multi_margin_loss),
        "multilabel_margin": (tl_.multilabel_margin_loss, F.multilabel_margin_loss),
    }
    ours, theirs = fns[which]
    compiled = torch.compile(ours, backend="eager" if backend == "triton" else "aot_eager", fullgraph=True)
    out = compiled(x, targets[which])
    g = torch.autograd.grad(out, x)[0]
    ref = theirs(x, targets[which])
    budget_close(out, ref)
    budget_close(g, torch.autograd.grad(ref, x)[0])
