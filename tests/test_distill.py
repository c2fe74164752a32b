"""jsd and kl_div_with_logits against fp64 references written from their documented formulas."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import triton_losses as tl_
from tests.fp64_checks import check_against_fp64
from tests.op_counts import HOST_SYNCS, count_ops
from triton_losses.reference import distill as distill_ref

REDUCTIONS = ["batchmean", "sum", "mean", "none"]
BETAS = [0.0, 0.1, 0.5, 1.0]
# (*, V): rows of 2-D and 3-D inputs; LONG: V of several blocks (fp32/fp64 blocks are <= 4096)
SHAPES = [(4, 7), (2, 3, 9)]
LONG = (2, 5000)


def _reduce(rows, labels, ignore_index, reduction, V):
    """Mask rows whose label is ``ignore_index`` and reduce as the docstrings define."""
    keep = torch.ones_like(rows, dtype=torch.bool) if labels is None else labels != ignore_index
    rows = torch.where(keep, rows, torch.zeros_like(rows))
    n = keep.sum()
    return {"none": rows, "sum": rows.sum(), "batchmean": rows.sum() / n, "mean": rows.sum() / (n * V)}[reduction]


def jsd_reference(input, target, beta, labels=None, ignore_index=-100, reduction="batchmean"):
    """``beta * KL(P || M) + (1 - beta) * KL(Q || M)``, ``M = beta * P + (1 - beta) * Q`` (fp64).

    ``Q = exp(input)``, ``P = exp(target)``; ``beta = 0`` is ``KL(P || Q)``, ``beta = 1`` is ``KL(Q || P)``.
    """
    kl = lambda log_a, log_b: F.kl_div(log_b, log_a, reduction="none", log_target=True).sum(-1)  # KL(a || b)
    if beta == 0.0:
        rows = kl(target, input)
    elif beta == 1.0:
        rows = kl(input, target)
    else:
        log_m = torch.log(beta * target.exp() + (1 - beta) * input.exp())
        rows = beta * kl(target, log_m) + (1 - beta) * kl(input, log_m)
    return _reduce(rows, labels, ignore_index, reduction, input.shape[-1])


def kd_reference(
    student_logits, teacher_logits, temperature=1.0, labels=None, ignore_index=-100, reduction="batchmean"
):
    """``KL(softmax(teacher / T) || softmax(student / T))`` per row (fp64), masked and reduced."""
    log_q = F.log_softmax(student_logits / temperature, -1)
    log_p = F.log_softmax(teacher_logits / temperature, -1)
    rows = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    return _reduce(rows, labels, ignore_index, reduction, student_logits.shape[-1])


def _labels(shape, device, ignore_index=-100, frac=0.3):
    lab = torch.randint(0, 50, shape[:-1], device=device)
    return torch.where(torch.rand(shape[:-1], device=device) < frac, torch.full_like(lab, ignore_index), lab)


def _logprobs(shape, device, scale=2.0):
    return (torch.randn(shape, device=device) * scale).log_softmax(-1)


def _jsd_case(shape, beta, labelled, reduction, device, dtype=torch.float64, **kw):
    tensors = {"input": _logprobs(shape, device), "target": _logprobs(shape, device)}
    if labelled:
        tensors["labels"] = _labels(shape, device, -1)
    return check_against_fp64(
        lambda **t: tl_.jsd(**t, beta=beta, ignore_index=-1, reduction=reduction),
        lambda **t: jsd_reference(**t, beta=beta, ignore_index=-1, reduction=reduction),
        tensors, ("input", "target"), dtype, **kw,
    )  # fmt: skip


def _kd_case(shape, temperature, labelled, reduction, device, dtype=torch.float64, offset=0.0, **kw):
    tensors = {
        "student_logits": torch.randn(shape, device=device) * 3 + offset,
        "teacher_logits": torch.randn(shape, device=device) * 3 + offset,
    }
    if labelled:
        tensors["labels"] = _labels(shape, device)
    return check_against_fp64(
        lambda **t: tl_.kl_div_with_logits(**t, temperature=temperature, reduction=reduction),
        lambda **t: kd_reference(**t, temperature=temperature, reduction=reduction),
        tensors, ("student_logits", "teacher_logits"), dtype, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_jsd_matches_fp64_formula(backend, device, shape, beta, labelled, reduction):
    out, _ = _jsd_case(shape, beta, labelled, reduction, device)
    assert out.shape == (shape[:-1] if reduction == "none" else ())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kl_div_with_logits_matches_fp64(backend, device, shape, temperature, labelled, reduction):
    out, _ = _kd_case(shape, temperature, labelled, reduction, device)
    assert out.shape == (shape[:-1] if reduction == "none" else ())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_rows_longer_than_one_block(backend, device, dtype):
    for beta in BETAS:
        _jsd_case(LONG, beta, True, "batchmean", device, dtype)
    for temperature in (1.0, 2.5):
        _kd_case(LONG, temperature, True, "batchmean", device, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_low_precision_within_budget(backend, device, dtype, reduction):
    for beta in (0.0, 0.5, 1.0):
        _jsd_case((6, 300), beta, True, reduction, device, dtype)
    _kd_case((6, 300), 2.0, True, reduction, device, dtype)


def test_kl_div_with_logits_is_exact_under_a_large_common_offset(backend, device):
    """Shift invariance: +1000 on every logit costs no precision (fp32 within 2e-6 of fp64)."""
    _kd_case((4, 257), 1.5, False, "none", device, torch.float32, offset=1000.0, lowp_oracle=False)


@pytest.mark.parametrize("where", [0, 150, 299], ids=["first", "middle", "last"])
def test_kl_div_with_logits_huge_negative_logit_costs_no_precision(backend, device, where):
    """A finite but huge negative logit (a token masked with -1e30) anywhere in the rows, fp32."""
    s, t = torch.randn(3, 300, device=device) * 3, torch.randn(3, 300, device=device) * 3
    s[:, where], t[:, where] = -1e30, -1e30
    t[1, where] = 0.5  # the teacher gives it mass where the student all but gives none: a KL of ~5e26
    s.requires_grad_()
    out = tl_.kl_div_with_logits(s, t, temperature=1.5, reduction="none")
    ref = kd_reference(s.detach().double(), t.double(), temperature=1.5, reduction="none")
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=2e-6)
    (g,) = torch.autograd.grad(out[[0, 2]].sum(), s)
    s64 = s.detach().double().requires_grad_()
    (gr,) = torch.autograd.grad(kd_reference(s64, t.double(), temperature=1.5, reduction="none")[[0, 2]].sum(), s64)
    torch.testing.assert_close(g.double(), gr, rtol=2e-5, atol=2e-6)


def test_zero_probabilities_contribute_nothing(backend, device):
    """-inf entries in both rows (a masked vocabulary) give the loss of the remaining entries."""
    V, keep = 12, torch.arange(12) % 4 != 0
    x, y = torch.randn(3, V, dtype=torch.float64, device=device), torch.randn(3, V, dtype=torch.float64, device=device)
    x[:, ~keep], y[:, ~keep] = float("-inf"), float("-inf")
    for beta in BETAS:
        xi, yi = x.log_softmax(-1).requires_grad_(), y.log_softmax(-1).requires_grad_()
        out = tl_.jsd(xi, yi, beta=beta, reduction="none")
        ref = jsd_reference(xi.detach()[:, keep], yi.detach()[:, keep], beta, reduction="none")
        torch.testing.assert_close(out, ref)
        gx, gy = torch.autograd.grad(out.sum(), (xi, yi))
        assert gx[:, ~keep].eq(0).all() and gy[:, ~keep].eq(0).all()
    s, t = x.clone().requires_grad_(), y.clone()
    t[:, ~keep] = float("-inf")
    out = tl_.kl_div_with_logits(s, t, reduction="none")
    torch.testing.assert_close(out, kd_reference(x[:, keep], y[:, keep], reduction="none"), rtol=0, atol=1e-10)
    assert torch.isfinite(torch.autograd.grad(out.sum(), s)[0]).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_reference_many_row_blocks(backend, device, dtype, monkeypatch):
    """The CPU reference with one or two rows per block (fused forward, recomputing backward)."""
    if backend != "torch":
        pytest.skip("the row blocks are the reference's")
    monkeypatch.setattr(distill_ref, "ROW_BLOCK_ELEMS", 10)
    for shape in (*SHAPES, (5, 4)):
        for reduction in ("sum", "none"):
            for beta in BETAS:
                _jsd_case(shape, beta, True, reduction, device, dtype)
            _kd_case(shape, 2.5, True, reduction, device, dtype)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_rows_that_need_masks_next_to_plain_rows(backend, device, reduction, monkeypatch):
    """Rows with -inf (zero probabilities), NaN or a vanishing mixture, in blocks with ordinary rows:
    each row's loss and gradients are those it has alone (the reference redoes such blocks with masks)."""
    monkeypatch.setattr(distill_ref, "ROW_BLOCK_ELEMS", 24)  # two rows of 12 per block
    V = 12
    x, y = torch.randn(6, V, dtype=torch.float64, device=device), torch.randn(6, V, dtype=torch.float64, device=device)
    x[1, :3], y[1, :3] = float("-inf"), float("-inf")  # a masked vocabulary in both
    y[2, 4] = float("-inf")  # the teacher alone
    x[3, 5] = float("nan")
    x, y = x.log_softmax(-1), y.log_softmax(-1)
    x[4, 0], y[4, 0] = -1000.0, -744.0  # q = 0 and p subnormal: beta * p underflows to 0
    labels = torch.tensor([0, 1, 2, 3, 4, -100], device=device)
    y[5] = float("nan")  # a dropped row: loss and gradients 0 whatever its values
    fns = [(tl_.kl_div_with_logits, kd_reference, {})]
    fns += [(tl_.jsd, lambda a, b, beta=beta, **kw: jsd_reference(a, b, beta, **kw), {"beta": beta}) for beta in BETAS]
    for fn, ref_fn, kw in fns:
        xi, yi = x.clone().requires_grad_(), y.clone().requires_grad_()
        out = fn(xi, yi, labels=labels, reduction=reduction, **kw)
        gx, gy = torch.autograd.grad(out.sum(), (xi, yi))
        rows = out if reduction == "none" else None
        for r in range(6):
            xr, yr = x[r : r + 1].clone().requires_grad_(), y[r : r + 1].clone().requires_grad_()
            alone = fn(xr, yr, labels=labels[r : r + 1], reduction="none", **kw)
            ax, ay = torch.autograd.grad(alone.sum(), (xr, yr))
            if r == 5:
                assert alone.item() == 0.0 and ax.eq(0).all() and ay.eq(0).all()
            if rows is not None:
                torch.testing.assert_close(rows[r : r + 1], alone, equal_nan=True)
            if r != 3:  # the NaN row: its own gradients are NaN, and so, under 'sum', is the loss
                torch.testing.assert_close(gx[r : r + 1], ax, equal_nan=True)
                torch.testing.assert_close(gy[r : r + 1], ay, equal_nan=True)
        if reduction == "sum":
            assert out.isnan()
        else:  # row 1 is its finite entries' loss; row 4 stays finite (log M from logaddexp, not log(0))
            keep = torch.isfinite(x[1])
            torch.testing.assert_close(rows[1:2], ref_fn(x[1:2, keep], y[1:2, keep], reduction="none"))
            assert torch.isfinite(rows[4])


