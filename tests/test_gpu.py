"""Tier 4: on a real GPU — LM-size vocabularies, more than 2**31 elements, compile, CUDA graphs, no syncs.

Every other test file also runs on CUDA tensors when a GPU is present (the ``device`` fixture);
this file holds what only makes sense there. Run with ``pytest -m gpu``.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import triton_losses as tl_
from tests.helpers import budget_close, run_isolated

pytestmark = pytest.mark.gpu
DEV = "cuda"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "triton")


@pytest.mark.parametrize("V", [32000, 128256, 262144])
@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.1, "ignore_index": 7}], ids=["plain", "smooth-ignore"])
def test_lm_vocab_bf16_within_budget(V, kw):
    N = 256
    x = (torch.randn(N, V, device=DEV) * 2).bfloat16()
    t = torch.randint(0, V, (N,), device=DEV)
    t[::5] = 7
    xs = x.clone().requires_grad_()
    ours = tl_.cross_entropy(xs, t, **kw)
    (g,) = torch.autograd.grad(ours, xs)
    x64 = x.double().requires_grad_()
    ref = F.cross_entropy(x64, t, **kw)
    (gr,) = torch.autograd.grad(ref, x64)
    xl = x.clone().requires_grad_()
    lowp = F.cross_entropy(xl, t, **kw)
    (gl,) = torch.autograd.grad(lowp, xl)
    budget_close(ours, ref, lowp)
    # 'mean' divides each row's gradient by the live rows: compared at one row's scale (entries up to 1),
    # where the budget's floor (eps * (1 + |ref|)) does not swallow them
    live = int((t != kw.get("ignore_index", -100)).sum())
    budget_close(g * live, gr * live, gl * live)


def test_segmentation_sized_k_dim_reduces_in_two_stages(monkeypatch):
    """8 x 21 x 512 x 512 (2M pixels): the denominator and the reduction take their first stage at the real
    threshold; mean / sum with weights and ignored pixels against torch in fp64, gradients included."""
    from triton_losses.kernels import _ce_reduce as k

    splits = []
    split = k._split
    monkeypatch.setattr(k, "_split", lambda R, block: splits.append(split(R, block)) or splits[-1])
    x = torch.randn(8, 21, 512, 512, device=DEV)
    t = torch.randint(0, 21, (8, 512, 512), device=DEV)
    t[:, :16] = 255
    w = torch.rand(21, device=DEV) + 0.5
    for reduction in ("mean", "sum"):
        xs = x.clone().requires_grad_()
        ours = tl_.cross_entropy(xs, t, weight=w, ignore_index=255, reduction=reduction)
        (g,) = torch.autograd.grad(ours, xs)
        x64 = x.double().requires_grad_()
        ref = F.cross_entropy(x64, t, weight=w.double(), ignore_index=255, reduction=reduction)
        (gr,) = torch.autograd.grad(ref, x64)
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g.double(), gr, rtol=1e-4, atol=1e-10)
    assert splits and all(p > 1 for p, _ in splits), splits


def test_more_than_2_pow_31_elements():
    N, V = 16640, 131072  # 2.18e9 elements: int32 offsets would overflow
    x = torch.randn(N, V, device=DEV, dtype=torch.bfloat16)
    t = torch.randint(0, V, (N,), device=DEV)
    xs = x.requires_grad_()
    loss = tl_.cross_entropy(xs, t, reduction="none")
    rows = torch.tensor([0, 1, N // 2, N - 2, N - 1], device=DEV)
    ref = F.cross_entropy(x.detach()[rows].double(), t[rows], reduction="none")
    torch.testing.assert_close(loss[rows].double(), ref, rtol=1e-2, atol=1e-2)
    up = torch.zeros(N, device=DEV, dtype=torch.bfloat16)
    up[rows] = 1
    (g,) = torch.autograd.grad(loss, xs, up)
    x64 = x.detach()[rows].double().requires_grad_()
    (gr,) = torch.autograd.grad(F.cross_entropy(x64, t[rows], reduction="sum"), x64)
    torch.testing.assert_close(g[rows].double(), gr, rtol=2e-2, atol=1e-4)


def test_no_host_sync_on_the_hot_path(monkeypatch):
    monkeypatch.setenv("TRITON_LOSSES_CHECK_TARGETS", "0")
    x = torch.randn(64, 5000, device=DEV, requires_grad=True)
    t = torch.randint(0, 5000, (64,), device=DEV)
    w = torch.rand(5000, device=DEV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for red in ("mean", "sum", "none"):
            loss = tl_.cross_entropy(x, t, weight=w, reduction=red, label_smoothing=0.1, z_loss=1e-4)
            loss.sum().backward()
        tl_.log_softmax(x, 1).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_out_of_range_target_trips_a_device_assert():
    """Unchecked (the CUDA default), an out-of-range target is a device-side assert, as in torch's
    CUDA kernel. In a process of its own: the assert leaves that process's CUDA context unusable."""
    code = textwrap.dedent("""
        import torch, triton_losses as tl_
        x = torch.randn(4, 100, device="cuda")
        loss = tl_.cross_entropy(x, torch.tensor([1, 10**9, -5, 3], device="cuda"), reduction="none")
        torch.cuda.synchronize()
        print("no assert", loss.tolist())
    """)
    env = {"TRITON_LOSSES_BACKEND": "triton"}
    proc = run_isolated(code, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode != 0 and "no assert" not in proc.stdout, proc.stdout
    assert "out of bounds" in proc.stderr or "device-side assert" in proc.stderr, proc.stderr[-3000:]


def test_out_of_range_target_checked_raises_like_torch_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_LOSSES_CHECK_TARGETS", "1")
    x = torch.randn(4, 10, device=DEV)
    with pytest.raises(IndexError, match=r"Target 10 is out of bounds\."):
        tl_.cross_entropy(x, torch.tensor([1, 10, 2, 3], device=DEV))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # fp32: no cast on the output (torch 2.11)
def test_torch_compile_fullgraph_inductor(dtype):
    torch._dynamo.reset()
    x = torch.randn(128, 32000, device=DEV, dtype=dtype, requires_grad=True)
    t = torch.randint(0, 32000, (128,), device=DEV)

    def f(x, t):
        return tl_.cross_entropy(x, t, label_smoothing=0.1, z_loss=1e-4) + tl_.log_softmax(x.float(), 1).mean()

    out = torch.compile(f, fullgraph=True)(x, t)
    (g,) = torch.autograd.grad(out, x)
    xr = x.detach().clone().requires_grad_()
    ref = f(xr, t)
    (gr,) = torch.autograd.grad(ref, xr)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(g.float(), gr.float(), rtol=2e-2, atol=1e-7)


def test_cuda_graph_capture_and_replay():
    x = torch.randn(64, 4096, device=DEV)
    t = torch.randint(0, 4096, (64,), device=DEV)
    # warm up with the very call the graph captures: its kernels are compiled then (not while capturing)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            tl_.cross_entropy(x, t, reduction="sum")
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tl_.cross_entropy(x, t, reduction="sum")
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, F.cross_entropy(x, t, reduction="sum"), rtol=1e-5, atol=1e-4)


def test_memory_fused_backward_is_lean():
    """Peak memory of forward+backward beyond the logits: one gradient buffer, no fp32 copies."""
    N, V = 4096, 128256
    x = torch.randn(N, V, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, V, (N,), device=DEV)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    tl_.cross_entropy(x, t).backward()
    torch.cuda.synchronize()
    added = torch.cuda.max_memory_allocated() - base
    assert added <= 1.05 * x.numel() * x.element_size() + (64 << 20), added
