"""ctc_loss / nn.CTCLoss against torch: values, torch's gradient, every argument form, errors, determinism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import triton_losses
from triton_losses import _dispatch
from triton_losses.kernels import ctc as kernels_ctc

from .helpers import budget_close, same_error

REDUCTIONS = ("none", "mean", "sum")


def _case(T=6, N=3, C=5, S=3, blank=0, concat=False, dtype=torch.float64, seed=0, device="cpu"):
    """Random log-probabilities and targets (with a repeated label), random lengths."""
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(T, N, C, generator=g, dtype=torch.float64).log_softmax(2).to(dtype)
    labels = [c for c in range(C) if c != blank]
    targets = torch.tensor(labels)[torch.randint(0, len(labels), (N, S), generator=g)]
    if S >= 2:
        targets[0, 1] = targets[0, 0]  # a repeat: needs a blank between, and merges in the gradient
    il = torch.randint(max(1, T - 2), T + 1, (N,), generator=g)
    tl = torch.randint(0, S + 1, (N,), generator=g)
    tl[0] = min(S, T // 2)
    if concat:
        targets = torch.cat([targets[i, : tl[i]] for i in range(N)])
    return lp.to(device), targets.to(device), il, tl


def _loss_and_grad(fn, lp, targets, il, tl, upstream=None, **kw):
    x = lp.detach().clone().requires_grad_()
    out = fn(x, targets, il, tl, **kw)
    if upstream is None:
        upstream = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(7))
    (g,) = torch.autograd.grad(out, x, upstream.to(out.dtype))
    return out, g


def _compare(lp, targets, il, tl, **kw):
    """Ours and torch's loss and gradient in fp64 (random upstream gradient for 'none')."""
    ref, g_ref = _loss_and_grad(F.ctc_loss, lp, targets, il, tl, **kw)
    out, g = _loss_and_grad(triton_losses.ctc_loss, lp, targets, il, tl, **kw)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    budget_close(out, ref)
    budget_close(g, g_ref)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("concat", [False, True])
def test_matches_torch(backend, reduction, concat):
    _compare(*_case(concat=concat), reduction=reduction)


@pytest.mark.parametrize("blank", [0, 4])
def test_blank_index(backend, blank):
    _compare(*_case(C=5, blank=blank), blank=blank, reduction="none")


def test_target_equal_to_blank(backend):
    """torch allows a target equal to the blank (and its CPU kernel then drops one gradient term)."""
    lp, targets, il, tl = _case(T=6, N=2, S=3)
    targets[:, -1] = 0
    tl[:] = 3
    _compare(lp, targets, il, tl, reduction="none")


@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_impossible_and_empty(backend, zero_infinity, reduction):
    """An impossible alignment (inf, NaN gradient; or 0 under zero_infinity), an empty target, an empty input."""
    lp, targets, il, tl = _case(T=5, N=4, S=4)
    il[:] = torch.tensor([2, 5, 0, 0])
    tl[:] = torch.tensor([4, 0, 0, 2])
    _compare(lp, targets, il, tl, reduction=reduction, zero_infinity=zero_infinity)


@pytest.mark.parametrize(
    "form", ["int32", "list", "tuple", "unbatched", "unbatched_padded", "unbatched_list", "unbatched_tuple"]
)
def test_argument_forms(backend, form):
    lp, targets, il, tl = _case(N=2)
    if form == "int32":
        il, tl = il.int(), tl.int()
    elif form == "list":
        il, tl = il.tolist(), tl.tolist()
    elif form == "tuple":
        il, tl = tuple(il.tolist()), tuple(tl.tolist())
    else:
        lp, il, tl = lp[:, 0], il[0], tl[0]
        targets = targets[:1] if form == "unbatched_padded" else targets[0, : int(tl)]
        if form != "unbatched" and form != "unbatched_padded":  # torch takes one-element lists unbatched too
            il, tl = ([int(il)], [int(tl)]) if form == "unbatched_list" else ((int(il),), (int(tl),))
    for reduction in ("none", "mean"):
        _compare(lp, targets, il, tl, reduction=reduction)


def test_strided_log_probs(backend):
    _, targets, il, tl = _case(T=5, N=2, C=4)
    wide = torch.randn(2, 5, 8, dtype=torch.float64).log_softmax(-1).transpose(0, 1)[:, :, ::2]  # (T, N, C) strided
    _compare(wide, targets.clamp(max=3).clamp(min=1), il, tl, reduction="sum")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision(backend, dtype):
    """Within the error budget of torch's own fp32 result (rounded to the low dtype) against fp64."""
    lp, targets, il, tl = _case(T=6, N=3, C=6, S=3)
    x = lp.to(dtype)
    ref, g_ref = _loss_and_grad(F.ctc_loss, x.double(), targets, il, tl, reduction="none")
    low, g_low = _loss_and_grad(F.ctc_loss, x.float(), targets, il, tl, reduction="none")
    out, g = _loss_and_grad(triton_losses.ctc_loss, x, targets, il, tl, reduction="none")
    assert out.dtype == dtype and g.dtype == dtype
    budget_close(out, ref, low.to(dtype))
    budget_close(g, g_ref, g_low.to(dtype))