def test_every_row_ignored(backend, device):
    x, y = _logprobs((3, 8), device).requires_grad_(), _logprobs((3, 8), device).requires_grad_()
    labels = torch.full((3,), -100, device=device)
    for fn in (tl_.jsd, tl_.kl_div_with_logits):
        assert fn(x, y, labels=labels).isnan()  # batchmean of no rows, like torch's mean of an empty set
        assert fn(x, y, labels=labels, reduction="sum").item() == 0.0
        assert fn(x, y, labels=labels, reduction="none").eq(0).all()
        gx, gy = torch.autograd.grad(fn(x, y, labels=labels), (x, y))
        assert gx.eq(0).all() and gy.eq(0).all()


def test_shifted_and_transposed_views(backend, device):
    """LM-style ``logits[:, :-1]`` / ``labels[:, 1:]`` slices and a ``(T, B, V)`` transpose need no copies."""
    s_full, t_full = torch.randn(2, 6, 33, device=device), torch.randn(2, 6, 33, device=device)
    labels = _labels((2, 6, 33), device)[:, 1:]
    for s, t in ((s_full[:, :-1], t_full[:, :-1]), (s_full.transpose(0, 1)[1:], t_full.transpose(0, 1)[1:])):
        lab = labels if s.shape[:2] == labels.shape else None
        for fn, a, b in ((tl_.kl_div_with_logits, s, t), (tl_.jsd, s.log_softmax(-1), t.log_softmax(-1))):
            ai, ac = a.detach().requires_grad_(), a.detach().contiguous().requires_grad_()
            out, ref = fn(ai, b, labels=lab, reduction="none"), fn(ac, b.contiguous(), labels=lab, reduction="none")
            torch.testing.assert_close(out, ref)
            up = torch.randn_like(out)
            torch.testing.assert_close(torch.autograd.grad(out, ai, up)[0], torch.autograd.grad(ref, ac, up)[0])


