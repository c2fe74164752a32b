"""Cross-entropy over rows that do not start 16-byte aligned (odd vocabularies such as 50257).

With ``ALIGN > 1`` (``kernels._common.row_align``) the row kernels split each one-row program's row
into a masked head up to the first 16-byte boundary, whole tiles with no mask, an aligned rest masked
in 16-byte units and the last few columns (``aligned_split``), so the compiled loop can use 128-bit
accesses (the AOT tier checks the SASS at V = 50257). Here: the rule, and every split against the fp64
oracle: heads of every length, no whole tile, several, in the forward with the fused gradient, the
persistent variant and the backward kernel.
"""

from __future__ import annotations

import pytest
import torch

import triton_losses as tl_
from tests.ce_reference import ref_cross_entropy
from tests.helpers import budget_close

pytest.importorskip("triton")
from triton_losses.kernels import _common
from triton_losses.kernels import cross_entropy as k


@pytest.fixture(autouse=True)
def _align_under_the_interpreter(monkeypatch):
    """The split is what these tests check: on for CPU tensors too (off there by default)."""
    monkeypatch.setattr(_common, "ALIGN_IN_INTERPRETER", True)


def _meta(shape, dtype=torch.bfloat16, stride=None):
    x = torch.empty(shape, dtype=dtype, device="meta")
    return x if stride is None else x.as_strided(shape, stride)


def test_row_align_rule(monkeypatch):
    odd = _meta((8, 50257, 1))
    assert _common.row_align(odd, 1) == 8
    assert _common.row_align(_meta((8, 50257, 1), torch.float32), 1) == 4
    assert _common.row_align(_meta((8, 50257, 1), torch.float64), 1) == 2
    assert _common.row_align(odd, 1, odd) == 8  # a gradient at the logits' offsets
    assert _common.row_align(odd, 2) == 1  # programs of several rows: each row aligned differently
    assert _common.row_align(_meta((8, 128256, 1)), 1) == 1  # aligned rows: the plain loop vectorises
    padded = _meta((8, 50257, 1), stride=(50264, 1, 1))  # aligned starts, odd length
    assert _common.row_align(padded, 1) == 8
    assert _common.row_align(padded, 1, _meta((8, 50257, 1))) == 1  # gradient rows at other offsets
    assert _common.row_align(_meta((8, 5000, 3), stride=(15000, 3, 1)), 1) == 1  # K-dim: classes strided
    monkeypatch.setattr(_common, "ALIGN_IN_INTERPRETER", False)
    assert _common.row_align(torch.empty(2, 50257, 1), 1) == 1  # the interpreter: the plain loop by default
    assert _common.row_align(odd, 1) == 8


