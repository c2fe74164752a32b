"""Device helpers shared by the kernels, and the launch-configuration policy.

Row addressing: every row-wise kernel sees its operand as a 3-D strided view ``(A, C, B)`` where
``C`` is the reduced (class) dimension; row ``r`` of the ``R = A * B`` rows is ``(r // B, r % B)``.
A 2-D ``(N, C)`` tensor is ``(N, C, 1)``; a K-dim ``(N, C, d1..dk)`` tensor is ``(N, C, d1*..*dk)``.
All offsets are computed in int64, so tensors with more than 2**31 elements are addressed correctly.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))

# Taylor coefficients of tanh(y) = sum_k c_k * y**(2k+1), used for |y| < 0.25 where the
# exp-based formula would cancel; 12 terms are exact to fp64 precision on that interval.
_T1 = tl.constexpr(-0.3333333333333333)
_T2 = tl.constexpr(0.13333333333333333)
_T3 = tl.constexpr(-0.05396825396825397)
_T4 = tl.constexpr(0.021869488536155203)
_T5 = tl.constexpr(-0.008863235529902197)
_T6 = tl.constexpr(0.003592128036572481)
_T7 = tl.constexpr(-0.0014558343870513183)
_T8 = tl.constexpr(0.000590027440945586)
_T9 = tl.constexpr(-0.00023912911424355248)
_T10 = tl.constexpr(9.691537956929451e-05)
_T11 = tl.constexpr(-3.927832388331683e-05)


@triton.jit
def tanh(y):
    """Accurate tanh in the dtype of ``y`` (fp32 or fp64); saturates to +-1, NaN stays NaN."""
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    y2 = y * y
    p = _T11
    p = p * y2 + _T10
    p = p * y2 + _T9
    p = p * y2 + _T8
    p = p * y2 + _T7
    p = p * y2 + _T6
    p = p * y2 + _T5
    p = p * y2 + _T4
    p = p * y2 + _T3
    p = p * y2 + _T2
    p = p * y2 + _T1
    small = a + a * y2 * p
    t = tl.where(a < 0.25, small, big)
    return tl.where(y < 0, -t, t)


@triton.jit
def row_block(R, BLOCK_R: tl.constexpr):
    """This program's ``BLOCK_R`` row indices (int64) and the mask of those ``< R``."""
    return rows_of_block(tl.program_id(0), R, BLOCK_R)


