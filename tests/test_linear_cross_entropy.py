"""linear_cross_entropy against ``cross_entropy(linear(...))`` in fp64, on both backends.

Shapes stay tiny (the Triton backend runs in the interpreter here): a handful of rows, odd
vocabularies, and chunk sizes that do not divide the number of rows.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import triton_losses as tl_
from tests.ce_reference import ref_cross_entropy
from tests.helpers import budget_close, device_assert, same_error
from triton_losses import _linear_ce_chunks as chunks

# the module itself: the package's attribute of that name is the function
lce = importlib.import_module("triton_losses.linear_cross_entropy")

REDUCTIONS = ["none", "mean", "sum"]

OPTIONS = [
    {},
    {"bias": True},
    {"weight": True},
    {"ignore_index": 3},
    {"label_smoothing": 0.2},
    {"z_loss": 1e-2},
    {"softcap": 2.5},
    {"bias": True, "weight": True, "ignore_index": -100, "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 4.0},
]


def _ref(x, w, t, b=None, reduction="mean", **kw):
    """fp64 oracle: ``cross_entropy`` of ``linear(x, w, b)`` with the classes last."""
    logits = F.linear(x.double(), w.double(), None if b is None else b.double())
    V = logits.shape[-1]
    prob = t.shape == logits.shape
    if "weight" in kw and kw["weight"] is not None:
        kw = dict(kw, weight=kw["weight"].double())
    flat_t = t.reshape(-1, V).double() if prob else t.reshape(-1)
    out = ref_cross_entropy(logits.reshape(-1, V), flat_t, reduction=reduction, **kw)
    return out.reshape(logits.shape[:-1]) if reduction == "none" else out


def _operands(N, H, V, device, dtype=torch.float32, bias=False, scale=1.0):
    x = (torch.randn(N, H, device=device) * scale).to(dtype).requires_grad_()
    w = (torch.randn(V, H, device=device) * scale / H**0.5 * 3).to(dtype).requires_grad_()
    b = (torch.randn(V, device=device)).to(dtype).requires_grad_() if bias else None
    return x, w, b


def _targets(shape, V, device, ignore_index=None, frac=0.3):
    t = torch.randint(0, V, shape, device=device)
    if ignore_index is not None:
        t = torch.where(torch.rand(shape, device=device) < frac, torch.full_like(t, ignore_index), t)
    return t


def _kw(opts, V, device, dtype=torch.float32):
    kw = {k: v for k, v in opts.items() if k != "bias"}
    if kw.pop("weight", False):
        kw["weight"] = (torch.rand(V, device=device) + 0.2).to(dtype)
    return kw


def _grads(loss, inputs, up):
    inputs = [v for v in inputs if v is not None]
    return torch.autograd.grad(loss, inputs, up)


def _upstream(ref, device):
    if ref.dim():
        return torch.randn(ref.shape, dtype=torch.float64, device=device)
    return torch.tensor(1.7, dtype=torch.float64, device=device)  # an upstream gradient != 1


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_matches_fp64(backend, device, opts, reduction):
    N, H, V = 11, 6, 37
    x, w, b = _operands(N, H, V, device, bias=opts.get("bias", False))
    kw = _kw(opts, V, device)
    t = _targets((N,), V, device, kw.get("ignore_index"))
    ours = tl_.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, chunk_size=4, **kw)
    ref = _ref(x, w, t, b, reduction=reduction, **kw)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    budget_close(ours, ref)
    up = _upstream(ref, device)
    ops64 = [v.detach().double().requires_grad_() if v is not None else None for v in (x, w, b)]
    ref64 = _ref(*ops64[:2], t, ops64[2], reduction=reduction, **kw)
    for g, r in zip(_grads(ours, (x, w, b), up.float()), _grads(ref64, ops64, up)):
        assert g.dtype == torch.float32
        budget_close(g, r)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fp64_is_exact(backend, device, reduction):
    N, H, V = 9, 5, 23
    x, w, b = _operands(N, H, V, device, dtype=torch.float64, bias=True)
    wt = torch.rand(V, device=device, dtype=torch.float64)
    t = _targets((N,), V, device, 2)
    kw = dict(weight=wt, ignore_index=2, label_smoothing=0.25, z_loss=1e-3, softcap=3.0)
    ours = tl_.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, chunk_size=2, **kw)
    ref = _ref(x, w, t, b, reduction=reduction, **kw)
    up = _upstream(ref, device)
    # The Triton launchers pass float options (smoothing, softcap) as fp32 scalars: 1e-7 relative.
    torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-9)
    for g, r in zip(_grads(ours, (x, w, b), up), _grads(ref, (x, w, b), up)):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(
    "xshape", [(6,), (2, 3, 6), (2, 1, 2, 6), (0, 6), (3, 0, 6)], ids=["unbatched", "3d", "4d", "empty", "empty-3d"]
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_batch_shapes(backend, device, xshape, reduction):
    H, V = xshape[-1], 13
    x = torch.randn(xshape, device=device, requires_grad=True)
    w = torch.randn(V, H, device=device, requires_grad=True)
    t = _targets(xshape[:-1], V, device, -100)
    ours = tl_.linear_cross_entropy(x, w, t, reduction=reduction, chunk_size=2)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = _ref(xr, wr, t, reduction=reduction)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours.double(), ref, equal_nan=True, rtol=1e-5, atol=1e-6)
    up = torch.rand(ref.shape, dtype=torch.float64, device=device) + 0.5
    for g, r in zip(_grads(ours, (x, w), up.float()), _grads(ref, (xr, wr), up)):
        assert g.shape == r.shape
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 10, 64])
def test_chunk_boundaries_and_ignored_runs(backend, device, chunk):
    """Rows 2..7 ignored: whole chunks of ignored rows, and chunk sizes that do not divide the rest."""
    N, H, V = 10, 4, 19
    x, w, b = _operands(N, H, V, device, bias=True)
    t = _targets((N,), V, device)
    t[2:8] = -100
    for reduction in REDUCTIONS:
        ours = tl_.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, chunk_size=chunk)
        ops64 = [v.detach().double().requires_grad_() for v in (x, w, b)]
        ref = _ref(*ops64[:2], t, ops64[2], reduction=reduction)
        budget_close(ours, ref.detach())
        up = _upstream(ref, device)
        grads = _grads(ours, (x, w, b), up.float())
        for g, r in zip(grads, _grads(ref, ops64, up)):
            budget_close(g, r)
        assert torch.equal(grads[0][2:8], torch.zeros_like(grads[0][2:8]))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_targets_ignored(backend, device, reduction):
    x, w, b = _operands(5, 3, 7, device, bias=True)
    t = torch.full((5,), 4, device=device)
    for kw in [{}, {"weight": torch.rand(7, device=device)}, {"label_smoothing": 0.3}]:
        ours = tl_.linear_cross_entropy(x, w, t, linear_bias=b, ignore_index=4, reduction=reduction, **kw)
        ref = F.cross_entropy(F.linear(x, w, b), t, ignore_index=4, reduction=reduction, **kw)
        torch.testing.assert_close(ours, ref, equal_nan=True)
        assert reduction != "mean" or ours.isnan()
        for g, r in zip(_grads(ours.sum(), (x, w, b), None), _grads(ref.sum(), (x, w, b), None)):
            torch.testing.assert_close(g, r, equal_nan=True)
            assert torch.equal(g, torch.zeros_like(g))


class _OpLog(TorchDispatchMode):
    """Records every aten op and the shapes of its tensor outputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else [out]
        shapes = [tuple(o.shape) for o in flat if isinstance(o, torch.Tensor)]
        self.calls.append((func.overloadpacket.__name__, shapes))
        return out