@pytest.mark.parametrize("fn", ["jsd", "kl_div_with_logits"])
def test_fused_gradient_backward_twice_and_upstream_scale(backend, device, fn):
    f = getattr(tl_, fn)
    x, y = _logprobs((5, 40), device).requires_grad_(), _logprobs((5, 40), device)
    labels = _labels((5, 40), device)
    loss = f(x, y, labels=labels) * 2.5
    loss.backward(retain_graph=True)
    g1 = x.grad.clone()
    loss.backward()  # the second backward recomputes (the fused buffer was handed out)
    torch.testing.assert_close(x.grad, 2 * g1)
    x2 = x.detach().requires_grad_()
    (g_none,) = torch.autograd.grad(f(x2, y, labels=labels, reduction="none").sum() * 2.5, x2)
    n = (labels != -100).sum()
    torch.testing.assert_close(g1, g_none / n)


def test_teacher_without_grad_gets_none(backend, device):
    s, t = torch.randn(3, 10, device=device, requires_grad=True), torch.randn(3, 10, device=device)
    loss = tl_.kl_div_with_logits(s, t)
    (gs,) = torch.autograd.grad(loss, s)
    assert t.grad is None and gs.shape == s.shape
    torch.testing.assert_close(gs.sum(-1), torch.zeros(3, device=device), rtol=0, atol=1e-6)  # softmax gradients


