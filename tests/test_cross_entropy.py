"""cross_entropy against torch in fp64, on the PyTorch reference and on the Triton kernels."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import triton_losses as tl_
from tests.ce_reference import ref_cross_entropy
from tests.helpers import budget_close

REDUCTIONS = ["none", "mean", "sum"]
# (input shape, class dim size): unbatched, 2-D, K-dim; C=1, a multi-block row, a strided K-dim row
SHAPES = [(7,), (5, 7), (3, 11, 4), (2, 5, 3, 2), (4, 1), (3, 40, 5), (2, 5000)]


def _target(shape, C, device, ignore_index=None, frac=0.25):
    tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
    t = torch.randint(0, C, tshape, device=device)
    if ignore_index is not None and t.numel():
        drop = torch.rand(tshape, device=device) < frac
        t = torch.where(drop, torch.full_like(t, ignore_index), t)
    return t


def _run_both(x, t, reduction, dtype=torch.float32, **kw):
    """Loss and input-gradient of ours (in ``dtype``), of torch (in ``dtype``) and of the fp64 oracle."""
    xs = x.detach().to(dtype).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    ours = tl_.cross_entropy(xs, t, reduction=reduction, **kw)
    ref = ref_cross_entropy(x64, t, reduction=reduction, **kw)
    up = torch.randn(ref.shape, dtype=torch.float64, device=x.device) if reduction == "none" else None
    if up is None:
        up = torch.tensor(1.7, dtype=torch.float64, device=x.device)  # an upstream gradient != 1
    (g_ours,) = torch.autograd.grad(ours, xs, up.to(ours.dtype))
    (g_ref,) = torch.autograd.grad(ref, x64, up)
    return ours, ref, g_ours, g_ref


def _torch_lowp(x, t, reduction, dtype, up=None, **kw):
    """torch's own result in ``dtype`` (its error sets the budget); None when torch lacks an option."""
    if kw.get("z_loss") or kw.get("softcap") is not None:
        return None, None
    xs = x.detach().to(dtype).requires_grad_()
    out = F.cross_entropy(xs, t, reduction=reduction, **kw)
    up = torch.randn_like(out) if up is None else up
    return out, torch.autograd.grad(out, xs, up)[0]


OPTIONS = [
    {},
    {"weight": True},
    {"ignore_index": 1},
    {"ignore_index": -100, "frac": 0.3},
    {"label_smoothing": 0.1},
    {"label_smoothing": 1.0},
    {"z_loss": 1e-3},
    {"softcap": 3.0},
    {"weight": True, "ignore_index": 2, "label_smoothing": 0.2},
    {"weight": True, "ignore_index": -100, "label_smoothing": 0.05, "z_loss": 1e-2, "softcap": 5.0},
]


def _options(opts, C, device):
    kw = {k: v for k, v in opts.items() if k != "frac"}
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(C, device=device) + 0.1
    return kw


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_index_targets_match_fp64(backend, device, shape, opts, reduction):
    if backend == "triton" and shape == (2, 5000) and (opts.get("z_loss") or reduction == "sum"):
        pytest.skip("one long-row case per option family keeps the interpreter tier fast")
    C = shape[1] if len(shape) > 1 else shape[0]
    kw = _options(opts, C, device)
    ii = kw.get("ignore_index")
    x = torch.randn(shape, device=device) * 3
    t = _target(shape, C, device, ii, opts.get("frac", 0.25))
    if "weight" in kw:
        kw["weight"] = kw["weight"].float()
    ours, ref, g_ours, g_ref = _run_both(x, t, reduction, **kw)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    budget_close(ours, ref)
    budget_close(g_ours, g_ref)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "opts",
    [{}, {"weight": True}, {"label_smoothing": 0.3}, {"weight": True, "label_smoothing": 0.1, "z_loss": 0.01}],
    ids=lambda o: ",".join(o) or "plain",
)
@pytest.mark.parametrize("shape", [(6,), (4, 6), (2, 6, 3), (3, 40, 2)], ids=str)
@pytest.mark.parametrize("normalised", [True, False])
def test_probability_targets_match_fp64(backend, device, shape, opts, reduction, normalised):
    C = shape[1] if len(shape) > 1 else shape[0]
    kw = _options(opts, C, device)
    cdim = 1 if len(shape) > 1 else 0
    x = torch.randn(shape, device=device) * 2
    p = torch.rand(shape, device=device)
    p = p.softmax(cdim) if normalised else p * 1.5 - 0.2  # unnormalised, some negative
    xs = x.clone().requires_grad_()
    ts = p.clone().requires_grad_()
    x64 = x.double().requires_grad_()
    t64 = p.double().requires_grad_()
    ours = tl_.cross_entropy(xs, ts, reduction=reduction, **kw)
    ref = ref_cross_entropy(x64, t64, reduction=reduction, **kw)
    up = torch.randn(ref.shape, dtype=torch.float64, device=device)
    gx, gt = torch.autograd.grad(ours, (xs, ts), up.float())
    rx, rt = torch.autograd.grad(ref, (x64, t64), up)
    budget_close(ours, ref)
    budget_close(gx, rx)
    budget_close(gt, rt)