def test_ignored_rows_cost_no_matmul_work(backend, device):
    N, H, V, chunk = 24, 4, 29, 5
    x, w, b = _operands(N, H, V, device, bias=True)
    t = _targets((N,), V, device)
    t[3:17] = -100  # 14 ignored rows, 10 live
    with _OpLog() as log:
        loss = tl_.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=chunk)
        loss.backward()
    logits_rows = [s[0][0] for name, s in log.calls if name in ("mm", "addmm") and s and s[0][1:] == (V,)]
    assert sum(logits_rows) == 10 and max(logits_rows) <= chunk, logits_rows
    input_grad_rows = [s[0][0] for name, s in log.calls if name == "mm" and s and s[0] == (s[0][0], H)]
    assert sum(input_grad_rows) == 10, input_grad_rows


def test_without_host_sync_every_row_is_computed(backend, device, monkeypatch):
    """Where the target check does not run (CUDA by default, tracing) nothing is compacted and nothing syncs."""
    monkeypatch.setattr(lce, "eager_checks", lambda device: False)
    N, H, V = 9, 3, 11
    x, w, b = _operands(N, H, V, device, bias=True)
    t = _targets((N,), V, device, -100, frac=0.5)
    t[0] = -100
    with _OpLog() as log:
        ours = tl_.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=4)
    assert sum(s[0][0] for name, s in log.calls if name in ("mm", "addmm") and s and s[0][1:] == (V,)) == N
    ops64 = [v.detach().double().requires_grad_() for v in (x, w, b)]
    ref = _ref(*ops64[:2], t, ops64[2])
    budget_close(ours, ref.detach())
    for g, r in zip(_grads(ours, (x, w, b), None), _grads(ref, ops64, None)):
        budget_close(g, r)
    if device == "cpu":  # on CUDA the device assert would end the process (test_device_asserts.py: in a subprocess)
        t[4] = V + 3  # out of range: the kernels' device assert (as torch's CUDA kernels'); the reference gives NaN
        if backend == "triton":
            with device_assert("target out of bounds"):
                tl_.linear_cross_entropy(x, w, t, linear_bias=b)
        else:
            assert tl_.linear_cross_entropy(x, w, t, linear_bias=b).isnan()


class _HostReads:
    """Counts host reads of tensor data: ``.item()``-like conversions (``_local_scalar_dense``) and ``.tolist()``."""

    def __init__(self, monkeypatch):
        self.count = 0
        tolist = torch.Tensor.tolist

        def counted(t):
            self.count += 1
            return tolist(t)

        monkeypatch.setattr(torch.Tensor, "tolist", counted)
        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                outer.count += func.overloadpacket.__name__ == "_local_scalar_dense"
                return func(*args, **(kwargs or {}))

        self.mode = _Mode()


