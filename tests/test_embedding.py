"""cosine_embedding_loss, triplet_margin_loss and triplet_margin_with_distance_loss against torch.

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
from tests.test_multi_margin import _compare
from triton_losses.kernels import embedding as kemb

REDUCTIONS = ["none", "mean", "sum"]
INF = float("inf")


def _small_blocks(monkeypatch, block_c: int = 4):
    """Make the kernels walk rows in blocks of ``block_c`` columns (the multi-block paths on tiny rows)."""
    monkeypatch.setattr(kemb, "launch_config", lambda D, elem, contig: (2, block_c, 1))
    monkeypatch.setattr(kemb, "triplet_config", lambda D, elem, contig: (2, block_c, 1))


# ---- cosine_embedding_loss -------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("margin", [0.0, 0.4, -0.3])
def test_cosine_fp64(backend, reduction, margin):
    a = torch.randn(7, 6, requires_grad=True)
    b = torch.randn(7, 6, requires_grad=True)
    y = torch.tensor([1, -1, 1, -1, 0, 2, -1])  # targets other than +-1 give 0
    _compare(
        lambda *t: tl_.cosine_embedding_loss(*t, margin=margin, reduction=reduction),
        lambda *t: F.cosine_embedding_loss(*t, margin=margin, reduction=reduction),
        [a, b, y],
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cosine_low_precision(backend, dtype):
    a, b = torch.randn(5, 16, requires_grad=True), torch.randn(5, 16, requires_grad=True)
    _compare(tl_.cosine_embedding_loss, F.cosine_embedding_loss, [a, b, torch.tensor([1, -1, 1, -1, -1])], dtype)


@pytest.mark.parametrize(
    "s1, s2, sy", [((6,), (6,), ()), ((1, 6), (4, 6), (4,)), ((4, 6), (4, 6), (1,)), ((1, 6), (1, 6), (3,))], ids=str
)
def test_cosine_shapes_and_broadcast(backend, s1, s2, sy):
    a, b = torch.randn(s1, requires_grad=True), torch.randn(s2, requires_grad=True)
    y = torch.where(torch.rand(sy) > 0.5, 1, -1)
    for reduction in REDUCTIONS:
        _compare(
            lambda *t, r=reduction: tl_.cosine_embedding_loss(*t, margin=0.2, reduction=r),
            lambda *t, r=reduction: F.cosine_embedding_loss(*t, margin=0.2, reduction=r),
            [a, b, y],
        )


def test_cosine_target_dtypes_strides_and_blocks(backend, monkeypatch):
    a, b = torch.randn(6, 5, requires_grad=True), torch.randn(9, 6).t().requires_grad_()  # b strided
    for y in [
        torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5, 1.0]),
        torch.tensor([True, False] * 3),
        torch.ones(6, dtype=torch.uint8),
    ]:
        _compare(tl_.cosine_embedding_loss, F.cosine_embedding_loss, [a, b[:, :5], y])
    _small_blocks(monkeypatch)
    _compare(tl_.cosine_embedding_loss, F.cosine_embedding_loss, [a, b[:, :5], torch.tensor([1, -1] * 3)])


def test_cosine_edge_cases(backend):
    z = torch.zeros(2, 3)
    budget_close(
        tl_.cosine_embedding_loss(z, z, torch.tensor([1, -1])), F.cosine_embedding_loss(z, z, torch.tensor([1, -1]))
    )
    for s in [(0, 4), (3, 0)]:
        for reduction in REDUCTIONS:
            a, b, y = torch.randn(s), torch.randn(s), torch.ones(s[0])
            budget_close(
                tl_.cosine_embedding_loss(a, b, y, reduction=reduction),
                F.cosine_embedding_loss(a, b, y, reduction=reduction),
            )


def test_cosine_near_zero_vectors_in_fp64_add_torchs_fp32_epsilon(backend):
    """torch adds a C++ float 1e-12 to each squared norm: fp64 near-zero vectors see fp32(1e-12) (an exact
    1e-12 was off by 4e-10 in the loss and 2e-9 in the gradient of a zero vector)."""
    x1 = torch.full((4, 3), 1e-7, dtype=torch.float64)
    x1[0] = 0.0
    x1.requires_grad_()
    x2 = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64).expand(4, 3)
    y = torch.tensor([1, 1, -1, 1])
    for reduction in REDUCTIONS:
        ours = tl_.cosine_embedding_loss(x1, x2, y, margin=-0.5, reduction=reduction)
        ref = F.cosine_embedding_loss(x1, x2, y, margin=-0.5, reduction=reduction)
        budget_close(ours, ref)
        up = torch.rand_like(ref) + 0.5
        budget_close(torch.autograd.grad(ours, x1, up)[0], torch.autograd.grad(ref, x1, up)[0])


def test_cosine_errors_and_legacy(backend):
    a, b, y = torch.randn(3, 5), torch.randn(3, 5), torch.tensor([1, -1, 1])
    f, g = F.cosine_embedding_loss, tl_.cosine_embedding_loss
    same_error(f, g, a, b, y.view(3, 1))
    same_error(f, g, a, b[0], y)
    same_error(f, g, a[0], b[0], y)
    same_error(f, g, a, b[:, :4], y)
    same_error(f, g, a, b, y[:2])
    same_error(f, g, a, b, y, reduction="avg")
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        out = g(a, b, y, size_average=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        budget_close(out, f(a, b, y, size_average=False))
    if backend == "torch":  # integer inputs: torch's answer
        budget_close(g(a.long(), b.long(), y), f(a.long(), b.long(), y))
    else:  # the kernels never fall back silently
        with pytest.raises(NotImplementedError, match="do not support"):
            g(a.long(), b.long(), y)


# ---- triplet_margin_loss ---------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("p, swap", [(2, False), (2, True), (1, True), (3.5, False), (0.7, True), (INF, True)])
def test_triplet_fp64(backend, reduction, p, swap):
    a, pos, neg = (torch.randn(6, 5, requires_grad=True) for _ in range(3))
    _compare(
        lambda *t: tl_.triplet_margin_loss(*t, margin=1.3, p=p, eps=1e-5, swap=swap, reduction=reduction),
        lambda *t: F.triplet_margin_loss(*t, margin=1.3, p=p, eps=1e-5, swap=swap, reduction=reduction),
        [a, pos, neg],
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triplet_low_precision(backend, dtype):
    ts = [torch.randn(5, 16, requires_grad=True) for _ in range(3)]
    _compare(
        lambda *t: tl_.triplet_margin_loss(*t, swap=True), lambda *t: F.triplet_margin_loss(*t, swap=True), ts, dtype
    )


@pytest.mark.parametrize(
    "shapes", [((5,), (5,), (5,)), ((), (), ()), ((2, 3, 4), (2, 3, 4), (2, 3, 4)), ((1, 4), (3, 4), (3, 4))], ids=str
)
def test_triplet_shapes_and_broadcast(backend, shapes):
    ts = [torch.randn(s, requires_grad=True) for s in shapes]
    for reduction in REDUCTIONS:
        _compare(
            lambda *t, r=reduction: tl_.triplet_margin_loss(*t, swap=True, reduction=r),
            lambda *t, r=reduction: F.triplet_margin_loss(*t, swap=True, reduction=r),
            ts,
        )


@pytest.mark.parametrize("p", [2, INF, 1.5])
def test_triplet_multi_block_and_ties(backend, monkeypatch, p):
    _small_blocks(monkeypatch)
    a = torch.randn(5, 10, requires_grad=True)
    pos, neg = torch.randn(5, 10, requires_grad=True), torch.randn(5, 10, requires_grad=True)
    _compare(lambda *t: tl_.triplet_margin_loss(*t, p=p, swap=True),
             lambda *t: F.triplet_margin_loss(*t, p=p, swap=True), [a, pos, neg])  # fmt: skip
    same = torch.randn(3, 10)  # d(a, n) == d(p, n): min() splits the gradient; p = inf: tied maxima
    tied = torch.tensor([[2.0, -2.0, 1.0, 0.0] * 2 + [2.0, 0.5]] * 3)
    _compare(lambda *t: tl_.triplet_margin_loss(*t, p=p, eps=0.0, swap=True),
             lambda *t: F.triplet_margin_loss(*t, p=p, eps=0.0, swap=True),
             [same.clone().requires_grad_(), same.clone().requires_grad_(), tied.requires_grad_()])  # fmt: skip


def test_triplet_edge_cases(backend):
    z = torch.zeros(2, 3, requires_grad=True)
    _compare(lambda *t: tl_.triplet_margin_loss(*t, eps=0.0), lambda *t: F.triplet_margin_loss(*t, eps=0.0), [z, z, z])
    for s in [(0, 4), (3, 0)]:
        for reduction in REDUCTIONS:
            ts = [torch.randn(s) for _ in range(3)]
            budget_close(
                tl_.triplet_margin_loss(*ts, reduction=reduction), F.triplet_margin_loss(*ts, reduction=reduction)
            )
    ts = [torch.randn(3, 4) for _ in range(3)]
    for p in (0, -1.0):  # computed by torch ('auto'); the kernels never fall back silently
        if backend == "torch":
            budget_close(tl_.triplet_margin_loss(*ts, p=p), F.triplet_margin_loss(*ts, p=p))
        else:
            with pytest.raises(NotImplementedError, match="do not support"):
                tl_.triplet_margin_loss(*ts, p=p)


def test_triplet_errors_and_legacy(backend):
    a, p, n = (torch.randn(3, 5) for _ in range(3))
    f, g = F.triplet_margin_loss, tl_.triplet_margin_loss
    same_error(f, g, a, p, n, margin=0.0)
    same_error(f, g, a, p, n, margin=-1)
    same_error(f, g, a, p[0], n)
    same_error(f, g, a, p[:, :4], n)
    same_error(f, g, a, p, n, reduction="avg")
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        g(a, p, n, reduce=False)


# ---- triplet_margin_with_distance_loss -------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("swap", [False, True])
def test_triplet_with_distance(backend, reduction, swap):
    ts = [torch.randn(4, 6, requires_grad=True) for _ in range(3)]
    kw = dict(margin=0.8, swap=swap, reduction=reduction)
    _compare(lambda *t: tl_.triplet_margin_with_distance_loss(*t, **kw),
             lambda *t: F.triplet_margin_with_distance_loss(*t, **kw), ts)  # fmt: skip

    def cos_dist(u, v):
        return 1.0 - F.cosine_similarity(u, v)

    _compare(lambda *t: tl_.triplet_margin_with_distance_loss(*t, distance_function=cos_dist, **kw),
             lambda *t: F.triplet_margin_with_distance_loss(*t, distance_function=cos_dist, **kw), ts)  # fmt: skip


def test_triplet_with_distance_errors(backend):
    a, p, n = (torch.randn(3, 5) for _ in range(3))
    f, g = F.triplet_margin_with_distance_loss, tl_.triplet_margin_with_distance_loss
    same_error(f, g, a, p, n, reduction="avg")
    same_error(f, g, a, p, n, margin=0)
    same_error(f, g, a, p, n[0])
    same_error(f, g, a, p[:, :2], n)


# ---- autograd, modules, custom ops, compile --------------------------------------------------


def test_double_backward(monkeypatch):
    """``create_graph=True`` builds the gradient from torch ops (only the forward runs an engine)."""
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "torch")
    a, b = (torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    y = torch.tensor([1, -1, -1])
    torch.autograd.gradgradcheck(lambda u, v: tl_.cosine_embedding_loss(u, v, y, margin=-0.5), (a, b))
    n = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda *t: tl_.triplet_margin_loss(*t, swap=True, reduction="none"), (a, b, n))


@pytest.mark.interpreter
def test_double_backward_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "triton")
    ts = [torch.randn(1, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    torch.autograd.gradgradcheck(lambda *t: tl_.triplet_margin_loss(*t, margin=4.0, p=3), ts)


def test_fused_gradient_then_second_backward(backend):
    ts = [torch.randn(4, 5, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    loss = tl_.triplet_margin_loss(*ts, reduction="sum") * -2.0
    first = torch.autograd.grad(loss, ts, retain_graph=True)
    second = torch.autograd.grad(loss, ts)
    ref = torch.autograd.grad(F.triplet_margin_loss(*ts, reduction="sum") * -2.0, ts)
    for a, b, c in zip(first, second, ref):
        budget_close(a, c)
        budget_close(b, c)


def test_modules_match_torch():
    dist = nn.PairwiseDistance()
    pairs = [
        (tl_.nn.CosineEmbeddingLoss(margin=0.3, reduction="sum"), nn.CosineEmbeddingLoss(margin=0.3, reduction="sum")),
        (tl_.nn.TripletMarginLoss(margin=0.5, p=1, swap=True), nn.TripletMarginLoss(margin=0.5, p=1, swap=True)),
        (tl_.nn.TripletMarginWithDistanceLoss(distance_function=dist, reduction="none"),
         nn.TripletMarginWithDistanceLoss(distance_function=dist, reduction="none")),
        (tl_.nn.TripletMarginWithDistanceLoss(swap=True), nn.TripletMarginWithDistanceLoss(swap=True)),
    ]  # fmt: skip
    a, b, c = (torch.randn(3, 4) for _ in range(3))
    for ours, theirs in pairs:
        assert isinstance(ours, type(theirs))
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        assert repr(ours) == repr(theirs)
        third = torch.tensor([1, -1, 1]) if isinstance(ours, nn.CosineEmbeddingLoss) else c
        budget_close(ours(a, b, third), theirs(a, b, third))
    with pytest.raises(ValueError, match="expected margin to be greater than 0"):
        tl_.nn.TripletMarginLoss(margin=0)


@pytest.mark.interpreter  # the kernels on CPU tensors
def test_custom_ops_opcheck():
    a, b, c = (torch.randn(3, 5) for _ in range(3))
    y, g, coef = torch.tensor([1, -1, 0]), torch.randn(3), torch.ones(1)
    ops = torch.ops.triton_losses
    torch.library.opcheck(ops.cosine_embedding_fwd, (a, b, y, 0.1, coef))
    torch.library.opcheck(ops.cosine_embedding_bwd, (a, b.expand(3, 5), y, 0.1, g))
    torch.library.opcheck(ops.triplet_margin_fwd, (a, b, c, 1.0, 2.0, 1e-6, True, coef))
    torch.library.opcheck(ops.triplet_margin_bwd, (a, b, c, 1.0, 1.5, 1e-6, False, g))


@pytest.mark.parametrize("which", ["cosine", "triplet", "triplet_with_distance"])
def test_compile_fullgraph(backend, which):
    torch._dynamo.reset()
    a, b, c = (torch.randn(4, 6, requires_grad=True) for _ in range(3))
    third = torch.tensor([1, -1, 1, -1]) if which == "cosine" else c
    fns = {
        "cosine": (tl_.cosine_embedding_loss, F.cosine_embedding_loss),
        "triplet": (tl_.triplet_margin_loss, F.triplet_margin_loss),
        "triplet_with_distance": (tl_.triplet_margin_with_distance_loss, F.triplet_margin_with_distance_loss),
    }
    ours, theirs = fns[which]
    compiled = torch.compile(ours, backend="eager" if backend == "triton" else "aot_eager", fullgraph=True)
    out = compiled(a, b, third)
    got = torch.autograd.grad(out, [a, b])
    ref = theirs(a, b, third)
    budget_close(out, ref)
    for x, r in zip(got, torch.autograd.grad(ref, [a, b])):
        budget_close(x, r)