@pytest.mark.slow
def test_gradcheck_fp64(backend, device):
    x = _logprobs((3, 5), device).double().requires_grad_()
    y = _logprobs((3, 5), device).double().requires_grad_()
    labels = torch.tensor([1, -100, 2], device=device)
    for beta in (0.0, 0.3, 1.0):
        assert torch.autograd.gradcheck(lambda a, b: tl_.jsd(a, b, beta=beta, labels=labels), (x, y))  # noqa: B023
    assert torch.autograd.gradcheck(lambda a, b: tl_.kl_div_with_logits(a, b, temperature=1.7, reduction="sum"), (x, y))


def _r(*shape, device, dtype=torch.float32):
    return torch.randn(shape, device=device, dtype=dtype)


def _jsd34(d, **kw):
    return tl_.jsd(_r(3, 4, device=d), _r(3, 4, device=d), **kw)


def _kd34(d, **kw):
    return tl_.kl_div_with_logits(_r(3, 4, device=d), _r(3, 4, device=d), **kw)


ERRORS = [
    (lambda d: tl_.jsd(_r(3, 4, device=d), _r(3, 5, device=d)), ValueError, "same shape"),
    (lambda d: tl_.jsd([[0.0, 0.0]], _r(1, 2, device=d)), TypeError, "input must be a tensor, got list"),
    (lambda d: tl_.kl_div_with_logits(_r(1, 2, device=d), [[0.0, 0.0]]), TypeError, "teacher_logits must be a tensor"),
    (lambda d: tl_.jsd(_r(3, 4, device=d), _r(3, 4, device=d, dtype=torch.float64)), TypeError, "dtype"),
    (lambda d: tl_.jsd(_r(device=d), _r(device=d)), ValueError, "non-empty last"),
    (lambda d: tl_.jsd(_r(3, 0, device=d), _r(3, 0, device=d)), ValueError, "non-empty last"),
    (lambda d: _jsd34(d, beta=1.5), ValueError, "beta"),
    (lambda d: _jsd34(d, reduction="avg"), ValueError, "avg is not a valid value for reduction"),
    (lambda d: _jsd34(d, labels=torch.zeros(4, device=d, dtype=torch.long)), ValueError, "labels must have shape"),
    (lambda d: _jsd34(d, labels=torch.zeros(3, device=d)), TypeError, "integer"),
    (lambda d: tl_.jsd(torch.ones(3, 4, dtype=torch.long, device=d), torch.ones(3, 4, dtype=torch.long, device=d)),
     TypeError, "floating"),
    (lambda d: _kd34(d, temperature=0.0), ValueError, "temperature"),
    (lambda d: tl_.kl_div_with_logits(_r(3, 4, device=d), _r(2, 4, device=d)), ValueError, "same shape"),
    (lambda d: _kd34(d, reduction="avg"), ValueError, "avg"),
]  # fmt: skip