@pytest.mark.interpreter
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_host_reads_only_where_the_target_check_runs(device, monkeypatch, reduction):
    """One host read per eager call while the target check runs (the CPU); none without it (CUDA's default).

    On the kernels (the interpreter here), so the reference's CPU-only ``scale_`` shortcut is not counted.
    """
    if not lce._dispatch.triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "triton")
    x, w, b = _operands(9, 3, 11, device, bias=True)
    t = _targets((9,), 11, device, -100, frac=0.5)
    reads = _HostReads(monkeypatch)
    counts = {}
    for check in (True, False):
        monkeypatch.setattr(lce, "eager_checks", lambda device, check=check: check)
        reads.count = 0
        with reads.mode:
            loss = tl_.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, chunk_size=4)
            loss.backward(torch.ones_like(loss))
        counts[check] = reads.count
    assert counts == {True: 1, False: 0}, counts


def test_target_check_policy(monkeypatch):
    """The eager check (and so the compaction's host read) runs on the CPU always, on CUDA only when asked."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("TRITON_LOSSES_CHECK_TARGETS", raising=False)
    assert lce.eager_checks(cpu) and not lce.eager_checks(cuda)
    monkeypatch.setenv("TRITON_LOSSES_CHECK_TARGETS", "1")
    assert lce.eager_checks(cuda)
    monkeypatch.setattr(lce._dispatch, "tracing", lambda: True)
    assert not lce.eager_checks(cpu) and not lce.eager_checks(cuda)


def test_out_of_range_target_raises_like_torch(backend, device):
    x, w, _ = _operands(4, 3, 6, device)
    for bad in (6, -3):
        t = torch.tensor([0, bad, 2, -100], device=device)
        # torch's error from CPU copies: on CUDA its kernel would raise a device-side assert instead
        assert isinstance(same_error(_composite, tl_.linear_cross_entropy, x, w, t), IndexError)


def test_uint8_targets_do_not_wrap_ignore_index(backend, device):
    """-100 as uint8 is 156: a uint8 target 156 is a real class, not an ignored row."""
    x, w, _ = _operands(6, 3, 200, device)
    t = torch.tensor([156, 3, 199, 156, 0, 7], device=device, dtype=torch.uint8)
    for reduction in REDUCTIONS:
        ours = tl_.linear_cross_entropy(x, w, t, reduction=reduction, chunk_size=4)
        ref = F.cross_entropy(F.linear(x, w), t, reduction=reduction)
        torch.testing.assert_close(ours, ref)
        for g, r in zip(_grads(ours.sum(), (x, w), None), _grads(ref.sum(), (x, w), None)):
            torch.testing.assert_close(g, r)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_low_precision_within_error_budget(backend, device, dtype, reduction):
    """16-bit operands: logits and dlogits in the input dtype, weight/bias gradients summed in fp32."""
    N, H, V = 40, 16, 300
    x, w, b = _operands(N, H, V, device, dtype=dtype, bias=True, scale=1.5)
    kw = dict(weight=(torch.rand(V, device=device) + 0.5).to(dtype), ignore_index=1, label_smoothing=0.1)
    t = _targets((N,), V, device, 1)
    ours = tl_.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, chunk_size=7, **kw)
    ops64 = [v.detach().double().requires_grad_() for v in (x, w, b)]
    ref = _ref(*ops64[:2], t, ops64[2], reduction=reduction, **kw)
    lowp = F.cross_entropy(F.linear(x, w, b), t, reduction=reduction, **kw)  # torch in dtype: the budget
    up = torch.rand(ref.shape, dtype=torch.float64, device=device) + 0.5
    assert ours.dtype == dtype
    budget_close(ours, ref.detach(), lowp)
    g_ours = _grads(ours, (x, w, b), up.to(dtype))
    g_lowp = _grads(lowp, (x, w, b), up.to(dtype))
    for g, r, lp in zip(g_ours, _grads(ref, ops64, up), g_lowp):
        assert g.dtype == dtype
        budget_close(g, r, lp)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cpu_autocast_follows_torchs_composite(backend, device, reduction):
    """In an autocast region torch's ``linear_cross_entropy`` (``options=None``) is ``linear`` (16-bit logits)
    then ``cross_entropy`` (an fp32 loss); with ``options`` its chunked op is not autocast."""
    if device != "cpu":
        pytest.skip("CPU autocast")
    N, H, V = 12, 8, 40
    t = _targets((N,), V, device, None)
    for dtype in (torch.float32, torch.bfloat16):
        x, w, b = _operands(N, H, V, device, dtype=dtype, bias=True, scale=1.5)
        xr, wr, br = (v.detach().clone().requires_grad_() for v in (x, w, b))
        up = torch.rand(() if reduction != "none" else (N,)) + 0.5
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = tl_.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction)
            ref = F.cross_entropy(F.linear(xr, wr, br), t, reduction=reduction)
        assert ours.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        for g, r in zip(_grads(ours, (x, w, b), up), _grads(ref, (xr, wr, br), up)):
            assert g.dtype == r.dtype == dtype
            torch.testing.assert_close(g.float(), r.float(), rtol=2e-2, atol=2e-2)
        if hasattr(torch.nn, "LinearCrossEntropyOptions"):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                plain = tl_.linear_cross_entropy(
                    x, w, t, reduction=reduction, options=torch.nn.LinearCrossEntropyOptions()
                )
            assert plain.dtype == dtype


def test_weight_and_bias_gradients_accumulate_in_fp32(device, monkeypatch):
    """384 identical one-row chunks: a bf16 running sum stalls (ulp(sum) > 2 * term after ~256 terms).

    With an fp32 accumulator the error is that of the bf16 logits and dlogits, as in torch's own bf16
    ``linear`` + ``cross_entropy`` (one GEMM with an fp32 accumulator); summed in bf16 it would be ~25% short.
    The accumulation is the chunk loop's, the same on both backends; the reference runs it (384
    interpreter launches per call took 90 s), ``test_low_precision_within_error_budget`` the kernels.
    """
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "torch")
    N, H, V = 384, 4, 16
    x0 = torch.randn(1, H, device=device)
    x = x0.expand(N, H).to(torch.bfloat16).requires_grad_()
    w = torch.randn(V, H, device=device).to(torch.bfloat16).requires_grad_()
    b = torch.randn(V, device=device).to(torch.bfloat16).requires_grad_()
    t = torch.full((N,), 3, device=device)
    ops64 = [v.detach().double().requires_grad_() for v in (x, w, b)]
    ref = torch.autograd.grad(_ref(*ops64[:2], t, ops64[2], reduction="sum"), ops64[1:])
    lowp = torch.autograd.grad(F.cross_entropy(F.linear(x, w, b), t, reduction="sum"), (w, b))
    for fp32 in (None, True):  # the default keeps an fp32 accumulator this small
        loss = tl_.linear_cross_entropy(x, w, t, linear_bias=b, reduction="sum", chunk_size=1, fp32_weight_grad=fp32)
        for g, r, lp in zip(torch.autograd.grad(loss, (w, b)), ref, lowp):
            budget_close(g, r, lp)
    # fp32_weight_grad=False really sums the weight gradient in bf16: here, ~25% short
    loss = tl_.linear_cross_entropy(x, w, t, linear_bias=b, reduction="sum", chunk_size=1, fp32_weight_grad=False)
    gw, gb = torch.autograd.grad(loss, (w, b))
    budget_close(gb, ref[1], lowp[1])
    short = ((gw.double() - ref[0]).abs() / ref[0].abs()).max()
    assert short > 0.1, short


def test_weight_grad_accumulator_policy(monkeypatch):
    """fp32 accumulator for 16-bit weights while it fits the budget; the weight's dtype beyond it."""
    w16 = torch.empty(1000, 64, dtype=torch.bfloat16)
    assert chunks.weight_grad_dtype(torch.empty(1000, 64), None) == torch.float32
    assert chunks.weight_grad_dtype(torch.empty(10, 4, dtype=torch.float64), False) == torch.float64
    assert chunks.weight_grad_dtype(w16, None) == torch.float32
    assert chunks.weight_grad_dtype(w16, False) == torch.bfloat16
    monkeypatch.setitem(chunks.WGRAD_FP32_BYTES, "cpu", 1000 * 64 * 4 - 1)
    assert chunks.weight_grad_dtype(w16, None) == torch.bfloat16
    assert chunks.weight_grad_dtype(w16, True) == torch.float32
    # the GPU bar shape (bf16, V=128256, H=4096): 2.1 GB of fp32 would not fit the 1 GB bar
    assert chunks.WGRAD_FP32_BYTES["cuda"] < 128256 * 4096 * 4
    with pytest.raises(ValueError, match="fp32_weight_grad"):
        tl_.linear_cross_entropy(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1]), fp32_weight_grad="yes")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_weight_grad_in_its_own_dtype_within_error_budget(backend, device, dtype, reduction):
    """``fp32_weight_grad=False`` with 4 chunks (as the default plans at the GPU bar shape): one
    rounding per chunk stays within the budget of torch's own 16-bit ``linear`` + ``cross_entropy``."""
    N, H, V = 64, 16, 300
    x, w, b = _operands(N, H, V, device, dtype=dtype, bias=True, scale=1.5)
    kw = dict(weight=(torch.rand(V, device=device) + 0.5).to(dtype), ignore_index=1, label_smoothing=0.1)
    t = _targets((N,), V, device, 1)
    ours = tl_.linear_cross_entropy(
        x, w, t, linear_bias=b, reduction=reduction, chunk_size=16, fp32_weight_grad=False, **kw
    )
    ops64 = [v.detach().double().requires_grad_() for v in (x, w, b)]
    ref = _ref(*ops64[:2], t, ops64[2], reduction=reduction, **kw)
    lowp = F.cross_entropy(F.linear(x, w, b), t, reduction=reduction, **kw)  # torch in dtype: the budget
    up = torch.rand(ref.shape, dtype=torch.float64, device=device) + 0.5
    budget_close(ours, ref.detach(), lowp)
    g_lowp = _grads(lowp, (x, w, b), up.to(dtype))
    for g, r, lp in zip(_grads(ours, (x, w, b), up.to(dtype)), _grads(ref, ops64, up), g_lowp):
        assert g.dtype == dtype
        budget_close(g, r, lp)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_probability_targets(backend, device, reduction):
    N, H, V = 7, 4, 17
    x, w, b = _operands(N, H, V, device, bias=True)
    p = torch.rand(N, V, device=device).softmax(-1)
    kw = dict(weight=torch.rand(V, device=device) + 0.1, label_smoothing=0.1, z_loss=1e-2)
    ours = tl_.linear_cross_entropy(x, w, p, linear_bias=b, reduction=reduction, chunk_size=3, **kw)
    ops64 = [v.detach().double().requires_grad_() for v in (x, w, b)]
    ref = _ref(*ops64[:2], p, ops64[2], reduction=reduction, **kw)
    budget_close(ours, ref.detach())
    up = _upstream(ref, device)
    for g, r in zip(_grads(ours, (x, w, b), up.float()), _grads(ref, ops64, up)):
        budget_close(g, r)


