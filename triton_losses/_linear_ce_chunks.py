"""The chunked engine of ``linear_cross_entropy``: logits for a block of rows at a time, never N x V.

Per chunk of ``m`` rows (one ``(m, V)`` buffer, allocated once and reused):

1. ``logits = x[rows] @ W.T (+ b)`` in the input's dtype (``torch.mm`` / ``addmm`` into the buffer);
2. the cross-entropy engine of the call (``kernels`` or ``reference`` ``cross_entropy``) turns the
   buffer into ``coef * gout * dloss/dlogits`` in place (the Triton forward kernel does it in the
   same launch that computes the row's loss and lse; the reference right after each row's loss);
3. ``grad_input[rows] = dlogits @ W``, ``grad_W += dlogits.T @ x[rows]`` and ``grad_b += dlogits.sum(0)``,
   ``grad_b`` accumulated in fp32 (fp64 for fp64), ``grad_W`` in fp32 too unless that accumulator would
   be too big (see ``weight_grad_dtype``).

The buffer is viewed as ``(m, C, D)`` for the cross-entropy engine: ``D = 1`` for a plain ``(V, H)``
weight, ``D = d1 * ... * dK`` for a K-dimensional ``(C, d1, ..., dK, H)`` one (flattened to
``(C * D, H)``), whose softmax runs over the ``C`` classes at each of the ``D`` positions.

Rows listed in ``rows`` are the only ones computed (the caller leaves out rows whose targets are all
``ignore_index`` when it can tell without an extra host sync); ``rows=None`` computes every row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._dispatch import tracing
from ._precision import acc_dtype
from .options import CESpec

# Bytes of the (chunk, V) logits buffer the default heuristic aims at, per device type (see ``chunk_rows``).
#
# Time goes to the three GEMMs per chunk. The weight-gradient GEMM has K = chunk rows and reads and
# writes the whole fp32 (V, H) accumulator once per chunk, so taller chunks are faster until that
# traffic is small next to the GEMMs' work; memory grows with the buffer.
# cpu: measured (bench/results/linear_ce_cpu.md, fp32 N=8192 H=256 V=32000, 2 cores; median time / peak
#   added memory): 32 rows 2.27 s / 45 MiB, 64 rows 1.91 s / 48.5 MiB, 136 rows (16 MiB) 1.53 s / 57 MiB,
#   256 rows 1.51 s / 92 MiB, 512 rows 1.55 s / 123 MiB; torch's chunked path 1.82 s / 87 MiB. 16 MiB is
#   where the time curve has flattened while the memory is still well below torch's.
# cuda: not yet measured on a GPU by this project. 512 MiB is 2048 rows of bf16 at
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
# buffer and more than the memory target of "< 1 GB beyond inputs and gradients" allows. Past this size the
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
        w: linear weight ``(V, H)``, ``V = C * D``.
        b: linear bias ``(V,)`` or None.
        t: index targets ``(N, D)`` or class probabilities ``(N, C, D)``.
        spec: the cross-entropy options (class weights ``(C,)``, smoothing, z-loss, softcap, ...).
        classes: ``C``, the size of each softmax.
        rows: ``(n,)`` int64 indices of the rows that are computed, in order, or None for all ``N``.
        n: number of rows computed (``N`` when ``rows`` is None).
        chunk: rows per chunk.
        wgrad: dtype ``grad_W`` is accumulated in (see ``weight_grad_dtype``).
    """

    x: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor | None
    t: torch.Tensor
    spec: CESpec
    classes: int
    rows: torch.Tensor | None
    n: int
    chunk: int
    wgrad: torch.dtype


class Grads(NamedTuple):
    """Gradients for input rows ``(N, H)``, weight ``(V, H)`` and bias ``(V,)`` (None where not needed)."""

    input: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None