@pytest.mark.parametrize("case", range(len(ERRORS)))
def test_invalid_calls_raise_before_any_kernel(backend, device, case):
    call, exc, match = ERRORS[case]
    with pytest.raises(exc, match=match):
        call(device)


def test_modules(backend, device):
    m = tl_.nn.JSDLoss(beta=0.3, ignore_index=-1, reduction="sum")
    assert repr(m) == "JSDLoss(beta=0.3, ignore_index=-1, reduction='sum')" and not list(m.state_dict())
    x, y, labels = _logprobs((4, 9), device), _logprobs((4, 9), device), _labels((4, 9), device, -1)
    torch.testing.assert_close(
        m(x, y, labels), tl_.jsd(x, y, beta=0.3, ignore_index=-1, labels=labels, reduction="sum")
    )
    k = tl_.nn.KLDivWithLogitsLoss(temperature=2.0)
    assert "temperature=2.0" in repr(k) and k.reduction == "batchmean" and k.ignore_index == -100
    torch.testing.assert_close(k(x, y), tl_.kl_div_with_logits(x, y, temperature=2.0))
    assert math.isfinite(k(x, y, labels).item())


@pytest.mark.gpu
def test_kl_div_with_logits_uses_no_extra_vocabulary_sized_memory(device):
    """V = 128256, bf16: fwd + bwd allocate the student gradient and O(N) statistics, nothing N x V else."""
    N, V = 256, 128256
    s = torch.randn(N, V, device=device, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(N, V, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    (g,) = torch.autograd.grad(tl_.kl_div_with_logits(s, t), s)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert g.shape == s.shape
    assert extra <= N * V * 2 + (4 << 20), extra  # the bf16 gradient + small per-row buffers


# ---- second derivatives -------------------------------------------------------------------------


@pytest.mark.slow
def test_gradgradcheck_fp64(backend, device):
    x = _logprobs((3, 4), device).double().requires_grad_()
    y = _logprobs((3, 4), device).double().requires_grad_()
    labels = torch.tensor([1, -100, 2], device=device)
    for beta in (0.0, 0.3, 1.0):
        fn = functools.partial(tl_.jsd, beta=beta, labels=labels)
        assert torch.autograd.gradgradcheck(fn, (x, y))
    fn = functools.partial(tl_.kl_div_with_logits, temperature=1.7, labels=labels, reduction="none")
    assert torch.autograd.gradgradcheck(fn, (x, y))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_double_backward_matches_the_fp64_formulas(backend, device, reduction):
    """Second derivatives equal those of the documented formulas written in torch ops (autograd twice)."""
    x = _logprobs((4, 6), device).double().requires_grad_()
    y = _logprobs((4, 6), device).double().requires_grad_()
    labels = torch.tensor([1, -100, 2, 0], device=device)
    up = torch.randn(4, 6, dtype=torch.float64, device=device)
    up_rows = torch.randn(4, dtype=torch.float64, device=device)

    def second(fn):
        out = fn(x, y, labels=labels, reduction=reduction)
        out = (out * up_rows).sum() if reduction == "none" else out
        gx, gy = torch.autograd.grad(out, (x, y), create_graph=True)
        return torch.autograd.grad((gx * up).sum() + (gy * up.flip(0)).sum(), (x, y))

    cases = [
        (functools.partial(tl_.jsd, beta=0.3), functools.partial(jsd_reference, beta=0.3)),
        (functools.partial(tl_.jsd, beta=0.0), functools.partial(jsd_reference, beta=0.0)),
        (functools.partial(tl_.jsd, beta=1.0), functools.partial(jsd_reference, beta=1.0)),
        (functools.partial(tl_.kl_div_with_logits, temperature=2.0), functools.partial(kd_reference, temperature=2.0)),
    ]
    for ours, ref in cases:
        for a, b in zip(second(ours), second(ref)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ---- rows that do not start 16-byte aligned: the split kernels -----------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "dtype,shape",
    [
        (torch.float64, (5, 1031)),
        (torch.float32, (2, 3, 2051)),
        (torch.float32, (5, 9001)),
        (torch.bfloat16, (9, 4099)),
    ],
    ids=str,
)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_unaligned_rows_split_for_16_byte_accesses(monkeypatch, dtype, shape, reduction):
    """With the aligned split on (``_common.row_align``; off under the interpreter by default): rows starting
    at every offset modulo 16 bytes, no whole tile (2051 fp32 in tiles of 4096), one (4099 bf16), several
    (9001); the fused forward gradient ('batchmean') and the backward kernels ('none', random upstream);
    zero probabilities in the first and last columns; labels masking rows."""
    pytest.importorskip("triton")
    from triton_losses.kernels import _common
    from triton_losses.kernels import distill as k

    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "triton")
    monkeypatch.setattr(_common, "ALIGN_IN_INTERPRETER", True)
    seen = []
    monkeypatch.setattr(k, "row_align", lambda *a: seen.append(_common.row_align(*a)) or seen[-1])
    torch.manual_seed(shape[-1])
    x, y = _logprobs(shape, "cpu"), _logprobs(shape, "cpu")
    x[..., 1, 0] = y[..., 2 % shape[-2], -1] = -1e4  # probability 0 (torch's -inf gradients are NaN)
    labels = _labels(shape, "cpu", -1)
    tensors = {"input": x, "target": y, "labels": labels}
    for beta in (0.0, 0.4, 1.0):
        check_against_fp64(
            functools.partial(tl_.jsd, beta=beta, ignore_index=-1, reduction=reduction),
            functools.partial(jsd_reference, beta=beta, ignore_index=-1, reduction=reduction),
            tensors, ("input", "target"), dtype,
        )  # fmt: skip
    s, t = torch.randn(shape) * 3, torch.randn(shape) * 3
    s[..., 0, -1] = t[..., 1, 0] = -1e4
    check_against_fp64(
        lambda **t: tl_.kl_div_with_logits(**t, temperature=1.7, reduction=reduction),
        lambda **t: kd_reference(**t, temperature=1.7, reduction=reduction),
        {"student_logits": s, "teacher_logits": t, "labels": _labels(shape, "cpu")},
        ("student_logits", "teacher_logits"), dtype,
    )  # fmt: skip
    assert seen and set(seen) == {16 // x.new_empty(0, dtype=dtype).element_size()}, seen


@pytest.mark.interpreter
@pytest.mark.parametrize("align", [False, True], ids=["plain", "aligned-split"])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_dropped_rows_cost_nothing_whatever_they_hold(monkeypatch, align, reduction):
    """Rows the labels drop are skipped by the kernels (loads masked off, whole tiles not visited, zeros
    stored): NaN / inf there change nothing, their loss and gradients are exactly 0, the kept rows' results
    are bit-identical, in the fused forward gradient and the backward kernels, one-row programs of several
    tiles (V = 9001 fp32) with and without the aligned split."""
    from triton_losses.kernels import _common

    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "triton")
    monkeypatch.setattr(_common, "ALIGN_IN_INTERPRETER", align)
    torch.manual_seed(3)
    shape = (4, 9001)
    labels = torch.tensor([5, -100, 7, -100])
    runs = [
        (tl_.jsd, _logprobs(shape, "cpu"), _logprobs(shape, "cpu"), {"beta": 0.3}),
        (tl_.kl_div_with_logits, torch.randn(shape) * 3, torch.randn(shape) * 3, {"temperature": 1.5}),
    ]
    for fn, a, b, kw in runs:
        poisoned_a, poisoned_b = a.clone(), b.clone()
        poisoned_a[1], poisoned_b[3] = float("nan"), float("inf")
        results = []
        for x, y in ((a, b), (poisoned_a, poisoned_b)):
            x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
            out = fn(x, y, labels=labels, reduction=reduction, **kw)
            up = torch.linspace(0.5, 2.0, 4) if reduction == "none" else None
            results.append((out.detach(), *torch.autograd.grad(out, (x, y), up)))
        for clean, poisoned in zip(*results):
            assert torch.equal(clean, poisoned)
        _, gx, gy = results[1]
        assert gx[1::2].eq(0).all() and gy[1::2].eq(0).all()
        if reduction == "none":
            assert results[1][0][1::2].eq(0).all()


def test_row_align_needs_every_row_at_the_same_offsets():
    """The distillation launches split only when both inputs and the gradients share their strides."""
    from triton_losses.kernels import _common

    rows = lambda t: t.transpose(1, 2)
    a = torch.empty(1, 8, 50257, dtype=torch.bfloat16, device="meta")
    assert _common.row_align(rows(a), 1, rows(a), rows(a)) == 8
    shifted = torch.empty(2, 9, 50257, dtype=torch.bfloat16, device="meta")[:, :-1]  # rows at other offsets
    assert _common.row_align(rows(shifted), 1, rows(shifted)) == 8
    assert _common.row_align(rows(shifted), 1, rows(torch.empty(2, 8, 50257, device="meta"))) == 1
    assert _common.row_align(rows(torch.empty(2, 8, 4096, dtype=torch.bfloat16, device="meta")), 1) == 1


# ---- no host work per launch; strided labels ----------------------------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("fn", ["jsd", "kl_div_with_logits"])
def test_no_host_to_device_copy_or_sync_per_call(device, fn, monkeypatch):
    """The Triton path passes its scalars (beta, 1 / T) as kernel arguments: no tensor is built from
    host data and nothing is read back, forward or backward (CUDA-graph capturable)."""
    from triton_losses.kernels import distill as k_distill

    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "triton")
    x = _logprobs((5, 40), device).requires_grad_()
    y = _logprobs((5, 40), device)
    labels = _labels((5, 40), device)
    kw = {"beta": 0.3} if fn == "jsd" else {"temperature": 1.7}
    out = []
    for reduction in ("batchmean", "none"):
        ops, launches = count_ops(
            lambda: out.append(getattr(tl_, fn)(x, y, labels=labels, reduction=reduction, **kw)),  # noqa: B023
            [(k_distill, "launch_rows")],
            monkeypatch,
        )
        assert launches["launch_rows"] == 1 and not HOST_SYNCS & set(ops), ops
        backward = functools.partial(torch.autograd.grad, out[-1], x, torch.ones_like(out[-1]))
        ops, launches = count_ops(backward, [(k_distill, "launch_rows")], monkeypatch)
        assert not HOST_SYNCS & set(ops), ops