def test_only_some_operands_need_grad(backend, device):
    N, H, V = 6, 3, 10
    t = _targets((N,), V, device, -100)
    for need in [(True, False, False), (False, True, False), (False, False, True), (False, False, False)]:
        x, w, b = _operands(N, H, V, device, bias=True)
        for v, n in zip((x, w, b), need):
            v.requires_grad_(n)
        for reduction in REDUCTIONS:
            ours = tl_.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, chunk_size=4)
            ref = F.cross_entropy(F.linear(x, w, b), t, reduction=reduction)
            torch.testing.assert_close(ours, ref)
            if any(need):
                wanted = [v for v, n in zip((x, w, b), need) if n]
                for g, r in zip(torch.autograd.grad(ours.sum(), wanted), torch.autograd.grad(ref.sum(), wanted)):
                    torch.testing.assert_close(g, r)
            else:
                assert not ours.requires_grad
    x, w, b = _operands(N, H, V, device, bias=True)
    with torch.no_grad():
        torch.testing.assert_close(
            tl_.linear_cross_entropy(x, w, t, linear_bias=b), F.cross_entropy(F.linear(x, w, b), t)
        )


def test_retain_graph_and_repeated_backward(backend, device):
    x, w, b = _operands(7, 3, 9, device, bias=True)
    t = _targets((7,), 9, device, -100)
    for reduction in REDUCTIONS:
        loss = tl_.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, chunk_size=3)
        up = torch.rand(loss.shape, device=device) + 0.5
        loss.backward(up, retain_graph=True)
        first = [v.grad.clone() for v in (x, w, b)]
        loss.backward(3 * up)  # the second backward recomputes the chunks
        for v, g in zip((x, w, b), first):
            torch.testing.assert_close(v.grad, 4 * g)
            v.grad = None