FP64_OPTIONS = [
    {},
    {"weight": True, "ignore_index": 0},
    {"label_smoothing": 0.2},
    # float options that fp32 cannot hold: the kernels take them as fp32 pairs (a plain float argument
    # is fp32 in Triton: 0.2 alone was off by 1e-8 relative in fp64)
    {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 7.3},
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", FP64_OPTIONS, ids=str)
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_fp64_input_is_exact(backend, device, opts, reduction, prob):
    """fp64 logits give fp64-exact results (the budget's fp64 slack, 1e-12 relative), every float option."""
    kw = _options(opts, 9, device)
    if "weight" in kw:
        kw["weight"] = kw["weight"].double()
    x = torch.randn(6, 9, 2, device=device, dtype=torch.float64) * 3
    if prob:
        kw.pop("ignore_index", None)
        t = torch.randn(6, 9, 2, device=device, dtype=torch.float64).softmax(1)
    else:
        t = _target((6, 9, 2), 9, device, kw.get("ignore_index"))
    ours, ref, g_ours, g_ref = _run_both(x, t, reduction, dtype=torch.float64, **kw)
    assert ours.dtype == torch.float64
    budget_close(ours, ref)
    budget_close(g_ours, g_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opts", [{}, {"weight": True, "ignore_index": 1, "label_smoothing": 0.1}], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_low_precision_within_error_budget(backend, device, dtype, opts, reduction):
    if device == "cpu" and dtype == torch.float16 and backend == "torch" and torch.__version__ < "2.1":
        pytest.skip("old torch lacks fp16 CPU log_softmax")
    C = 300
    kw = _options(opts, C, device)
    if "weight" in kw:
        kw["weight"] = kw["weight"].to(dtype)
    x = (torch.randn(16, C, device=device) * 4).to(dtype).float()  # representable in dtype
    t = _target((16, C), C, device, kw.get("ignore_index"))
    x64 = x.double().requires_grad_()
    kw64 = dict(kw, weight=kw["weight"].double()) if "weight" in kw else kw
    ref = ref_cross_entropy(x64, t, reduction=reduction, **kw64)
    up = torch.rand(ref.shape, dtype=torch.float64, device=device) + 0.5
    (g_ref,) = torch.autograd.grad(ref, x64, up)
    xs = x.to(dtype).requires_grad_()
    ours = tl_.cross_entropy(xs, t, reduction=reduction, **kw)
    (g_ours,) = torch.autograd.grad(ours, xs, up.to(dtype))
    lowp, g_lowp = _torch_lowp(x, t, reduction, dtype, up.to(dtype), **kw)
    assert ours.dtype == dtype and g_ours.dtype == dtype
    budget_close(ours, ref, lowp)
    budget_close(g_ours, g_ref, g_lowp)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_targets_ignored(backend, device, reduction):
    x = torch.randn(4, 6, device=device, requires_grad=True)
    t = torch.full((4,), 2, device=device)
    for kw in [{}, {"weight": torch.rand(6, device=device)}, {"label_smoothing": 0.3}]:
        ours = tl_.cross_entropy(x, t, ignore_index=2, reduction=reduction, **kw)
        ref = F.cross_entropy(x, t, ignore_index=2, reduction=reduction, **kw)
        torch.testing.assert_close(ours, ref, equal_nan=True)
        if reduction == "mean":
            assert ours.isnan()
        (g,) = torch.autograd.grad(ours.sum(), x)
        (gr,) = torch.autograd.grad(ref.sum(), x)
        torch.testing.assert_close(g, gr, equal_nan=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape,tshape", [((0, 5), (0,)), ((2, 5, 0), (2, 0)), ((0, 3, 4), (0, 4))])
def test_empty_batch(backend, device, shape, tshape, reduction):
    x = torch.randn(shape, device=device, requires_grad=True)
    t = torch.zeros(tshape, dtype=torch.long, device=device)
    ours = tl_.cross_entropy(x, t, reduction=reduction)
    ref = F.cross_entropy(x, t, reduction=reduction)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, equal_nan=True)
    ours.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_nonfinite_logits_as_torch_defines_them(backend, device, smoothing):
    inf, nan = float("inf"), float("nan")
    x = torch.tensor(
        [
            [0.5, -inf, 1.0, 2.0],  # -inf at a non-target class: finite loss (inf with smoothing)
            [0.5, -inf, 1.0, 2.0],  # -inf at the target: inf
            [0.5, inf, 1.0, 2.0],  # +inf: NaN
            [0.5, nan, 1.0, 2.0],  # NaN: NaN
            [-inf, -inf, -inf, -inf],  # all -inf: NaN
            [nan, 1.0, 1.0, 1.0],  # NaN in an ignored row: loss 0, gradient NaN
            [1e30, -1e30, 0.0, 3.0],  # huge but finite
        ],
        device=device,
        requires_grad=True,
    )
    t = torch.tensor([0, 1, 0, 0, 0, -100, 1], device=device)
    ours = tl_.cross_entropy(x, t, reduction="none", label_smoothing=smoothing)
    ref = F.cross_entropy(x.double(), t, reduction="none", label_smoothing=smoothing)
    torch.testing.assert_close(ours.double(), ref, equal_nan=True)
    up = torch.rand(7, device=device)
    (g,) = torch.autograd.grad(ours, x, up)
    xr = x.detach().double().requires_grad_()
    (gr,) = torch.autograd.grad(F.cross_entropy(xr, t, reduction="none", label_smoothing=smoothing), xr, up.double())
    torch.testing.assert_close(g.double(), gr, equal_nan=True)


def test_ignore_index_semantics(backend, device):
    x = torch.randn(8, 5, device=device)
    for ii in (-100, -1, 3, 10):
        t = torch.randint(0, 5, (8,), device=device)
        t[::3] = ii if 0 <= ii < 5 or ii < 0 else 4
        if ii < 0 or ii >= 5:
            t[::3] = ii
        for red in REDUCTIONS:
            torch.testing.assert_close(
                tl_.cross_entropy(x, t, ignore_index=ii, reduction=red),
                F.cross_entropy(x, t, ignore_index=ii, reduction=red),
            )


def test_negative_and_zero_weights(backend, device):
    x = torch.randn(6, 4, device=device)
    t = torch.tensor([0, 1, 2, 3, 1, 0], device=device)
    for w in (torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.zeros(4)):
        w = w.to(device)
        for red in REDUCTIONS:
            torch.testing.assert_close(
                tl_.cross_entropy(x, t, weight=w, reduction=red),
                F.cross_entropy(x, t, weight=w, reduction=red),
                equal_nan=True,
            )


def test_negative_label_smoothing_acts_as_zero(backend, device):
    x = torch.randn(5, 6, device=device)
    t = torch.randint(0, 6, (5,), device=device)
    torch.testing.assert_close(
        tl_.cross_entropy(x, t, label_smoothing=-0.5), F.cross_entropy(x, t, label_smoothing=-0.5)
    )


def test_uint8_targets(backend, device):
    x = torch.randn(5, 6, device=device)
    t = torch.randint(0, 6, (5,), device=device, dtype=torch.uint8)
    torch.testing.assert_close(tl_.cross_entropy(x, t), F.cross_entropy(x, t))
    torch.testing.assert_close(tl_.nll_loss(x, t, reduction="sum"), F.nll_loss(x, t, reduction="sum"))


@pytest.mark.parametrize(
    "make",
    [
        lambda d: torch.randn(6, 20, device=d)[:, ::2],  # sliced columns
        lambda d: torch.randn(20, 6, device=d).t(),  # transposed: class stride != 1
        lambda d: torch.randn(3, 4, 10, device=d).transpose(0, 1).reshape(4, 3, 10)[:, 1],  # row stride != C
        lambda d: torch.randn(1, 10, device=d).expand(5, 10),  # expanded (stride 0)
        lambda d: torch.randn(4, 6, 3, 2, device=d).permute(0, 1, 3, 2),  # K-dim non-contiguous
    ],
    ids=["sliced", "transposed", "row-strided", "expanded", "kdim-permuted"],
)
def test_noncontiguous_input(backend, device, make):
    x = make(device)
    C = x.shape[1]
    t = torch.randint(0, C, (x.shape[0], *x.shape[2:]), device=device)
    for red in REDUCTIONS:
        xa = x.detach().clone().requires_grad_()
        xb = x.detach().contiguous().requires_grad_()
        a = tl_.cross_entropy(xa, t, reduction=red, label_smoothing=0.1)
        b = F.cross_entropy(xb, t, reduction=red, label_smoothing=0.1)
        torch.testing.assert_close(a, b)
        up = torch.randn_like(b)
        torch.testing.assert_close(torch.autograd.grad(a, xa, up)[0], torch.autograd.grad(b, xb, up)[0])


@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_transposed_logits_are_read_across_rows(backend, device, prob):
    """A transposed ``(C, N)`` buffer is viewed as the K-dim ``(1, C, N)``: coalesced tiles of neighbouring rows
    (not one row's classes ``N`` apart), the same losses, and a gradient laid out as the input."""
    from triton_losses._checks import ce_views
    from triton_losses.kernels._common import launch_config

    N, C = 24, 10
    x = torch.randn(C, N, device=device, dtype=torch.float64).t()
    t = torch.randn(C, N, device=device, dtype=torch.float64).softmax(0).t() if prob else _target((N, C), C, device)
    xv, tv = ce_views(x, t, prob)
    assert xv.shape == (1, C, N) and xv.stride(2) == 1 and tv.shape == ((1, C, N) if prob else (1, N))
    assert launch_config(C, 2, xv.stride(1) == 1 or xv.shape[2] == 1)[0] > 1  # tiles across rows
    kw = dict(weight=torch.rand(C, device=device, dtype=torch.float64) + 0.1, label_smoothing=0.1)
    for red in REDUCTIONS:
        xa, xr = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
        ours = tl_.cross_entropy(xa, t, reduction=red, **kw)
        ref = ref_cross_entropy(xr, t, reduction=red, **kw)
        budget_close(ours, ref)
        up = torch.randn_like(ref)
        (g,) = torch.autograd.grad(ours, xa, up)
        assert g.stride() == xa.stride()
        budget_close(g, torch.autograd.grad(ref, xr, up)[0])


def test_noncontiguous_target(backend, device):
    x = torch.randn(6, 7, device=device)
    t = torch.randint(0, 7, (6, 2), device=device)[:, 1]
    torch.testing.assert_close(tl_.cross_entropy(x, t), F.cross_entropy(x, t))


def test_caller_input_is_never_modified(backend, device):
    x = torch.randn(5, 9, device=device, requires_grad=True)
    snapshot = x.detach().clone()
    t = torch.randint(0, 9, (5,), device=device)
    for red in REDUCTIONS:
        loss = tl_.cross_entropy(x, t, reduction=red)
        loss.sum().backward()
    assert torch.equal(x.detach(), snapshot)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_inplace_backward_reuses_logits_memory(backend, device, reduction):
    base = torch.randn(5, 9, device=device)
    t = torch.randint(0, 9, (5,), device=device)
    x = base.clone().requires_grad_()
    h = x * 1.0  # a non-leaf: its buffer may be overwritten
    loss = tl_.cross_entropy(h, t, reduction=reduction, inplace_backward=True)
    h.retain_grad()
    up = torch.randn_like(loss)
    loss.backward(up)
    xr = base.clone().requires_grad_()
    ref = F.cross_entropy(xr, t, reduction=reduction)
    ref.backward(up)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(x.grad, xr.grad)
    assert torch.equal(h.detach(), h.grad)  # the logits' memory now holds their gradient


def test_retain_graph_and_two_losses_on_same_logits(backend, device):
    x = torch.randn(6, 8, device=device, requires_grad=True)
    t = torch.randint(0, 8, (6,), device=device)
    loss = tl_.cross_entropy(x, t)
    loss.backward(retain_graph=True)
    g1 = x.grad.clone()
    loss.backward(torch.tensor(3.0, device=device))
    torch.testing.assert_close(x.grad, 4 * g1)
    x.grad = None
    a = tl_.cross_entropy(x, t)
    b = tl_.cross_entropy(x, t, label_smoothing=0.5, reduction="sum")
    (a + 2 * b).backward()
    xr = x.detach().clone().requires_grad_()
    (F.cross_entropy(xr, t) + 2 * F.cross_entropy(xr, t, label_smoothing=0.5, reduction="sum")).backward()
    torch.testing.assert_close(x.grad, xr.grad)


def test_upstream_op_that_saved_logits(backend, device):
    """softmax -> log -> CE: the producer saved the tensor CE reads; its gradient must stay right."""
    z = torch.randn(4, 7, device=device, requires_grad=True)
    t = torch.randint(0, 7, (4,), device=device)
    h = torch.exp(z)  # exp saves its output, which is CE's input
    tl_.cross_entropy(h, t).backward()
    zr = z.detach().clone().requires_grad_()
    F.cross_entropy(torch.exp(zr), t).backward()
    torch.testing.assert_close(z.grad, zr.grad)


def test_input_without_grad(backend, device):
    x = torch.randn(5, 9, device=device)
    t = torch.randint(0, 9, (5,), device=device)
    torch.testing.assert_close(tl_.cross_entropy(x, t), F.cross_entropy(x, t))
    with torch.no_grad():
        torch.testing.assert_close(tl_.cross_entropy(x.requires_grad_(), t), F.cross_entropy(x, t))


def test_invariants(backend, device):
    x = torch.randn(7, 13, device=device, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 13, (7,), device=device)
    ce = tl_.cross_entropy(x, t, reduction="none")
    torch.testing.assert_close(ce, tl_.nll_loss(tl_.log_softmax(x, 1), t, reduction="none"))
    torch.testing.assert_close(ce, tl_.cross_entropy(x + 1000.0, t, reduction="none"))
    (g,) = torch.autograd.grad(ce.sum(), x)
    torch.testing.assert_close(g.sum(1), torch.zeros(7, dtype=torch.float64, device=device), atol=1e-12, rtol=0)
    onehot = F.one_hot(t, 13).double()
    torch.testing.assert_close(ce, tl_.cross_entropy(x, onehot, reduction="none"))


def test_gradient_accumulation_recipe(backend, device):
    x = torch.randn(12, 6, device=device, requires_grad=True)
    t = torch.randint(0, 6, (12,), device=device)
    t[[1, 5, 6]] = -100
    n_tokens = (t != -100).sum()
    total = sum(tl_.cross_entropy(x[i : i + 4], t[i : i + 4], reduction="sum") / n_tokens for i in range(0, 12, 4))
    total.backward()
    xr = x.detach().clone().requires_grad_()
    F.cross_entropy(xr, t).backward()
    torch.testing.assert_close(total, F.cross_entropy(xr, t))
    torch.testing.assert_close(x.grad, xr.grad)


def test_softcap_keeps_padding_out_of_the_softmax(backend, device):
    """V not a multiple of the block: padded lanes must not leak ``exp(-softcap)`` mass."""
    for C in (3, 17, 33):
        x = torch.randn(4, C, device=device, dtype=torch.float64) * 10
        t = torch.randint(0, C, (4,), device=device)
        torch.testing.assert_close(
            tl_.cross_entropy(x, t, softcap=2.0, reduction="none"),
            ref_cross_entropy(x, t, softcap=2.0, reduction="none"),
        )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_loss_matches_torch(backend, device, reduction):
    for shape in [(6,), (5, 6), (3, 6, 4), (2, 6, 2, 3)]:
        x = torch.randn(shape, device=device, dtype=torch.float64).log_softmax(1 if len(shape) > 1 else 0)
        x.requires_grad_()
        C = shape[1] if len(shape) > 1 else shape[0]
        t = _target(shape, C, device, 2)
        w = torch.rand(C, device=device, dtype=torch.float64)
        for kw in ({}, {"weight": w}, {"ignore_index": 2}, {"weight": w, "ignore_index": 2}):
            ours = tl_.nll_loss(x, t, reduction=reduction, **kw)
            ref = F.nll_loss(x, t, reduction=reduction, **kw)
            torch.testing.assert_close(ours, ref, equal_nan=True)
            up = torch.randn_like(ref)
            torch.testing.assert_close(torch.autograd.grad(ours, x, up)[0], torch.autograd.grad(ref, x, up)[0])


def test_gradcheck_torch_backend(device, monkeypatch):
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "torch")
    x = torch.randn(3, 5, 2, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, 5, (3, 2), device=device)
    p = torch.rand(3, 5, 2, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.rand(5, dtype=torch.float64, device=device)
    for red, kw in itertools.product(REDUCTIONS, [{}, {"weight": w, "label_smoothing": 0.2, "z_loss": 0.1}]):
        f_index = lambda x, red=red, kw=kw: tl_.cross_entropy(x, t, reduction=red, softcap=4.0, **kw)
        f_prob = lambda x, p, red=red, kw=kw: tl_.cross_entropy(x, p, reduction=red, **kw)
        assert torch.autograd.gradcheck(f_index, (x,))
        assert torch.autograd.gradcheck(f_prob, (x, p))


@pytest.mark.parametrize(
    "kw",
    [{}, pytest.param({"weight": True, "label_smoothing": 0.2, "z_loss": 0.1, "softcap": 4.0}, marks=pytest.mark.slow)],
    ids=str,
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_second_order_gradients(backend, device, reduction, kw):
    """gradgradcheck on tiny fp64 inputs: a create_graph backward is differentiable and exact."""
    if backend == "triton" and (reduction == "sum" or not kw):
        pytest.skip("each gradgradcheck costs ~10 s on the interpreter: one reduction per option set there")
    x = torch.randn(2, 4, 2, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.tensor([[0, 3], [2, -100]], device=device)
    p = torch.rand(2, 4, 2, dtype=torch.float64, device=device, requires_grad=True)
    kw = dict(kw, weight=torch.rand(4, dtype=torch.float64, device=device) + 0.1) if kw.get("weight") else kw
    assert torch.autograd.gradgradcheck(lambda x: tl_.cross_entropy(x, t, reduction=reduction, **kw), (x,))
    assert torch.autograd.gradgradcheck(lambda x, p: tl_.cross_entropy(x, p, reduction=reduction, **kw), (x, p))
    lp = torch.log_softmax(x.detach(), 1).requires_grad_()
    w = kw.get("weight")
    assert torch.autograd.gradgradcheck(lambda v: tl_.nll_loss(v, t, weight=w, reduction=reduction), (lp,))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_double_backward_matches_torch(backend, device, reduction):
    x = torch.randn(4, 6, device=device, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    t = torch.tensor([0, 5, -100, 2], device=device)
    w = torch.rand(6, device=device, dtype=torch.float64)
    for kw in ({}, {"weight": w, "label_smoothing": 0.3}):
        ours = tl_.cross_entropy(x, t, reduction=reduction, **kw)
        ref = F.cross_entropy(xr, t, reduction=reduction, **kw)
        up = torch.rand(ref.shape, dtype=torch.float64, device=device) + 0.5
        (g,) = torch.autograd.grad(ours, x, up, create_graph=True)
        (gr,) = torch.autograd.grad(ref, xr, up, create_graph=True)
        torch.testing.assert_close(g, gr)
        v = torch.randn_like(g)
        torch.testing.assert_close(torch.autograd.grad(g, x, v)[0], torch.autograd.grad(gr, xr, v)[0])
    # nll_loss is linear in its input: the gradient is still differentiable w.r.t. it (zeros), as torch's
    for kw in ({}, {"weight": w}):
        ours, ref = tl_.nll_loss(x, t, reduction=reduction, **kw), F.nll_loss(xr, t, reduction=reduction, **kw)
        up = torch.rand(ref.shape, dtype=torch.float64, device=device) + 0.5
        (g,) = torch.autograd.grad(ours, x, up, create_graph=True)
        (gr,) = torch.autograd.grad(ref, xr, up, create_graph=True)
        torch.testing.assert_close(g, gr)
        assert torch.equal(torch.autograd.grad((g * g).sum(), x)[0], torch.zeros_like(x))


def test_strided_class_weights_are_read_with_their_stride(backend, device):
    w = torch.tensor([[1.0, 9.0], [2.0, 9.0], [3.0, 9.0], [4.0, 9.0]], device=device)[:, 0]
    x = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.3, -0.2, 2.0, 1.0]], device=device, requires_grad=True)
    t = torch.tensor([1, 3], device=device)
    ours = tl_.cross_entropy(x, t, weight=w, reduction="none")
    torch.testing.assert_close(ours, torch.tensor([0.9904, 6.0306], device=device), atol=1e-4, rtol=0)
    cases = [w, torch.full((1,), 0.7, device=device).expand(4)]  # sliced; expanded (stride 0)
    for wv in cases:
        for kw in ({}, {"label_smoothing": 0.2}, {"reduction": "sum"}):
            a = tl_.cross_entropy(x, t, weight=wv, **kw)
            b = F.cross_entropy(x, t, weight=wv.contiguous(), **kw)
            torch.testing.assert_close(a, b)
            torch.testing.assert_close(torch.autograd.grad(a, x)[0], torch.autograd.grad(b, x)[0])
        p = torch.rand(2, 4, device=device)
        torch.testing.assert_close(tl_.cross_entropy(x, p, weight=wv), F.cross_entropy(x, p, weight=wv.contiguous()))
        lp = torch.log_softmax(x.detach(), 1)
        torch.testing.assert_close(tl_.nll_loss(lp, t, weight=wv), F.nll_loss(lp, t, weight=wv.contiguous()))
    module = tl_.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)  # a module whose weight buffer is a view
    torch.testing.assert_close(module(x, t), F.cross_entropy(x, t, weight=w.contiguous(), label_smoothing=0.1))


def test_fp32_accuracy_does_not_fall_with_logit_magnitude(backend, device):
    """At 300 * randn logits a log-sum-exp rounded to fp32 cost 2e-5 relative error in the gradient."""
    x = torch.randn(8, 1000, device=device) * 300
    t = torch.randint(0, 1000, (8,), device=device)
    for kw in ({}, {"label_smoothing": 0.1, "z_loss": 1e-4}):
        ours, ref, g_ours, g_ref = _run_both(x, t, "sum", **kw)
        lowp, g_lowp = _torch_lowp(x, t, "sum", torch.float32, torch.tensor(1.7, device=device), **kw)
        budget_close(ours, ref, lowp)
        budget_close(g_ours, g_ref, g_lowp)
        rel = ((g_ours.double() - g_ref).abs() / g_ref.abs().clamp_min(1e-30))[g_ref.abs() > 1e-3]
        assert rel.max() < 2e-6, rel.max()


@pytest.mark.parametrize("offset", [30.0, 1000.0])
@pytest.mark.parametrize(
    "targets,opts",
    [("index", {"label_smoothing": 0.2}), ("index", {"weight": True, "label_smoothing": 0.1}),
     ("probs", {}), ("probs", {"weight": True, "label_smoothing": 0.2})],
    ids=lambda v: v if isinstance(v, str) else ",".join(v) or "plain",
)  # fmt: skip
def test_fp32_accuracy_does_not_fall_with_a_logit_offset(backend, device, targets, opts, offset):
    """Logits ``offset + 2 randn`` (losses of a few units): the smoothing and probability-target sums
    ``sum w x`` taken from 0 cancelled terms of size ``offset`` against ``m * S1`` (4x torch's fp32 error at
    30, 30x at 300, forward and target gradient); taken from a logit of the row they stay within budget."""
    C = 3000  # one row in several column blocks
    kw = _options(opts, C, device)
    x = torch.randn(16, C, device=device) * 2 + offset
    if targets == "index":
        t = torch.randint(0, C, (16,), device=device)
    else:
        t = torch.randn(16, C, device=device).softmax(1)
    up = torch.randn(16, dtype=torch.float64, device=device)
    results = []
    for fn, dtype in ((tl_.cross_entropy, torch.float32), (F.cross_entropy, torch.float32), (ref_cross_entropy, None)):
        xs = x.clone() if dtype else x.double()
        ts = t if targets == "index" or dtype else t.double()
        xs.requires_grad_()
        wrt = (xs,) if targets == "index" else (xs, ts.requires_grad_())
        w = {k: (v.double() if dtype is None and torch.is_tensor(v) else v) for k, v in kw.items()}
        out = fn(xs, ts, reduction="none", **w)
        results.append((out, *torch.autograd.grad(out, wrt, up.to(out.dtype))))
    for ours, lowp, ref in zip(*results):
        budget_close(ours, ref, lowp)


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_zero_total_weight_mean_is_nan_like_torch(backend, device, fn):
    """Every non-ignored target has class weight 0: 'mean' is 0/0, NaN, and so are torch's gradients there."""
    x = torch.randn(4, 5, device=device, requires_grad=True)
    w = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0], device=device)
    for t, kw in [
        (torch.tensor([0, 1, -100, 3], device=device), {"label_smoothing": 0.1}),
        (torch.tensor([0, 1, 2, 3], device=device), {"label_smoothing": 0.1}),
        (torch.tensor([0, 1, -100, 3], device=device), {}),
    ]:
        if fn == "nll_loss":
            if kw:
                continue
            ours, ref = tl_.nll_loss(x, t, weight=w), F.nll_loss(x, t, weight=w)
        else:
            ours, ref = tl_.cross_entropy(x, t, weight=w, **kw), F.cross_entropy(x, t, weight=w, **kw)
        assert ours.isnan() and ref.isnan()
        g, gr = torch.autograd.grad(ours, x)[0], torch.autograd.grad(ref, x)[0]
        assert torch.equal(g.isnan(), gr.isnan()), (g, gr)
        torch.testing.assert_close(g, gr, equal_nan=True)