@triton.jit
def rows_of_block(blk, R, BLOCK_R: tl.constexpr):
    """Block ``blk``'s ``BLOCK_R`` row indices (int64) and the mask of those ``< R`` (persistent grids)."""
    rows = tl.cast(blk, tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    return rows, rows < R


@triton.jit
def kept_rows(lab_ptr, rows, rmask, B, s_la, s_lb, ignore_index, HAS_LABELS: tl.constexpr):
    """Rows to keep: in range and, with labels ``(A, B)``, whose label is not ``ignore_index``."""
    keep = rmask
    if HAS_LABELS:
        lab = tl.load(lab_ptr + row_offsets(rows, B, s_la, s_lb), mask=rmask, other=ignore_index)
        keep = rmask & (lab.to(tl.int64) != ignore_index)
    return keep


@triton.jit
def row_offsets(rows, B, s_a, s_b):
    """int64 offsets of rows ``rows`` (int64 vector) of a strided ``(A, C, B)`` view."""
    a = rows // B
    b = rows - a * B
    return a * s_a + b * s_b


@triton.jit
def online_lse_update(m, s, x):
    """Fold a tile ``x`` into per-lane running ``(m, s)``: max and sum of ``exp(x - m)`` so far.

    One exponential per element: the smaller of (running max, new value) is exponentiated
    relative to the larger. ``-inf`` lanes add 0 (an all ``-inf`` row never computes
    ``-inf - -inf``); a NaN ``x`` makes ``s`` NaN; ``+inf`` surfaces as NaN in
    :func:`online_lse_finish`. ``m``, ``s`` and ``x`` share one shape (a tile or a row vector).
    """
    gt = x > m
    m_new = tl.where(gt, x, m)
    shift = tl.where(m_new == NEG_INF, 0.0, m_new)
    e = tl.exp(tl.where(gt, m, x) - shift)
    s = tl.where(gt, s * e + 1.0, s + e)
    return m_new, s


@triton.jit
def aligned_split(xoff, C, ALIGN: tl.constexpr, BLOCK_C: tl.constexpr):
    """Split one row (``xoff``: its ``(1,)`` element offset) of ``C`` columns for 16-byte accesses of
    ``ALIGN`` elements: ``(head, full, tail, rest)``. ``head`` (< ``ALIGN``) columns come before the
    first aligned one; then ``full`` whole ``BLOCK_C`` tiles (no mask), ``tail`` columns (a multiple
    of ``ALIGN``: a mask the compiler can keep 16-byte wide) and the last ``rest`` (< ``ALIGN``)."""
    start = tl.sum(xoff, 0)
    head = tl.minimum((ALIGN - start % ALIGN) % ALIGN, C)
    left = C - head
    full = left // BLOCK_C
    left -= full * BLOCK_C
    tail = tl.multiple_of((left // ALIGN) * ALIGN, ALIGN)
    return head, full.to(tl.int32), tail, left - tail


@triton.jit
def edge_columns(C, head, rest, ALIGN: tl.constexpr):
    """The columns :func:`aligned_split` leaves to one ``2 * ALIGN``-wide tile: the ``head`` before the
    first 16-byte boundary and the last ``rest``; ``(columns (int64), which are real)``."""
    rel = tl.arange(0, 2 * ALIGN)
    first = rel < ALIGN
    cols = tl.where(first, rel, C - rest + rel - ALIGN).to(tl.int64)
    return cols, tl.where(first, rel < head, rel - ALIGN < rest)


@triton.jit
def aligned_tiles(xoff, C, rmask, ALIGN: tl.constexpr, BLOCK_C: tl.constexpr):
    """What a one-row kernel over an unaligned row needs to stream it (``aligned_split`` + ``edge_columns``):
    ``(head, full, rel, tail_mask, edge_cols, edge_mask)``. Tile ``k < full`` starts at column
    ``head + k * BLOCK_C`` (offsets ``rel``, no mask), the aligned rest at ``head + full * BLOCK_C`` under
    ``tail_mask``, and the first / last columns are ``edge_cols`` under ``edge_mask`` (masks with ``rmask``)."""
    head, full, tail, rest = aligned_split(xoff, C, ALIGN, BLOCK_C)
    rel = tl.arange(0, BLOCK_C).to(tl.int64)
    ecols, emask = edge_columns(C, head, rest, ALIGN)
    return head, full, rel, rmask[:, None] & (rel < tail)[None, :], ecols, rmask[:, None] & emask[None, :]


@triton.jit
def masked_load(ptr, mask, other, MASKED: tl.constexpr, EVICT: tl.constexpr):
    """``tl.load`` of ``ptr``, under ``mask`` (``other`` elsewhere) when ``MASKED``."""
    if MASKED:
        v = tl.load(ptr, mask=mask, other=other, eviction_policy=EVICT)
    else:
        v = tl.load(ptr, eviction_policy=EVICT)
    return v


@triton.jit
def masked_store(ptr, v, mask, MASKED: tl.constexpr, EVICT: tl.constexpr):
    """``tl.store`` of ``v`` at ``ptr``, under ``mask`` when ``MASKED``."""
    if MASKED:
        tl.store(ptr, v, mask=mask, eviction_policy=EVICT)
    else:
        tl.store(ptr, v, eviction_policy=EVICT)


@triton.jit
def online_lse_block(m, s, x):
    """Fold a tile ``x`` ``(BLOCK_R, BLOCK_C)`` into per-row running ``(m, s)`` ``(BLOCK_R,)``: max and sum
    of ``exp(x - m)`` so far, one max / sum reduction per tile. ``-inf`` lanes add 0, and an all ``-inf``
    row keeps ``m = -inf``, ``s = 0`` (no ``-inf - -inf``)."""
    m, s, _, _, _ = online_lse_shifted(m, s, x)
    return m, s


@triton.jit
def online_lse_shifted(m, s, x):
    """:func:`online_lse_block` that also returns the shifts before and after the tile (the running max,
    0 while it is ``-inf``) and ``x - shift``: for sums kept relative to the max, rebased as it grows."""
    m_new = tl.maximum(m, tl.max(x, 1))
    shift = tl.where(m_new == NEG_INF, 0.0, m_new)
    xs = x - shift[:, None]
    s = s * tl.exp(m - shift) + tl.sum(tl.exp(xs), 1)
    return m_new, s, tl.where(m == NEG_INF, 0.0, m), shift, xs


@triton.jit
def online_lse_finish(m, s):
    """Per-row ``(max, sum of exp(x - max))`` from per-lane running ``(m, s)`` tiles ``(BLOCK_R, BLOCK_C)``.

    The sum stays separate from the max so callers form ``exp(x - max) / sum`` (or
    ``(x - max) - log(sum)``) without rounding a log-sum-exp first. A row holding ``+inf`` gets a
    NaN sum; an all ``-inf`` row gets max ``-inf`` and sum 0.
    """
    mr = tl.max(m, 1)
    return mr, lanes_sum_exp(m, s, mr)


@triton.jit
def lanes_sum_exp(m, s, mr):
    """Per-row sum of ``exp(x - mr)`` from per-lane running ``(m, s)`` tiles and a row max ``mr`` at least
    theirs (several sets of lanes of one row, each summed against the row's max, add up)."""
    shift = tl.where(mr == NEG_INF, 0.0, mr)
    return tl.sum(s * tl.exp(m - shift[:, None]), 1)


def tl_acc(dtype: torch.dtype):
    """Triton accumulation dtype for ``dtype`` data: fp64 for fp64, fp32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def assert_options(x: torch.Tensor) -> dict:
    """Launch options that keep ``tl.device_assert`` on CUDA (Triton drops it unless ``debug``); none on the CPU.

    ``sanitize_overflow=False``: ``debug`` alone would also add an overflow assert to every int32 operation.
    """
    return dict(debug=True, sanitize_overflow=False) if x.is_cuda else {}


# ---- the fused-gradient rescale: every family's ``scale_`` ------------------------------------------


@triton.jit
def _scale_kernel(g_ptr, factor_ptr, n, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """``g *= factor`` in place over ``n`` contiguous elements, grid-stride; returns at once when factor == 1.

    ``g_ptr``: the gradient (n,); ``factor_ptr``: one value of any float dtype, read as ``ACC``.
    """
    f = tl.load(factor_ptr).to(ACC)
    if f != 1.0:
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(tl.program_id(0).to(tl.int64) * BLOCK, n, step):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n
            g = tl.load(g_ptr + offs, mask=mask, other=0.0)
            tl.store(g_ptr + offs, (g.to(f.dtype) * f).to(g_ptr.dtype.element_ty), mask=mask)


_SCALE_BLOCK = 4096
_FAKE_SMS = 4  # the interpreter's "SM count", so the grid-stride loop runs on a CPU too


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (read once per device); a fixed 4 off CUDA."""
    if device.type != "cuda":
        return _FAKE_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def scale_(g: torch.Tensor, factor: torch.Tensor) -> None:
    """``g *= factor`` in place; a device-side no-op when ``factor == 1`` (``factor``: one element, any dtype)."""
    n = g.numel()
    if not n:
        return
    if not g.is_contiguous():
        g.mul_(factor.reshape(()).to(g.dtype))
        return
    programs = min(triton.cdiv(n, _SCALE_BLOCK), 4 * sm_count(g.device))
    with on_device(g):
        _scale_kernel[(programs,)](g_ptr=g, factor_ptr=factor, n=n, BLOCK=_SCALE_BLOCK, ACC=tl_acc(g.dtype),
                                   num_warps=8)  # fmt: skip


def traced_scale_(g: torch.Tensor, factor: torch.Tensor) -> None:
    """``g *= factor`` with torch ops: the ``scale_`` of a ``TRACED`` namespace (never reached while
    tracing, where ``FUSES_GRAD`` is False)."""
    g.mul_(factor.reshape(()).to(g.dtype))


def on_device(t: torch.Tensor):
    """Context under which kernels for ``t`` launch: its CUDA device, or for CPU tensors (Triton's
    interpreter) one that keeps the interpreter's numpy floating-point warnings from the caller."""
    return torch.cuda.device(t.device) if t.is_cuda else _quiet_interpreter()


@contextlib.contextmanager
def _quiet_interpreter():
    """Silence numpy's overflow / invalid / divide warnings while the interpreter runs a kernel.

    The interpreter evaluates kernels with numpy, which warns (RuntimeWarning) where the GPU silently
    produces inf / NaN, e.g. ``exp(-inf - -inf)`` on a masked lane; the results are the same.
    """
    import numpy as np

    with np.errstate(all="ignore"):
        yield


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# Tile elements each thread holds when a program has one row, per element size, and the most
# warps a program gets. Chosen statically, as no GPU has timed them yet: compiled for sm_80 and
# sm_90 (register counts and spills read from the cubin by tests/aot_compile.py), 32 bf16 values per
# thread (8192-column blocks at 8 warps, the widest tile tried) spilled up to 504 bytes of registers in the
# weighted / smoothed / distillation kernels, and 512-thread programs are capped at 128 registers,
# which spilled too; 16 per thread (8 for fp64, two registers each) at 8 warps spills at most a
# few words. Programs holding several short rows (``BLOCK_R > 1``) carry per-row state as well, so
# they hold half as much. fp64 holds 4: at 8 the fp64 JSD kernel used 158-159 registers (1024 and
# 2048 columns) and a K-dim cross-entropy forward spilled 8 bytes (sm_90). Longer rows take the
# online (running max / sum) loop over blocks of 4096 columns (1024 for fp64). Time wider tiles and
# 16 warps on a GPU before calling this tuned.
_PER_THREAD = {2: 16, 4: 16, 8: 4}
_MAX_WARPS = 8
_MIN_BLOCK_C = 16


# CPU tensors run the kernels under Triton's interpreter, which gains nothing from 16-byte accesses and
# pays for every extra tile the aligned split adds: there rows take the plain loop unless this is set
# (the tests of the split set it).
ALIGN_IN_INTERPRETER = False


def row_align(x, block_r: int, *others) -> int:
    """``ALIGN`` of a row kernel over ``x`` ``(A, C, B)``: elements per 16 bytes when one-row programs
    (``block_r == 1``) stream rows of contiguous classes whose starts or length are not multiples of 16
    elements (the runtime's divisibility specialisation then proves no 16-byte access, so a plain masked
    loop loads 2 or 4 bytes at a time), else 1 (the plain loop). ``others``: tensors read or written at
    ``x``'s offsets; they must have ``x``'s strides (else 1). 1 for CPU tensors (the interpreter) unless
    ``ALIGN_IN_INTERPRETER``.
    """
    _, C, _ = x.shape
    if x.device.type == "cpu" and not ALIGN_IN_INTERPRETER:
        return 1
    if block_r != 1 or x.stride(1) != 1:
        return 1
    rows = _row_strides(x)
    if C % 16 == 0 and all(s % 16 == 0 for s in rows):
        return 1
    if any(w is not None and (_row_strides(w), w.stride(1)) != (rows, 1) for w in others):
        return 1
    return 16 // x.element_size()


def _row_strides(x) -> tuple[int, int]:
    """The strides of ``x`` ``(A, C, B)`` that address its rows (0 for a dimension of size 1: never stepped)."""
    return tuple(0 if n == 1 else s for n, s in ((x.shape[0], x.stride(0)), (x.shape[2], x.stride(2))))


def launch_config(C: int, elem_size: int, col_contiguous: bool, per_thread: int | None = None) -> tuple[int, int, int]:
    """Choose ``(BLOCK_R, BLOCK_C, num_warps)`` for a row-wise kernel over rows of length ``C``.

    Rows whose classes are contiguous (``stride_c == 1``) are tiled along the row; K-dim rows
    (classes strided, neighbouring rows contiguous) are tiled across rows, so loads coalesce.
    Short rows share a program (``BLOCK_R > 1``) in a tile half as large. ``per_thread`` overrides
    the tile values per thread of a one-row program (default ``_PER_THREAD[elem_size]``) for a kernel
    that keeps more per-element temporaries live.
    """
    per_thread = _PER_THREAD[elem_size] if per_thread is None else per_thread
    tile = 32 * _MAX_WARPS * per_thread
    block_c = max(_MIN_BLOCK_C, next_pow2(C))
    if col_contiguous:
        block_c = min(block_c, tile)
        block_r = max(1, min(64, tile // 2 // block_c))
    else:
        block_c = min(block_c, 32)
        block_r = max(1, min(256, tile // 2 // block_c))
    if block_r > 1:
        per_thread //= 2
    num_warps = max(4, min(_MAX_WARPS, block_r * block_c // (32 * per_thread)))
    return block_r, block_c, num_warps