def test_inputs_are_not_modified_and_noncontiguous_input(backend, device):
    base = torch.randn(4, 7, 5, device=device)
    x = base.transpose(0, 1).requires_grad_()  # (7, 4, 5), not contiguous
    w = torch.randn(5, 13, device=device).t().requires_grad_()  # (13, 5), not contiguous
    t = _targets((7, 4), 13, device, -100)
    snapshot = (x.detach().clone(), w.detach().clone())
    ours = tl_.linear_cross_entropy(x, w, t, chunk_size=5, label_smoothing=0.1)
    ref = _ref(x.detach().double(), w.detach().double(), t, label_smoothing=0.1)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    ours.backward()
    assert torch.equal(x.detach(), snapshot[0]) and torch.equal(w.detach(), snapshot[1])
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


def test_gradient_accumulation_recipe(backend, device):
    """'sum' per micro-batch divided by the whole batch's token count equals the batch 'mean'."""
    x, w, b = _operands(12, 4, 9, device, bias=True)
    t = _targets((12,), 9, device)
    t[[1, 5, 6, 11]] = -100
    n_tokens = (t != -100).sum()
    for i in range(0, 12, 4):
        loss = tl_.linear_cross_entropy(x[i : i + 4], w, t[i : i + 4], linear_bias=b, reduction="sum") / n_tokens
        loss.backward()
    ops = [v.detach().clone().requires_grad_() for v in (x, w, b)]
    F.cross_entropy(F.linear(*ops), t).backward()
    for v, r in zip((x, w, b), ops):
        torch.testing.assert_close(v.grad, r.grad)


def _composite(x, w, t, b=None, **kw):
    return F.cross_entropy(F.linear(x, w, b), t, **kw)


def test_extras_are_checked(device):
    x, w, _ = _operands(4, 3, 6, device)
    t = _targets((4,), 6, device)
    for bad, match in [
        (dict(chunk_size=0), "chunk_size"),
        (dict(softcap=-1.0), "softcap"),
        (dict(z_loss=float("inf")), "z_loss"),
        (dict(fp32_weight_grad="yes"), "fp32_weight_grad"),
    ]:
        with pytest.raises(ValueError, match=match):
            tl_.linear_cross_entropy(x, w, t, **bad)


def test_unsupported_calls_fall_back_or_raise(device, monkeypatch):
    """Probability targets that need a gradient: ``auto`` gives torch's answer, ``triton`` refuses."""
    x, w, _ = _operands(5, 3, 6, device)
    p = torch.rand(5, 6, device=device).softmax(-1).requires_grad_()
    out = tl_.linear_cross_entropy(x, w, p)
    ref = _composite(x, w, p)
    torch.testing.assert_close(out, ref)
    for g, r in zip(torch.autograd.grad(out, (p, w)), torch.autograd.grad(ref, (p, w))):
        torch.testing.assert_close(g, r)
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "triton")
    with pytest.raises(NotImplementedError, match="probability target that requires grad"):
        tl_.linear_cross_entropy(x, w, p)