def test_cpu_autocast_returns_fp32_like_torch(backend, device):
    if device != "cpu":
        pytest.skip("CPU autocast")
    x = torch.randn(6, 7).bfloat16().requires_grad_()
    t = torch.randint(0, 7, (6,))
    p = torch.rand(6, 7).bfloat16()
    w = torch.rand(7).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pairs = [
            (tl_.cross_entropy(x, t), F.cross_entropy(x, t)),
            (tl_.cross_entropy(x, t, weight=w, reduction="none"), F.cross_entropy(x, t, weight=w, reduction="none")),
            (tl_.cross_entropy(x, p), F.cross_entropy(x, p)),
            (tl_.nll_loss(x, t), F.nll_loss(x, t)),
        ]
    for ours, ref in pairs:
        assert ours.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(ours, ref)
    g, gr = torch.autograd.grad(pairs[0][0], x)[0], torch.autograd.grad(pairs[0][1], x)[0]
    assert g.dtype == gr.dtype == torch.bfloat16
    torch.testing.assert_close(g, gr)
    # the weighted smoothing sum is computed in fp32 inside the region too (a matmul there ran in bf16:
    # 4000x torch's error at 3 + 2 randn logits)
    x32, w32 = torch.randn(5, 9) * 2 + 3, torch.rand(9) + 0.2
    kw = dict(weight=w32, label_smoothing=0.1, reduction="none")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref = tl_.cross_entropy(x32, t[:5], **kw), F.cross_entropy(x32, t[:5], **kw)
    budget_close(ours, F.cross_entropy(x32.double(), t[:5], weight=w32.double(), label_smoothing=0.1,
                                       reduction="none"), ref)  # fmt: skip