class Result(NamedTuple):
    """What a pass over the chunks produced.

    Attributes:
        total: 0-d sum of the losses (fp32; fp64 for fp64), or None (backward pass).
        rows_loss: ``(N * D,)`` loss per row and position (0 on rows not computed), when asked for.
        stats: ``(n * D, 2)`` softmax statistics per computed row and position, in chunk order
            (forward pass), as the cross-entropy engine returns them for its backward.
        grads: the gradients asked for.
    """

    total: torch.Tensor | None
    rows_loss: torch.Tensor | None
    stats: torch.Tensor | None
    grads: Grads


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
    tiny problem (one sync, on the first call per device and dtype only, never under capture: a capture
    takes the answer its eager warm-up found).
    """
    key = (a.device, a.dtype)
    if not a.is_cuda or (key not in _OUT_DTYPE_MM and tracing()):  # a capture uses what its warm-up found
        return False
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


@dataclass
class _Sums:
    """The running outputs of one pass (None where not asked for); shapes as in :class:`Result`."""

    total: torch.Tensor | None
    rows_loss: torch.Tensor | None
    stats: torch.Tensor | None
    gi: torch.Tensor | None
    gw: torch.Tensor | None
    gb: torch.Tensor | None


def _allocate(p: Problem, need, forward: bool, per_row: bool) -> _Sums:
    """Zeroed accumulators for one pass (``grad_input`` is only zeroed when some rows are skipped)."""
    N, H = p.x.shape
    V = p.w.shape[0]
    D = V // p.classes
    dev, acc = p.x.device, acc_dtype(p.x.dtype)
    return _Sums(
        total=torch.zeros((), dtype=acc, device=dev) if forward else None,
        rows_loss=torch.zeros(N * D, dtype=acc, device=dev) if forward and per_row else None,
        stats=torch.empty(p.n * D, 2, dtype=acc, device=dev) if forward else None,
        gi=(torch.zeros if p.rows is not None else torch.empty)(N, H, dtype=p.x.dtype, device=dev) if need[0] else None,
        gw=torch.zeros(V, H, dtype=p.wgrad, device=dev) if need[1] else None,
        gb=torch.zeros(V, dtype=acc, device=dev) if need[2] else None,
    )


def _chunk_operands(p: Problem, c0: int, c1: int):
    """``(idx, x rows, targets)`` of chunk ``[c0, c1)``; ``idx`` ``(m,)`` is None for contiguous rows."""
    if p.rows is None:
        return None, p.x[c0:c1], p.t[c0:c1]
    idx = p.rows[c0:c1]
    return idx, p.x.index_select(0, idx), p.t.index_select(0, idx)


def _chunk_forward(eng, p: Problem, x3, tc, coef, sums: _Sums, idx, c0: int, c1: int, grads: bool) -> None:
    """Loss and statistics of one chunk's ``(m, C, D)`` logits ``x3``; with ``grads``, dlogits into ``x3``."""
    loss_c, stats_c = eng.ce_fwd(x3, tc, p.spec, coef, x3 if grads else None)
    sums.total += loss_c.sum()
    D = x3.shape[2]
    if sums.rows_loss is not None:
        if idx is None:
            sums.rows_loss[c0 * D : c1 * D] = loss_c
        else:
            sums.rows_loss.view(-1, D).index_copy_(0, idx, loss_c.view(-1, D))
    sums.stats[c0 * D : c1 * D] = stats_c


def _chunk_grads(p: Problem, logits, xc, idx, sums: _Sums, c0: int, c1: int) -> None:
    """Add one chunk's dlogits ``(m, V)`` to the input, weight and bias gradients."""
    if sums.gi is not None:
        if idx is None:
            torch.mm(logits, p.w, out=sums.gi[c0:c1])
        else:
            sums.gi.index_copy_(0, idx, torch.mm(logits, p.w))
    if sums.gw is not None:
        add_weight_grad(sums.gw, logits, xc)
    if sums.gb is not None:
        sums.gb += logits.sum(0, dtype=sums.gb.dtype)


def run(
    eng,
    p: Problem,
    coef: torch.Tensor,
    need: tuple[bool, bool, bool],
    *,
    per_row: bool = False,
    stats: torch.Tensor | None = None,
    gout: torch.Tensor | None = None,
    on_rows: Callable[[int, torch.Tensor], None] | None = None,
) -> Result:
    """One pass over the chunks: the loss (forward, ``stats`` None) and/or the gradients.

    Args:
        eng: the cross-entropy engine (``reference`` or ``kernels`` ``cross_entropy``); it writes
            the gradient into the logits buffer in place.
        p: the problem and its plan.
        coef: ``(1,)`` fp32 (fp64) scale of the gradient (1/denominator for 'mean', else 1).
        need: which of (input, weight, bias) gradients to compute.
        per_row: forward only: also return the ``(N * D,)`` losses.
        stats: backward pass: the forward's ``(n * D, 2)`` statistics; the loss is not recomputed.
        gout: backward pass: upstream gradient, ``(n * D,)`` per computed position or ``(1,)`` for all.
        on_rows: called after each chunk with ``(c1, grad_input)`` when every row is computed
            (``p.rows`` None): rows ``[0, c1)`` of the input gradient are final (the vocabulary-parallel
            backward starts their all-reduce while the later chunks compute).
    """
    forward = stats is None
    sums = _allocate(p, need, forward, per_row)
    V = p.w.shape[0]
    D = V // p.classes
    buf = torch.empty(min(p.chunk, p.n), V, dtype=p.x.dtype, device=p.x.device) if p.n else None
    wt = p.w.t()
    for c0 in range(0, p.n, p.chunk):
        c1 = min(p.n, c0 + p.chunk)
        idx, xc, tc = _chunk_operands(p, c0, c1)
        logits = buf[: c1 - c0]
        if p.b is None:
            torch.mm(xc, wt, out=logits)
        else:
            torch.addmm(p.b, xc, wt, out=logits)
        x3 = logits.view(c1 - c0, p.classes, D)  # the (A, C, B) view the CE engine works on
        if forward:
            _chunk_forward(eng, p, x3, tc, coef, sums, idx, c0, c1, any(need))
        else:
            g = gout if gout.numel() == 1 else gout[c0 * D : c1 * D]
            eng.ce_bwd(x3, tc, p.spec, stats[c0 * D : c1 * D], g, coef, x3, None)
        if any(need):
            _chunk_grads(p, logits, xc, idx, sums, c0, c1)
        if on_rows is not None and p.rows is None and sums.gi is not None:
            on_rows(c1, sums.gi)
    buf = logits = x3 = None  # free the chunk buffer before the accumulator's cast allocates the result
    gw, gb = sums.gw, sums.gb
    if gw is not None and gw.dtype != p.w.dtype:
        gw = gw.to(p.w.dtype)
    if gb is not None and p.b is not None and gb.dtype != p.b.dtype:
        gb = gb.to(p.b.dtype)
    return Result(sums.total, sums.rows_loss, sums.stats, Grads(sums.gi, gw, gb))