def test_chunk_heuristic():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert chunks.chunk_rows(8192, 128256, 2, cuda) * 128256 * 2 <= chunks.BUFFER_BYTES["cuda"] * 1.1
    assert chunks.chunk_rows(100, 32000, 4, cpu) <= 100
    assert chunks.chunk_rows(10, 50, 4, cpu) == 10  # everything fits: one chunk
    assert chunks.chunk_rows(1000, 10**7, 4, cpu) == chunks.MIN_ROWS["cpu"]  # huge V: the floor
    rows = chunks.chunk_rows(8192, 32000, 4, cpu)
    assert rows % 8 == 0 and rows * 32000 * 4 <= chunks.BUFFER_BYTES["cpu"] * 1.1
    assert chunks.chunk_rows(1000, 32000, 4, cpu, override=7) == 7
    assert chunks.chunk_rows(5, 32000, 4, cpu, override=64) == 5
    # balanced: 1000 rows in chunks of at most ~65 are 16 near-equal chunks, not 15 full and a sliver
    r = chunks.chunk_rows(1000, 32000, 4, cpu)
    assert -(-1000 // r) * r - 1000 < r // 2


class _MaxBytes(TorchDispatchMode):
    """Largest tensor, in bytes, any aten op produces (outputs, including ``empty`` buffers).

    Bytes, not elements: the Triton interpreter moves whole storages around as uint8 tensors.
    """

    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.max = max(self.max, o.numel() * o.element_size())
        return out


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_op_ever_produces_an_n_by_v_tensor(backend, device, reduction):
    N, H, V, chunk = 64, 4, 97, 8
    x, w, b = _operands(N, H, V, device, bias=True)
    t = _targets((N,), V, device, -100)
    with _MaxBytes() as seen:
        loss = tl_.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, chunk_size=chunk)
        loss.backward(torch.ones_like(loss))
    assert seen.max <= chunk * V * 4, (seen.max, chunk * V * 4)
    with _MaxBytes() as control:  # the harness does see the logits of the unfused composite
        _composite(x, w, t, b, reduction=reduction).sum().backward()
    assert control.max >= N * V * 4


def test_past_the_budget_no_fp32_weight_sized_buffer(backend, device, monkeypatch):
    """A 16-bit weight whose fp32 gradient accumulator exceeds the budget is never given one."""
    N, H, V, chunk = 32, 64, 97, 8
    x, w, b = _operands(N, H, V, device, dtype=torch.bfloat16, bias=True)
    t = _targets((N,), V, device, -100)
    monkeypatch.setitem(chunks.WGRAD_FP32_BYTES, "cpu", V * H * 4 - 1)
    sizes = {}
    for fp32 in (None, True):
        with _MaxBytes() as seen:
            loss = tl_.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=chunk, fp32_weight_grad=fp32)
            loss.backward()
        sizes[fp32] = seen.max
    assert sizes[None] < V * H * 4 <= sizes[True], sizes