@pytest.mark.interpreter
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("op", ["cross_entropy", "nll_loss"])
def test_autocast_reads_16bit_logits_without_an_fp32_copy(device, monkeypatch, op, reduction):
    """Under autocast torch copies 16-bit logits to fp32; the kernels read them as they are (computing in
    fp32 either way): torch's fp32 loss and 16-bit gradient, and no fp32 copy of the logits."""
    from tests.op_counts import count_ops
    from triton_losses.kernels import cross_entropy as k

    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "triton")
    kind = "cuda" if device == "cuda" else "cpu"
    x = (torch.randn(6, 300, device=device) * 2).bfloat16().requires_grad_()
    t = torch.randint(0, 300, (6,), device=device)
    t[2] = -100
    up = torch.rand(6, device=device) if reduction == "none" else torch.ones((), device=device)
    fn = getattr(tl_, op)
    launchers = [(k, name) for name in ("ce_norm", "ce_fwd", "ce_bwd", "ce_finish", "scale_")]
    out = []
    with torch.autocast(kind, dtype=torch.bfloat16):
        ops, _ = count_ops(lambda: out.append(fn(x, t, reduction=reduction)), launchers, monkeypatch)
        ref = getattr(F, op)(x, t, reduction=reduction)
    assert "aten._to_copy.default" not in ops, ops  # torch's autocast would copy x to fp32 here
    (ours,) = out
    (g,) = torch.autograd.grad(ours, x, up)
    (gr,) = torch.autograd.grad(ref, x, up)
    assert ours.dtype == ref.dtype == torch.float32 and g.dtype == gr.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, gr)  # bf16's tolerance: one rounding of the same fp32 gradient
    w = torch.rand(300, device=device).bfloat16()
    with torch.autocast(kind, dtype=torch.bfloat16):  # with class weights: torch's cast, as before
        ours, ref = fn(x, t, weight=w, reduction=reduction), getattr(F, op)(x, t, weight=w, reduction=reduction)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref)