def test_determinism(backend):
    lp, targets, il, tl = _case(T=6, N=3, C=4, S=3)
    grads = [_loss_and_grad(triton_losses.ctc_loss, lp.float(), targets, il, tl, reduction="mean")[1] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


def test_gradcheck(backend):
    """Through a log_softmax (torch's gradient is the log-softmax convention), fp64."""
    lp, targets, il, tl = _case(T=4, N=2, C=3, S=2)
    il[:] = 4  # every alignment possible: a finite loss
    logits = lp.detach().clone().requires_grad_()
    fn = lambda z: triton_losses.ctc_loss(z.log_softmax(2), targets, il, tl, reduction="sum")
    assert torch.autograd.gradcheck(fn, (logits,), fast_mode=True)


def test_gradgradcheck():
    """Double backward (torch has none for ctc_loss): our backward is differentiable and consistent."""
    lp, targets, il, tl = _case(T=3, N=2, C=3, S=1)
    il[:] = 3
    logits = lp.detach().clone().requires_grad_()
    fn = lambda z: triton_losses.ctc_loss(z.log_softmax(2), targets, il, tl, reduction="mean")
    assert torch.autograd.gradgradcheck(fn, (logits,), fast_mode=True)


def test_double_backward_first_derivative_matches_torch(backend):
    lp, targets, il, tl = _case(T=4, N=2, C=4, S=2)
    x = lp.clone().requires_grad_()
    (g,) = torch.autograd.grad(triton_losses.ctc_loss(x, targets, il, tl), x, create_graph=True)
    _, g_ref = _loss_and_grad(F.ctc_loss, lp, targets, il, tl, upstream=torch.tensor(1.0, dtype=torch.float64))
    budget_close(g, g_ref)
    assert g.requires_grad


def test_second_backward_of_fused_call(backend):
    lp, targets, il, tl = _case(T=4, N=2, C=4, S=2)
    x = lp.clone().requires_grad_()
    loss = triton_losses.ctc_loss(x, targets, il, tl)
    (g1,) = torch.autograd.grad(loss * 3.0, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    budget_close(g1, 3.0 * g2)


def test_no_grad_input(backend):
    lp, targets, il, tl = _case()
    budget_close(triton_losses.ctc_loss(lp, targets, il, tl), F.ctc_loss(lp, targets, il, tl))


def _bad_calls():
    lp, targets, il, tl = _case(T=6, N=3, C=5, S=3)
    yield "float lengths", (lp, targets, il.float(), tl), {}
    yield "input too long", (lp, targets, il + 10, tl), {}
    yield "negative input length", (lp, targets, il - 10, tl), {}
    yield "target too long", (lp, targets, il, tl + 5), {}
    yield "negative target length", (lp, targets, il, tl - 5), {}
    yield "wrong batch", (lp, targets, il[:2], tl), {}
    yield "blank out of range", (lp, targets, il, tl), {"blank": 5}
    yield "negative blank", (lp, targets, il, tl), {"blank": -1}
    yield "1-d log_probs", (lp[:, 0, 0], targets, il, tl), {}
    yield "3-d targets", (lp, targets[None], il, tl), {}
    yield "wrong concatenated size", (lp, targets.reshape(-1)[:4], il, tl), {}
    yield "padded batch mismatch", (lp, targets[:2], il, tl), {}
    yield "integer log_probs", (lp.long(), targets, il, tl), {}
    yield "empty log_probs", (lp[:, :0], targets[:0], il[:0], tl[:0]), {}
    yield "bad reduction", (lp, targets, il, tl), {"reduction": "avg"}
    yield "unbatched int lengths", (lp[:, 0], targets[0], 6, 3), {}
    yield "mixed length forms", (lp, targets, il, tl.tolist()), {}


@pytest.mark.parametrize("case", list(_bad_calls()), ids=lambda c: c[0])
def test_errors_like_torch(case):
    _, args, kw = case
    same_error(F.ctc_loss, triton_losses.ctc_loss, *args, **kw)


@pytest.mark.parametrize("bad", [5, -1])
def test_out_of_range_target(backend, bad):
    """torch reads such a target out of bounds; here it is torch's index error wording (no read)."""
    lp, targets, il, tl = _case(T=6, N=2, C=5, S=3)
    tl[:] = 3
    targets[1, 2] = bad
    with pytest.raises(IndexError, match=f"Target {bad} is out of bounds."):
        triton_losses.ctc_loss(lp, targets, il, tl)
    targets[1, 2] = 1
    targets[0, 2] = bad  # padding past a length is never read
    tl[0] = 2
    _compare(lp, targets, il, tl)


def test_module_parity():
    ours = triton_losses.nn.CTCLoss(blank=2, reduction="sum", zero_infinity=True)
    theirs = torch.nn.CTCLoss(2, "sum", True)
    assert isinstance(ours, torch.nn.CTCLoss)
    assert (ours.blank, ours.reduction, ours.zero_infinity) == (theirs.blank, theirs.reduction, theirs.zero_infinity)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert repr(ours) == repr(theirs)
    lp, targets, il, tl = _case(C=5, blank=2)
    budget_close(ours(lp, targets, il, tl), theirs(lp, targets, il, tl))
    default = triton_losses.nn.CTCLoss()
    assert (default.blank, default.reduction, default.zero_infinity) == (0, "mean", False)


@pytest.mark.interpreter
def test_opcheck():
    lp, targets, il, tl = _case(T=3, N=2, C=3, S=1)
    t = targets.contiguous()
    off = torch.arange(2) * t.shape[1]
    torch.library.opcheck(kernels_ctc._ctc_fwd_op, (lp, t, off, il, tl, 0, 1))
    nll, alpha = kernels_ctc._ctc_fwd_op(lp, t, off, il, tl, 0, 1)
    gs = torch.rand(2, dtype=torch.float64)
    torch.library.opcheck(kernels_ctc._ctc_bwd_op, (lp, t, off, il, tl, 0, 1, False, nll, alpha, gs))


def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    lp, targets, il, tl = _case(T=3, N=2, C=4, S=1)

    def fn(x):
        return triton_losses.ctc_loss(x, targets, il, tl, reduction="mean")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, g = _loss_and_grad(lambda x, *a: compiled(x), lp, targets, il, tl)
    ref, g_ref = _loss_and_grad(F.ctc_loss, lp, targets, il, tl)
    budget_close(out, ref)
    budget_close(g, g_ref)


def test_engine_names_match():
    ref = _dispatch.reference("ctc")
    for name in ("FUSES_GRAD", "max_target_length", "ctc_fwd", "ctc_bwd", "scale_"):
        assert hasattr(ref, name) and hasattr(kernels_ctc, name) and hasattr(kernels_ctc.TRACED, name)


@pytest.mark.slow
@pytest.mark.parametrize("concat", [False, True])
def test_larger_random(backend, concat):
    lp, targets, il, tl = _case(T=40, N=5, C=12, S=12, concat=concat, seed=3)
    for reduction in REDUCTIONS:
        _compare(lp, targets, il, tl, reduction=reduction)


@pytest.mark.slow
def test_reference_vectorised_matches_torch(monkeypatch):
    """The reference's vectorised recursion (used from ``NATIVE_MAX_WORK`` on; forced here) on a mid-size case, fp32."""
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "torch")
    monkeypatch.setattr(_dispatch.reference("ctc"), "NATIVE_MAX_WORK", 0)
    N, S, C = 60, 60, 30
    lp, targets, il, tl = _case(T=80, N=N, C=C, S=S, dtype=torch.float32, seed=5)
    ref, g_ref = _loss_and_grad(F.ctc_loss, lp.double(), targets, il, tl, reduction="none")
    low, g_low = _loss_and_grad(F.ctc_loss, lp, targets, il, tl, reduction="none")
    out, g = _loss_and_grad(triton_losses.ctc_loss, lp, targets, il, tl, reduction="none")
    budget_close(out, ref, low)
    budget_close(g, g_ref, g_low)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_bench_shape(dtype):
    """The kernels on a GPU at a bench-like shape, against torch's fp64 CPU result; bitwise deterministic."""
    lp, targets, il, tl = _case(T=300, N=8, C=1000, S=80, dtype=dtype, seed=11)
    il[:] = 300
    ref, g_ref = _loss_and_grad(F.ctc_loss, lp.double(), targets, il, tl, reduction="mean")
    low, g_low = _loss_and_grad(F.ctc_loss, lp.float(), targets, il, tl, reduction="mean")
    x = lp.cuda()
    out, g = _loss_and_grad(triton_losses.ctc_loss, x, targets.cuda(), il.cuda(), tl.cuda(), reduction="mean")
    budget_close(out, ref, low.to(dtype))
    budget_close(g, g_ref, g_low.to(dtype))
    _, g2 = _loss_and_grad(triton_losses.ctc_loss, x, targets.cuda(), il.cuda(), tl.cuda(), reduction="mean")
    assert torch.equal(g, g2)