_RSS_PROBE = textwrap.dedent(
    """
    import ctypes, gc, json, sys
    from pathlib import Path
    import torch, torch.nn.functional as F
    import triton_losses

    def status(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    N, H, V = 8192, 8, 8192
    x = torch.randn(N, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    t = torch.randint(0, V, (N,))
    steps = {
        "ours": lambda x, w, t: triton_losses.linear_cross_entropy(x, w, t).backward(),
        "eager": lambda x, w, t: F.cross_entropy(F.linear(x, w), t).backward(),
    }
    for warm in steps.values():  # page in the code both paths run, so only their buffers are measured
        warm(torch.randn(64, H, requires_grad=True), torch.randn(128, H, requires_grad=True), t[:64] % 128)
    out = {}
    for name in sys.argv[1:]:
        step = lambda: steps[name](x, w, t)  # noqa: E731
        x.grad = w.grad = None
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        base = status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        step()
        out[name] = status("VmHWM") - base
    print(json.dumps(out))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_cpu_peak_memory_stays_far_below_the_logits():
    """Fresh process, fp32 N = V = 8192: the logits alone are 256 MiB; our whole call must add < 64 MiB.

    Measured as the peak resident set size (VmHWM, reset through /proc/self/clear_refs) above the
    resident size before the call. Eager ``linear`` + ``cross_entropy`` runs as the control: it has
    to show at least the logits' size, or the probe would be blind.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_LOSSES_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, "ours", "eager"], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    added = json.loads(proc.stdout.strip().splitlines()[-1])
    logits = 8192 * 8192 * 4
    assert added["eager"] >= logits, added
    assert added["ours"] < 64 << 20, added


class TestModule:
    def test_owns_only_options(self, backend, device):
        m = tl_.nn.LinearCrossEntropyLoss(reduction="sum", label_smoothing=0.1, z_loss=1e-3, chunk_size=3)
        assert list(m.parameters()) == [] and list(m.state_dict()) == []
        x, w, b = _operands(7, 3, 11, device, bias=True)
        t = _targets((7,), 11, device, -100)
        out = m(x, w, t, b)
        ref = tl_.linear_cross_entropy(x, w, t, linear_bias=b, reduction="sum", label_smoothing=0.1, z_loss=1e-3)
        torch.testing.assert_close(out, ref)
        assert "z_loss=0.001" in repr(m) and "chunk_size=3" in repr(m)

    @pytest.mark.slow
    def test_passes_fp32_weight_grad(self, backend, device):
        x, w, _ = _operands(64, 4, 16, device, dtype=torch.bfloat16)
        t = _targets((64,), 16, device)
        grads = {}
        for fp32 in (False, True):
            m = tl_.nn.LinearCrossEntropyLoss(reduction="sum", chunk_size=1, fp32_weight_grad=fp32)
            assert f"fp32_weight_grad={fp32}" in repr(m)
            (grads[fp32],) = torch.autograd.grad(m(x, w, t), (w,))
            f = tl_.linear_cross_entropy(x, w, t, reduction="sum", chunk_size=1, fp32_weight_grad=fp32)
            assert torch.equal(grads[fp32], torch.autograd.grad(f, (w,))[0])
        assert not torch.equal(grads[False], grads[True])

    def test_class_weight_is_a_buffer(self, backend, device):
        cw = torch.rand(11, device=device)
        m = tl_.nn.LinearCrossEntropyLoss(weight=cw, ignore_index=2)
        assert list(m.state_dict()) == ["weight"]
        x, w, _ = _operands(7, 3, 11, device)
        t = _targets((7,), 11, device, 2)
        torch.testing.assert_close(m(x, w, t), _composite(x, w, t, weight=cw, ignore_index=2))

    @pytest.mark.skipif(not hasattr(torch.nn, "LinearCrossEntropyLoss"), reason="torch < 2.13")
    def test_subclasses_torch_and_is_a_drop_in(self, backend, device):
        assert issubclass(tl_.nn.LinearCrossEntropyLoss, torch.nn.LinearCrossEntropyLoss)
        torch.manual_seed(0)
        theirs = torch.nn.LinearCrossEntropyLoss(5, 12, bias=True, label_smoothing=0.1, device=device)
        torch.manual_seed(0)
        ours = tl_.nn.LinearCrossEntropyLoss(5, 12, bias=True, label_smoothing=0.1, device=device)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(6, 5, device=device)
        t = _targets((6,), 12, device, -100)
        a, r = ours(x, t), theirs(x, t)
        torch.testing.assert_close(a, r)
        a.backward()
        r.backward()
        torch.testing.assert_close(ours.linear.weight.grad, theirs.linear.weight.grad)
        torch.testing.assert_close(ours.linear.bias.grad, theirs.linear.bias.grad)


@pytest.mark.gpu
def test_gpu_hot_path_has_no_host_sync_and_bounded_memory(monkeypatch):
    """bf16 on CUDA, default settings: no host sync at all, and no logits-sized allocation.

    Beyond the inputs and the returned gradients, the call may hold the fp32 weight-gradient
    accumulator (V*H*4 = 128 MiB, within the default budget), its bf16 result while it is cast, and
    the chunk buffer; the logits would be N*V*2 = 512 MiB.
    """
    N, H, V, chunk = 4096, 512, 65536, 512
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, H, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(V, H, device="cuda", generator=g) / H**0.5).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    t[::7] = -100
    tl_.linear_cross_entropy(x, w, t, chunk_size=chunk).backward()  # warm-up: compile, probe the fp32 mm
    x.grad = w.grad = None
    monkeypatch.delenv("TRITON_LOSSES_CHECK_TARGETS", raising=False)  # the default: no eager target check
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = tl_.linear_cross_entropy(x, w, t, chunk_size=chunk)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - (x.numel() + w.numel()) * 2
    assert extra <= V * H * 4 + V * H * 2 + chunk * V * 2 + (16 << 20), extra / 2**20
    ref = F.cross_entropy(F.linear(x.detach().float(), w.detach().float()), t)
    torch.testing.assert_close(loss.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_bar_shape_stays_under_1gb_beyond_inputs_and_gradients():
    """The linear-CE memory target on a GPU: bf16, N=8192, H=4096, V=128256, forward + backward, default options.

    The logits alone would be 2.1 GB (and their gradient as much again); the fp32 weight-gradient
    accumulator would be 2.1 GB, so the default accumulates it in bf16 here (4 chunks of 2048 rows).
    """
    N, H, V = 8192, 4096, 128256
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, H, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(V, H, device="cuda", generator=g) / H**0.5).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    assert chunks.weight_grad_dtype(w, None) == torch.bfloat16
    tl_.linear_cross_entropy(x, w, t).backward()  # warm-up
    x.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = tl_.linear_cross_entropy(x, w, t)
    loss.backward()
    torch.cuda.synchronize()
    beyond = torch.cuda.max_memory_allocated() - base - (x.numel() + w.numel()) * 2  # minus the gradients
    assert beyond < 1e9, beyond / 2**20
    with torch.no_grad():  # the loss against an fp32 evaluation, in row blocks
        ref = (
            sum(
                F.cross_entropy(F.linear(x[i : i + 1024].float(), w.float()), t[i : i + 1024], reduction="sum")
                for i in range(0, N, 1024)
            )
            / N
        )
    torch.testing.assert_close(loss.float(), ref, rtol=2e-2, atol=2e-2)


class TestModuleConstruction:
    def test_with_a_layer_where_torch_has_no_such_class(self, backend, device, monkeypatch):
        """torch < 2.13: built with sizes, the module owns an ``nn.Linear`` itself (same state_dict keys)."""
        import triton_losses.nn as tnn

        monkeypatch.setattr(lce, "_TorchLinearCrossEntropyLoss", None)
        m = tnn.LinearCrossEntropyLoss(5, 12, bias=True, reduction="sum", device=device)
        assert sorted(m.state_dict()) == ["linear.bias", "linear.weight"]
        x = torch.randn(6, 5, device=device)
        t = _targets((6,), 12, device, -100)
        torch.testing.assert_close(m(x, t), _composite(x, m.linear.weight, t, m.linear.bias, reduction="sum"))

    def test_arguments(self):
        with pytest.raises(TypeError, match="both in_features and num_classes"):
            tl_.nn.LinearCrossEntropyLoss(5)
        with pytest.raises(TypeError, match="out_features needs in_features"):
            tl_.nn.LinearCrossEntropyLoss(out_features=(3,))

    def test_pickle_and_deepcopy(self):
        import copy
        import pickle

        m = tl_.nn.LinearCrossEntropyLoss(weight=torch.rand(7), label_smoothing=0.2, z_loss=1e-3, chunk_size=5)
        x, w, _ = _operands(4, 3, 7, "cpu")
        t = _targets((4,), 7, "cpu")
        for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
            assert clone.z_loss == 1e-3 and clone.chunk_size == 5
            torch.testing.assert_close(clone(x, w, t), m(x, w, t))