@pytest.mark.interpreter
def test_custom_ops_pass_opcheck(device):
    pytest.importorskip("triton")
    from triton_losses.kernels import cross_entropy as k

    x = torch.randn(3, 7, 2, device=device)
    t = torch.randint(0, 7, (3, 2), device=device)
    w = torch.rand(7, device=device)
    coef = torch.full((1,), 0.25, device=device)
    _, stats = k.ce_fwd(x, t, k.CESpec(), coef)
    gout = torch.ones(1, device=device)
    scalars = (-100, 0.1, 1e-3, 0.0, False, False)
    for weight in (None, w):
        wsum = None if weight is None else weight.sum().reshape(1)
        for want in (False, True):
            torch.library.opcheck(k.ce_fwd_op, (x, t, weight, wsum, coef, *scalars, want))
        torch.library.opcheck(k.ce_bwd_op, (x, t, weight, wsum, stats, gout, coef, *scalars, False))
    p = torch.rand(3, 7, 2, device=device)
    torch.library.opcheck(k.ce_bwd_op, (x, p, None, None, stats, gout, None, -100, 0.0, 0.0, 0.0, True, False, True))


@pytest.mark.interpreter
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_forward_backward_device_ops(device, monkeypatch, reduction, weighted):
    """mean / sum with index targets and ``loss.backward()``: at most 4 device ops, no host sync (CUDA rules)."""
    import sys

    from tests.op_counts import HOST_SYNCS, count_ops
    from triton_losses.kernels import cross_entropy as k

    ce = sys.modules["triton_losses.cross_entropy"]
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "triton")
    monkeypatch.setattr(ce, "check_target_range", lambda *a: None)  # off by default on CUDA
    x = torch.randn(8, 50, device=device, requires_grad=True)
    t = torch.randint(0, 50, (8,), device=device)
    w = torch.rand(50, device=device) if weighted else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1 if weighted else 0.0)
    one = torch.ones((), device=device)
    launchers = [(k, name) for name in ("ce_norm", "ce_fwd", "ce_bwd", "ce_finish", "scale_")]
    ops, launches = count_ops(lambda: tl_.cross_entropy(x, t, **kw).backward(one), launchers, monkeypatch)
    assert not [op for op in ops if op in HOST_SYNCS], ops
    assert len(ops) + sum(launches.values()) <= 4, (ops, launches)
    assert launches["ce_bwd"] == 0  # the forward wrote the gradient; the backward only scaled it
    ref = x.detach().clone().requires_grad_()
    F.cross_entropy(ref, t, **kw).backward()
    torch.testing.assert_close(x.grad, ref.grad)


