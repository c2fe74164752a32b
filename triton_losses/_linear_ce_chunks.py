"""The chunked engine of ``linear_cross_entropy``: logits for a block of rows at a time, never N x V.

Per chunk of ``m`` rows (one ``(m, V)`` buffer, allocated once and reused):

1. ``logits = x[rows] @ W.T (+ b)`` in the input's dtype (``torch.mm`` / ``addmm`` into the buffer);
2. the cross-entropy engine of the backend (``kernels`` or ``reference`` ``cross_entropy``) turns the
   buffer into ``coef * gout * dloss/dlogits`` in place (the Triton forward kernel does it in the
   same launch that computes the row's loss and lse; the reference runs its forward, then its backward);
3. ``grad_input[rows] = dlogits @ W``, ``grad_W += dlogits.T @ x[rows]`` and ``grad_b += dlogits.sum(0)``,
   ``grad_b`` accumulated in fp32 (fp64 for fp64), ``grad_W`` in fp32 too unless that accumulator would
   be too big (see ``weight_grad_dtype``).

Rows whose target is ``ignore_index`` are left out of the chunks (``rows`` lists the others), so they
cost no matmul work; see ``live_rows`` for when that is possible without a host sync.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from ._checks import compiling
from .spec import CESpec

# Bytes of the (chunk, V) logits buffer the default heuristic aims at, per device type (see ``chunk_rows``).
#
# Time goes to the three GEMMs per chunk. The weight-gradient GEMM has K = chunk rows and reads and
# writes the whole fp32 (V, H) accumulator once per chunk, so taller chunks are faster until that
# traffic is small next to the GEMMs' work; memory grows with the buffer.
# cpu: measured (bench/results/linear_ce_cpu.md, fp32 N=8192 H=256 V=32000, 2 cores; median time / peak
#   added memory): 32 rows 2.27 s / 45 MiB, 64 rows 1.91 s / 48.5 MiB, 136 rows (16 MiB) 1.53 s / 57 MiB,
#   256 rows 1.51 s / 92 MiB, 512 rows 1.55 s / 123 MiB; torch's chunked path 1.82 s / 87 MiB. 16 MiB is
#   where the time curve has flattened while the memory is still well below torch's.
# cuda: not measured here (no GPU in the session that wrote this). 512 MiB is 2048 rows of bf16 at
#   V=128256: Liger-Kernel's H200 sweep at that shape (N=8192, H=4096) gives 53.0 ms at 256-row chunks,
#   37.7 ms at 2048 and 35.1 ms at 4096, and the fp32 accumulator traffic (2 * V*H*4 bytes per chunk) is
#   4 passes of 4.2 GB instead of 32 at 256 rows. Re-measure with the GPU benchmark.
BUFFER_BYTES = {"cuda": 512 << 20, "cpu": 16 << 20}
# Fewest rows per chunk the heuristic picks: each chunk also reads and writes the whole fp32 (V, H)
# weight-gradient accumulator, which shorter chunks cannot amortise (CPU, H=256, V=128256, N=1024:
# 32 rows 2.54 s, 64 rows 1.94 s, 128 rows 1.72 s, 256 rows 1.60 s; eager 2.12 s).
MIN_ROWS = {"cuda": 128, "cpu": 128}
# Largest fp32 (V, H) weight-gradient accumulator the default keeps for a 16-bit weight, per device type.
#
# Accumulating grad_W over the chunks in fp32 costs V*H*4 bytes, and its cast to the weight's dtype
# another V*H*2 while both live: at V=128256, H=4096 that is 2.1 GB + 1.05 GB, more than the logits
# buffer and more than the "< 1 GB beyond inputs and gradients" allows. Past this size the
# weight gradient is accumulated in its own dtype instead: each chunk's GEMM still sums its rows in
# fp32 (cuBLAS / oneDNN accumulate 16-bit GEMMs in fp32) and adds the previous partial sum before one
# rounding, so the result carries one rounding per chunk instead of one in all (4 chunks at the GPU
# bar shape; tests/test_linear_cross_entropy.py measures the error against torch's). The same trade
# Liger-Kernel makes always; ``fp32_weight_grad=True`` keeps the fp32 accumulator at any size.
# 256 MiB with the 512 MiB logits buffer keeps the CUDA working set within 1 GB, e.g. V=32000, H=2048.
WGRAD_FP32_BYTES = {"cuda": 256 << 20, "cpu": 256 << 20}
# Columns of the (V-slice, H) temporary when a 16-bit weight gradient is added to its fp32 accumulator
# on a device whose matmul cannot write fp32 from 16-bit operands.
_WGRAD_SLICE_BYTES = 32 << 20


class Problem(NamedTuple):
    """One call's operands, flattened to rows, and the chunking plan.

    Attributes:
        x: input rows ``(N, H)``.
        w: linear weight ``(V, H)``.
        b: linear bias ``(V,)`` or None.
        t: index targets ``(N,)`` or class probabilities ``(N, V)``.
        spec: the cross-entropy options (class weights, smoothing, z-loss, softcap, ...).
        rows: ``(n,)`` int64 indices of the rows that are computed (the non-ignored ones), or None
            for all ``N`` rows in order.
        n: number of rows computed (``N`` when ``rows`` is None).
        chunk: rows per chunk.
        backend: ``"triton"`` or ``"torch"``.
        wgrad: dtype ``grad_W`` is accumulated in (see ``weight_grad_dtype``).
    """

    x: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor | None
    t: torch.Tensor
    spec: CESpec
    rows: torch.Tensor | None
    n: int
    chunk: int
    backend: str
    wgrad: torch.dtype


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def weight_grad_dtype(w: torch.Tensor, fp32: bool | None) -> torch.dtype:
    """The dtype the weight gradient ``(V, H)`` is accumulated in over the chunks.

    fp32 (fp64 for fp64) when ``fp32`` is True, or when it is None and the accumulator fits in
    ``WGRAD_FP32_BYTES``; else the weight's own dtype (one rounding per chunk). fp32 and fp64 weights
    always accumulate in their own dtype, which is already the accumulation dtype.
    """
    acc = acc_dtype(w.dtype)
    if w.dtype == acc or fp32:
        return acc
    if fp32 is None:
        kind = "cuda" if w.is_cuda else "cpu"
        if w.numel() * torch.finfo(acc).bits // 8 <= WGRAD_FP32_BYTES[kind]:
            return acc
    return w.dtype


def may_sync(t: torch.Tensor) -> bool:
    """Whether a host sync is allowed for this call (the same rule as ``check_target_range``)."""
    if compiling():
        return False
    return not (t.is_cuda and os.environ.get("TRITON_LOSSES_CHECK_TARGETS", "1") == "0")


def live_rows(t: torch.Tensor, ignore_index: int, V: int) -> tuple[torch.Tensor | None, int]:
    """Check the index targets ``t`` ``(N,)`` and list the rows that are not ignored.

    One device-to-host transfer (two counts) serves both the target range check that
    ``cross_entropy`` does anyway in eager mode and the compaction, so skipping the ignored rows
    adds no sync. Where no sync is allowed (``torch.compile``, CUDA graph capture, or
    ``TRITON_LOSSES_CHECK_TARGETS=0`` on CUDA) every row is computed: ignored rows then cost matmul
    work but still contribute exactly zero, and an out-of-range target yields NaN.

    Returns:
        ``(rows, n)``: the ``(n,)`` int64 indices of the non-ignored rows in order, or ``(None, N)``
        when every row is computed.
    """
    N = t.shape[0]
    if N == 0 or not may_sync(t):
        return None, N
    t = t.long()  # compare as int64: a uint8 target must not wrap ignore_index=-100 to 156
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= V))
    n_valid, n_bad = torch.stack((valid.sum(), bad.sum())).tolist()
    if n_bad:
        raise IndexError(f"Target {int(t[bad][0])} is out of bounds.")
    if n_valid == N:
        return None, N
    # A stable sort puts the valid rows first, in order, without a data-dependent output size.
    rows = torch.argsort(valid.logical_not().to(torch.int8), stable=True)[:n_valid]
    return rows, n_valid


def chunk_rows(n: int, V: int, itemsize: int, device: torch.device, override: int | None = None) -> int:
    """Rows per chunk: the ``(chunk, V)`` logits buffer stays near ``BUFFER_BYTES[device]``.

    The buffer is the only N-proportional working memory, so its size is the memory knob; the
    floor ``MIN_ROWS`` keeps each GEMM tall enough to run near peak. The chunks are then balanced
    (``n`` split into equal parts, rounded up to a multiple of 8 rows) so the last one is not a sliver.
    ``override`` (the ``chunk_size`` argument) replaces the heuristic, capped at ``n``.
    """
    if n <= 0:
        return 1
    if override is not None:
        return max(1, min(int(override), n))
    kind = "cuda" if device.type == "cuda" else "cpu"
    rows = max(MIN_ROWS[kind], BUFFER_BYTES[kind] // max(1, V * itemsize))
    if rows >= n:
        return n
    parts = -(-n // rows)
    rows = -(-n // parts)
    return min(n, -(-rows // 8) * 8)


_OUT_DTYPE_MM: dict[tuple, bool] = {}


def _mm_writes_fp32(acc: torch.Tensor, a: torch.Tensor) -> bool:
    """Whether ``torch.addmm(acc32, a16, b16, out_dtype=fp32, out=acc32)`` works here (checked once).

    CUDA with torch >= 2.8 has it; the CPU has not. The probe compares against an fp32 matmul on a
    tiny problem (one sync, on the first call per device and dtype only, never under capture).
    """
    if not a.is_cuda or compiling():
        return False
    key = (a.device, a.dtype)
    if key not in _OUT_DTYPE_MM:
        ok = False
        try:
            g = torch.Generator(device=a.device).manual_seed(0)
            p = torch.randn(8, 24, device=a.device, generator=g).to(a.dtype)
            q = torch.randn(24, 16, device=a.device, generator=g).to(a.dtype)
            out = torch.ones(8, 16, device=a.device, dtype=acc.dtype)
            torch.addmm(out, p, q, out_dtype=acc.dtype, out=out)
            ok = bool(torch.allclose(out, 1.0 + p.to(acc.dtype) @ q.to(acc.dtype), rtol=1e-3, atol=1e-3))
        except (TypeError, RuntimeError, NotImplementedError):
            ok = False
        _OUT_DTYPE_MM[key] = ok
    return _OUT_DTYPE_MM[key]


def add_weight_grad(acc: torch.Tensor, dl: torch.Tensor, xc: torch.Tensor) -> None:
    """``acc += dl.T @ xc`` with ``acc`` ``(V, H)``, ``dl`` ``(m, V)``, ``xc`` ``(m, H)``.

    Same dtype (fp32/fp64 operands, or a 16-bit accumulator): one in-place ``addmm_``. 16-bit
    operands into an fp32 accumulator: a matmul that writes fp32 where the device has one, else
    V-slices of a 16-bit product (one rounding per chunk, fp32 accumulation across chunks) so the
    temporary stays small instead of ``(V, H)``.
    """
    if dl.dtype == acc.dtype:
        acc.addmm_(dl.t(), xc)
    elif _mm_writes_fp32(acc, dl):
        torch.addmm(acc, dl.t(), xc, out_dtype=acc.dtype, out=acc)
    else:
        V, H = acc.shape
        step = max(1, _WGRAD_SLICE_BYTES // max(1, H * dl.element_size()))
        for v0 in range(0, V, step):
            acc[v0 : v0 + step].add_(torch.mm(dl[:, v0 : v0 + step].t(), xc))


def engine(p: Problem):
    """The per-chunk cross-entropy engine of ``p.backend`` (both write the gradient in place)."""
    from . import _dispatch

    return _dispatch.implementation(p.backend, "cross_entropy")


class Grads(NamedTuple):
    """Gradients for input rows ``(N, H)``, weight ``(V, H)`` and bias ``(V,)`` (None where not needed)."""

    input: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None


class Result(NamedTuple):
    """What a pass over the chunks produced.

    Attributes:
        total: 0-d sum of the row losses (fp32; fp64 for fp64), or None (backward pass).
        rows_loss: ``(N,)`` per-row loss (0 on ignored rows), when asked for.
        lse: ``(n,)`` log-sum-exp of each computed row, in chunk order, when asked for.
        grads: the gradients asked for.
    """

    total: torch.Tensor | None
    rows_loss: torch.Tensor | None
    lse: torch.Tensor | None
    grads: Grads


def run(
    p: Problem,
    coef: torch.Tensor,
    need: tuple[bool, bool, bool],
    *,
    per_row: bool = False,
    save_lse: bool = False,
    lse: torch.Tensor | None = None,
    gout: torch.Tensor | None = None,
) -> Result:
    """One pass over the chunks: the loss (forward, ``lse`` None) and/or the gradients.

    Args:
        p: the problem and its plan.
        coef: ``(1,)`` fp32 scale of the gradient (1/denominator for 'mean', else 1).
        need: which of (input, weight, bias) gradients to compute.
        per_row: forward only: also return the ``(N,)`` per-row losses.
        save_lse: forward only: also return the ``(n,)`` per-row log-sum-exp.
        lse: backward pass: the forward's ``(n,)`` log-sum-exp; the loss is not recomputed.
        gout: backward pass: upstream gradient, ``(n,)`` per computed row or ``(1,)`` for all.
    """
    impl = engine(p)
    fused = getattr(impl, "FUSES_GRAD", True)
    x, w, b, t, spec, rows, n, chunk = p.x, p.w, p.b, p.t, p.spec, p.rows, p.n, p.chunk
    N, H = x.shape
    V = w.shape[0]
    dev, acc = x.device, acc_dtype(x.dtype)
    grads_wanted = any(need)
    forward = lse is None
    if forward and gout is None:
        gout = torch.ones(1, dtype=acc, device=dev)
    gi = gw = gb = None
    if need[0]:
        gi = (torch.zeros if rows is not None else torch.empty)(N, H, dtype=x.dtype, device=dev)
    if need[1]:
        gw = torch.zeros(V, H, dtype=p.wgrad, device=dev)
    if need[2]:
        gb = torch.zeros(V, dtype=acc, device=dev)
    total = torch.zeros((), dtype=acc, device=dev) if forward else None
    rows_loss = torch.zeros(N, dtype=acc, device=dev) if forward and per_row else None
    lse_out = torch.empty(n, dtype=acc, device=dev) if forward and save_lse else None
    buf = torch.empty(min(chunk, n), V, dtype=x.dtype, device=dev) if n else None
    wt = w.t()
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        idx = None if rows is None else rows[c0:c1]
        xc = x[c0:c1] if idx is None else x.index_select(0, idx)
        tc = t[c0:c1] if idx is None else t.index_select(0, idx)
        logits = buf[: c1 - c0]
        if b is None:
            torch.mm(xc, wt, out=logits)
        else:
            torch.addmm(b, xc, wt, out=logits)
        x3 = logits.unsqueeze(-1)  # (m, V, 1): the (A, C, B) view the CE engine works on
        t3 = tc.unsqueeze(-1)  # (m, 1) indices or (m, V, 1) probabilities
        if forward:
            in_place = grads_wanted and fused
            loss_c, lse_c = impl.ce_fwd(x3, t3, spec, coef, x3 if in_place else None)
            total += loss_c.sum()
            if rows_loss is not None:
                if idx is None:
                    rows_loss[c0:c1] = loss_c
                else:
                    rows_loss.index_copy_(0, idx, loss_c)
            if lse_out is not None:
                lse_out[c0:c1] = lse_c
            if grads_wanted and not in_place:
                impl.ce_bwd(x3, t3, spec, lse_c, gout, coef, x3, None)
        else:
            g = gout if gout.numel() == 1 else gout[c0:c1]
            impl.ce_bwd(x3, t3, spec, lse[c0:c1], g, coef, x3, None)
        if gi is not None:
            if idx is None:
                torch.mm(logits, w, out=gi[c0:c1])
            else:
                gi.index_copy_(0, idx, torch.mm(logits, w))
        if gw is not None:
            add_weight_grad(gw, logits, xc)
        if gb is not None:
            gb += logits.sum(0, dtype=acc)
    buf = logits = x3 = None  # free the chunk buffer before the accumulator's cast allocates the result
    if gw is not None and gw.dtype != w.dtype:
        gw = gw.to(w.dtype)
    if gb is not None and b is not None and gb.dtype != b.dtype:
        gb = gb.to(b.dtype)
    return Result(total, rows_loss, lse_out, Grads(gi, gw, gb))