# ---- autograd beyond one backward, torch.compile, custom ops ------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_double_backward_gradgradcheck(device, reduction, monkeypatch):
    """``create_graph=True``: the gradients are differentiable (fp64, every option, a K-dim weight too).

    The reference backend only: with ``create_graph`` the backward is built from torch ops on either
    backend, so the interpreter would only slow the hundreds of forward calls down
    (``test_double_backward_matches_torch`` runs on both).
    """
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "torch")
    x, w, b = _operands(4, 3, 5, device, dtype=torch.float64, bias=True)
    t = torch.tensor([1, -100, 4, 0], device=device)
    kw = dict(weight=torch.rand(5, device=device, dtype=torch.float64) + 0.5, label_smoothing=0.1, z_loss=1e-2,
              softcap=3.0, chunk_size=2)  # fmt: skip

    def f(x, w, b):
        return tl_.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, **kw)

    assert torch.autograd.gradgradcheck(f, (x, w, b))
    wk = torch.randn(3, 2, 3, device=device, dtype=torch.float64, requires_grad=True)
    tk = torch.tensor([[0, 2], [1, -100], [2, 2], [-100, -100]], device=device)
    assert torch.autograd.gradgradcheck(
        lambda x, wk: tl_.linear_cross_entropy(x, wk, tk, reduction=reduction, chunk_size=3), (x, wk)
    )


def test_double_backward_matches_torch(backend, device):
    """The Hessian-vector product of the loss through ``create_graph`` equals torch's composite's."""
    x, w, b = _operands(6, 4, 9, device, dtype=torch.float64, bias=True)
    t = _targets((6,), 9, device, -100)
    v = [torch.randn_like(u) for u in (x, w, b)]
    hvps = []
    for loss in (
        tl_.linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.2),
        F.cross_entropy(F.linear(x, w, b), t, label_smoothing=0.2),
    ):
        g = torch.autograd.grad(loss, (x, w, b), create_graph=True)
        hvps.append(torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), (x, w, b)))
    for ours, ref in zip(*hvps):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def _compile_case(device):
    x, w, b = _operands(9, 5, 23, device, bias=True)
    t = _targets((9,), 23, device, -100, frac=0.4)
    return x, w, b, t


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fullgraph_compile_matches_eager(backend, device, reduction):
    """``torch.compile(fullgraph=True)``: no graph break, eager's values and gradients, twice through the graph."""
    torch._dynamo.reset()
    x, w, b, t = _compile_case(device)

    def f(x, w, t, b):
        return tl_.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, chunk_size=4, z_loss=1e-3)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if backend == "triton" else "inductor")
    out, ref = compiled(x, w, t, b), f(x, w, t, b)
    torch.testing.assert_close(out, ref)
    up = torch.rand(ref.shape, device=device) + 0.5
    first = torch.autograd.grad(out, (x, w, b), up, retain_graph=True)
    again = torch.autograd.grad(out, (x, w, b), up)  # the fused gradients survive a first backward
    for g1, g2, r in zip(first, again, torch.autograd.grad(ref, (x, w, b), up)):
        torch.testing.assert_close(g1, r)
        torch.testing.assert_close(g2, r)
    if device == "cpu":  # on CUDA a bad target is a device-side assert, which would end the process
        t_bad = t.clone()
        t_bad[0] = 23  # no host read inside a graph: the graph's own check raises, as torch's compiled loss
        with pytest.raises(RuntimeError, match="Target is out of bounds"):
            compiled(x, w, t_bad, b)


def test_custom_ops_pass_opcheck(backend, device):
    """``triton_losses::linear_ce_fwd`` / ``linear_ce_bwd``: schema, fake tensors, functional, on both backends."""
    from triton_losses import _linear_ce_ops as ops

    x, w, b, t = (v.detach() if v.is_floating_point() else v for v in _compile_case(device))
    cw = torch.rand(23, device=device) + 0.5
    coef = torch.full((1,), 0.1, device=device)
    opts = (-100, 0.1, 1e-3, 3.0, False, 23, 4, torch.float32)
    for need in ([True, True, True], [False, True, False]):
        fwd = (x, w, b, t[:, None], cw, *opts, coef, need, True)
        torch.library.opcheck(ops.linear_ce_fwd, fwd)
        stats = ops.linear_ce_fwd(*fwd)[2]
        gout = torch.rand(9, device=device)
        one = torch.ones(1, device=device)
        torch.library.opcheck(ops.linear_ce_bwd, (x, w, b, t[:, None], cw, *opts, one, need, stats, gout))
    p = torch.rand(9, 23, 1, device=device).softmax(1)
    popts = (-100, 0.0, 0.0, 0.0, True, 23, 5, torch.float32)
    torch.library.opcheck(ops.linear_ce_fwd, (x, w, None, p, None, *popts, coef, [True, True, False], False))
