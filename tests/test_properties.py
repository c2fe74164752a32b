"""Property-based checks (hypothesis) and huge rows: invariants that must hold for any input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import triton_losses as tl_
from tests.ce_reference import ref_cross_entropy

SETTINGS = settings(
    max_examples=25, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)  # fmt: skip


@st.composite
def ce_case(draw):
    n = draw(st.integers(0, 6))
    c = draw(st.integers(1, 70))
    spatial = draw(st.sampled_from([(), (3,), (2, 2)]))
    seed = draw(st.integers(0, 2**31 - 1))
    smoothing = draw(st.sampled_from([0.0, 0.1, 1.0]))
    ignore = draw(st.sampled_from([-100, 0]))
    weighted = draw(st.booleans())
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    return n, c, spatial, seed, smoothing, ignore, weighted, reduction


@SETTINGS
@given(case=ce_case())
def test_cross_entropy_equals_fp64_torch_for_any_shape(backend, device, case):
    n, c, spatial, seed, smoothing, ignore, weighted, reduction = case
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((n, c, *spatial), generator=g) * 4).to(device)
    t = torch.randint(0, c, (n, *spatial), generator=g).to(device)
    w = (torch.rand(c, generator=g) + 0.1).to(device) if weighted else None
    kw = dict(weight=w, ignore_index=ignore, label_smoothing=smoothing, reduction=reduction)
    ours = tl_.cross_entropy(x, t, **kw)
    kw64 = dict(kw, weight=None if w is None else w.double())
    ref = F.cross_entropy(x.double(), t, **kw64)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5, equal_nan=True)


@SETTINGS
@given(n=st.integers(1, 5), c=st.integers(2, 40), seed=st.integers(0, 2**31 - 1), shift=st.floats(-1e3, 1e3))
def test_shift_invariance_and_zero_gradient_sums(backend, device, n, c, seed, shift):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=torch.float64).to(device).requires_grad_()
    t = torch.randint(0, c, (n,), generator=g).to(device)
    loss = tl_.cross_entropy(x, t, reduction="none")
    torch.testing.assert_close(loss, tl_.cross_entropy(x.detach() + shift, t, reduction="none"), rtol=1e-9, atol=1e-9)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    torch.testing.assert_close(grad.sum(1), torch.zeros(n, dtype=torch.float64, device=device), rtol=0, atol=1e-12)


@SETTINGS
@given(n=st.integers(1, 6), c=st.integers(1, 30), seed=st.integers(0, 2**31 - 1))
def test_ignoring_rows_equals_deleting_them(backend, device, n, c, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g).to(device)
    t = torch.randint(0, c, (n,), generator=g).to(device)
    drop = torch.rand(n, generator=g).to(device) < 0.5
    t_ignored = torch.where(drop, torch.full_like(t, -100), t)
    torch.testing.assert_close(
        tl_.cross_entropy(x, t_ignored, reduction="sum"), tl_.cross_entropy(x[~drop], t[~drop], reduction="sum")
    )


@pytest.mark.parametrize("V", [262144, pytest.param(1_000_000, marks=pytest.mark.slow)])
def test_huge_vocabulary_rows(backend, device, V):
    x = torch.randn(2, V, device=device) * 3
    t = torch.tensor([5, V - 1], device=device)
    xs = x.clone().requires_grad_()
    ours = tl_.cross_entropy(xs, t, reduction="none", label_smoothing=0.1)
    x64 = x.double().requires_grad_()
    ref = ref_cross_entropy(x64, t, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-4)
    up = torch.tensor([0.7, -1.3], device=device)
    (g,) = torch.autograd.grad(ours, xs, up)
    (gr,) = torch.autograd.grad(ref, x64, up.double())
    torch.testing.assert_close(g.double(), gr, rtol=1e-4, atol=1e-7)