@pytest.mark.gpu
def test_cuda_out_of_range_target_trips_the_device_assert():
    """By default nothing syncs: a bad target is a device-side assert (in a subprocess: it poisons the context)."""
    from tests.helpers import run_isolated

    code = (
        "import torch, triton_losses as t\n"
        "x = torch.randn(4, 5, device='cuda')\n"
        "t.cross_entropy(x, torch.tensor([0, 1, 7, 2], device='cuda'))\n"
        "torch.cuda.synchronize()\n"
    )
    proc = run_isolated(code, env={"TRITON_LOSSES_CHECK_TARGETS": "0"})
    assert proc.returncode != 0
    assert "target out of bounds" in proc.stdout + proc.stderr or "device-side assert" in proc.stderr, proc.stderr


@pytest.mark.gpu
def test_cuda_eager_target_check_is_an_opt_in(monkeypatch):
    monkeypatch.setenv("TRITON_LOSSES_CHECK_TARGETS", "1")
    x = torch.randn(4, 5, device="cuda")
    with pytest.raises(IndexError, match=r"Target 7 is out of bounds\."):
        tl_.cross_entropy(x, torch.tensor([0, 1, 7, 2], device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_forward_backward_without_host_sync(reduction):
    x = torch.randn(64, 32000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 32000, (64,), device="cuda")
    t[::7] = -100
    w = torch.rand(32000, device="cuda", dtype=torch.bfloat16)
    up = torch.rand((64,) if reduction == "none" else (), device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = tl_.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=0.1)
        loss.backward(up)
        y = tl_.log_softmax(x, 1)
        y.backward(torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("cap", [1024, 2], ids=["programs=cdiv", "programs=2"])
@pytest.mark.parametrize("opts", [{"ignore_index": 1}, {"weight": True, "label_smoothing": 0.1}], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_many_rows_reduce_in_two_stages(backend, device, monkeypatch, opts, reduction, cap):
    """K-dim inputs have millions of rows (pixels): above ``SPLIT_STEPS`` steps the denominator and the final
    sum take a first stage of several programs, then the single program sums their partials (deterministic).
    Here the threshold is lowered so 6000 rows take it, with the program cap at its value and at 2 (more
    rows per program)."""
    from triton_losses.kernels import _ce_reduce as k

    monkeypatch.setattr(k, "SPLIT_STEPS", 1)
    monkeypatch.setattr(k, "SPLIT_PROGRAMS", cap)
    splits = []
    split = k._split
    monkeypatch.setattr(k, "_split", lambda R, block: splits.append(split(R, block)) or splits[-1])
    kw = _options(opts, 4, device)
    x = torch.randn(2, 4, 60, 50, device=device) * 2
    t = _target((2, 4, 60, 50), 4, device, ignore_index=kw.get("ignore_index", -100))
    ours, ref, g_ours, g_ref = _run_both(x, t, reduction, **kw)
    budget_close(ours, ref)
    budget_close(g_ours, g_ref)
    if backend == "triton":
        needs_norm = reduction == "mean" or "weight" in kw  # 'sum' of index targets needs no denominator
        assert len(splits) == 1 + needs_norm and all(p > 1 for p, _ in splits), splits
        again = tl_.cross_entropy(x, t, reduction=reduction, **kw)
        assert torch.equal(again, ours.detach())  # a fixed grid and order: the same bits every call