def test_strided_and_stride0_labels(backend, device):
    x, y = _logprobs((4, 3, 9), device), _logprobs((4, 3, 9), device)
    wide = torch.tensor([[1, 5, -100, 7, 2, 8], [-100, 1, 3, 4, 5, 6], [0, 0, 1, 1, -100, 2], [3, 3, 3, 3, 3, 3]])
    cases = [
        wide.to(device)[:, ::2],  # stride 2
        torch.tensor([1, -100, 2], device=device).expand(4, 3),  # stride 0 over rows
        torch.tensor([[-100], [1], [2], [-100]], device=device).expand(4, 3),  # stride 0 over columns
        wide.to(device).t()[:3].t().to(torch.int32),  # transposed, int32
    ]
    for lab in cases:
        for fn, kw in ((tl_.jsd, {"beta": 0.3}), (tl_.kl_div_with_logits, {"temperature": 2.0})):
            a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
            got = fn(a, y, labels=lab, reduction="none", **kw)
            want = fn(b, y, labels=lab.contiguous(), reduction="none", **kw)
            torch.testing.assert_close(got, want)
            up = torch.randn_like(got)
            torch.testing.assert_close(torch.autograd.grad(got, a, up)[0], torch.autograd.grad(want, b, up)[0])


# ---- custom ops, torch.compile ---------------------------------------------------------------------