OPTIONS = [
    dict(),
    dict(weight=True, label_smoothing=0.1, ignore_index=3),
    dict(z_loss=1e-3, softcap=15.0, reduction="sum"),
    dict(prob=True, label_smoothing=0.2, weight=True),
    dict(reduction="none"),
    dict(reduction="none", prob=True, softcap=10.0),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("variant", ["rows", pytest.param("persistent", marks=pytest.mark.slow)])
@pytest.mark.parametrize("opts", OPTIONS, ids=["plain", "weight-smooth-ignore", "z-cap-sum", "prob", "none",
                                               "none-prob-cap"])  # fmt: skip
@pytest.mark.parametrize(
    ("dtype", "C"),
    [(torch.float32, 1030), (torch.float32, 4099), (torch.bfloat16, 9001), (torch.bfloat16, 2051)],
)
def test_unaligned_rows_match_the_oracle(monkeypatch, device, variant, opts, dtype, C):
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "triton")
    monkeypatch.setenv(k.VARIANT_ENV, variant)
    seen = []
    real = k.row_align
    monkeypatch.setattr(k, "row_align", lambda *a: seen.append(real(*a)) or seen[-1])
    opts = dict(opts)
    prob = opts.pop("prob", False)
    g = torch.Generator().manual_seed(C)
    N = 11  # row r starts at r * C: every misalignment (head length) occurs
    weight = (torch.rand(C, generator=g) + 0.5).to(device, dtype) if opts.pop("weight", False) else None
    x = (torch.randn(N, C, generator=g) * 3).to(device, dtype).requires_grad_()
    if prob:
        t = torch.softmax(torch.randn(N, C, generator=g), 1).to(device, dtype)
    else:
        t = torch.randint(0, C, (N,), generator=g).to(device)
        t[1] = opts.get("ignore_index", -100)
    loss = tl_.cross_entropy(x, t, weight=weight, **opts)
    up = torch.randn(loss.shape, generator=g).to(device, loss.dtype) if loss.dim() else None
    (grad,) = torch.autograd.grad(loss, x, up)
    assert seen and all(a == 16 // x.element_size() for a in seen), seen
    x64 = x.detach().double().requires_grad_()
    t64 = t.double() if prob else t
    w64 = None if weight is None else weight.double()
    ref = ref_cross_entropy(x64, t64, w64, **opts)
    (gref,) = torch.autograd.grad(ref, x64, None if up is None else up.double())
    budget_close(loss.detach(), ref.detach())
    budget_close(grad, gref)


@pytest.mark.interpreter
@pytest.mark.parametrize("prob", [False, True])
def test_unaligned_slice_partial_sums(monkeypatch, device, prob):
    """The vocabulary-parallel partial sums over an odd, wide slice (``ALIGN`` path) match the reference."""
    from triton_losses.options import CESpec
    from triton_losses.reference import cross_entropy as ref_engine

    seen = []
    real = k.row_align
    monkeypatch.setattr(k, "row_align", lambda *a: seen.append(real(*a)) or seen[-1])
    g = torch.Generator().manual_seed(9)
    C, lo, total = 2051, 1000, 5000
    x = (torch.randn(7, C, 1, generator=g) * 3).to(device)
    w = (torch.rand(total, generator=g) + 0.5).to(device)
    t = torch.softmax(torch.randn(7, C, 1, generator=g), 1).to(device) if prob else torch.randint(900, 3200, (7, 1))
    spec = CESpec(w, None, smoothing=0.1, softcap=8.0, prob_target=prob, class_offset=lo, num_classes=total)
    got = k.ce_partial(x, t.to(device), spec)
    assert seen == [4]
    torch.testing.assert_close(got, ref_engine.ce_partial(x, t.to(device), spec), rtol=2e-5, atol=2e-4)


@pytest.mark.interpreter
@pytest.mark.parametrize("variant", ["rows", "two_pass"])
def test_unaligned_kdim_rows_with_contiguous_classes(monkeypatch, device, variant):
    """K-dim logits ``(N, C, d)`` whose classes are contiguous (a permuted ``(N, d, C)`` tensor): rows of
    ``(A, C, B)`` with ``B > 1`` take the split where the launch allows it (row offsets from both row
    strides); loss and gradient match the oracle."""
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "triton")
    monkeypatch.setenv(k.VARIANT_ENV, variant)
    seen = []
    real = k.row_align
    monkeypatch.setattr(k, "row_align", lambda *a: seen.append(real(*a)) or seen[-1])
    g = torch.Generator().manual_seed(5)
    N, d, C = 3, 4, 2051
    x = (torch.randn(N, d, C, generator=g) * 3).to(device).permute(0, 2, 1).requires_grad_()
    t = torch.randint(0, C, (N, d), generator=g).to(device)
    t[1, 2] = -100
    for reduction in ("mean", "none"):
        loss = tl_.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1)
        up = torch.randn(loss.shape, generator=g).to(device) if loss.dim() else None
        (grad,) = torch.autograd.grad(loss, x, up)
        x64 = x.detach().double().requires_grad_()
        ref = ref_cross_entropy(x64, t, None, reduction=reduction, label_smoothing=0.1)
        (gref,) = torch.autograd.grad(ref, x64, None if up is None else up.double())
        budget_close(loss.detach(), ref.detach())
        budget_close(grad, gref)
    assert 4 in seen, seen  # at least the launches reading only the logits split