@pytest.mark.interpreter
def test_custom_ops_pass_opcheck(device):
    pytest.importorskip("triton")
    from triton_losses.kernels import distill as k_distill

    x, y = torch.randn(3, 4, device=device), torch.rand(3, 4, device=device)
    a3, b3 = x.log_softmax(1).view(1, 3, 4), y.log_softmax(1).view(1, 3, 4)
    labels = torch.tensor([[0, -100, 2]], device=device)
    gscale = torch.full((1,), 0.5, device=device)
    torch.library.opcheck(k_distill._jsd_fwd_op, (a3, b3, labels, 0.3, -100))
    torch.library.opcheck(k_distill._jsd_bwd_op, (a3, b3, None, 0.0, -100, gscale, True, True))
    stats = k_distill._kd_fwd_op(a3, b3, labels, 0.5, -100)
    torch.library.opcheck(k_distill._kd_fwd_op, (a3, b3, labels, 0.5, -100))
    torch.library.opcheck(k_distill._kd_bwd_op, (a3, b3, labels, 0.5, -100, stats, gscale, True, False))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
def test_fullgraph_compile_matches_eager(backend, device):
    torch._dynamo.reset()
    lp = torch.randn(4, 5, device=device).log_softmax(1).requires_grad_()
    s = torch.randn(4, 5, device=device, requires_grad=True)
    labels = torch.tensor([1, -100, 3, 0], device=device)

    def losses(lp, s, labels):
        d = tl_.jsd(lp, lp.detach().flip(0), beta=0.3, labels=labels)
        return d + tl_.kl_div_with_logits(s, s.detach() * 2, temperature=2.0, labels=labels, reduction="none").sum()

    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager" if backend == "triton" else "inductor")
    out = compiled(lp, s, labels)
    d = jsd_reference(lp, lp.detach().flip(0), 0.3, labels=labels)
    ref = d + kd_reference(s, s.detach() * 2, 2.0, labels=labels, reduction="none").sum()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(torch.autograd.grad(out, (lp, s)), torch.autograd.grad(ref, (lp, s))):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
