"""Addressing, math helpers and the launch policy shared by the elementwise loss kernels (BCE, KL).

An elementwise loss runs over the broadcast shape of its operands. On the host, ``plan`` orders
the dimensions by the output's layout, drops size-1 dimensions and merges neighbours that every
operand addresses contiguously, so that any broadcast (stride-0) or strided view becomes at most
three dimensions ``(D0, D1, D2)``; nothing is copied. A kernel program covers a tile of
``BLOCK_R`` rows (of the ``D0 * D1`` rows) by ``BLOCK_C`` columns (of ``D2``), so integer division
happens once per row, not once per element. All offsets are int64.
"""

from __future__ import annotations

import math
import struct
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from ._common import on_device, tl_acc

# Elements per program: one tile of BLOCK_R * BLOCK_C lanes, 16 per thread at 8 warps; fp64 values
# take two registers each: at 4096 the fp64 kernels spilled 40-48 bytes, at 2048 (8 per thread) BCE's
# forward used 132 registers and bce / margin / kl_bwd spilled 8-16 bytes at sm_90; 1024 (4 per thread).
TILE = 4096
TILE_FP64 = 1024
NUM_WARPS = 8
# Rows per program at most: narrow rows (BLOCK_C = 2..8) took thousands of rows per program, each with
# int64 row coordinates and offsets per operand, and used 160-255 registers at sm_90; 256 rows is at
# most a few rows per thread at 8 warps (tests/aot_compile.py measures the registers).
MAX_BLOCK_R = 256
MAX_DIMS = 3


@triton.jit
def tile_coords(R, D1, D2, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ROWS_I32: tl.constexpr):
    """This program's tile: row coordinates ``(i0, i1)`` (BLOCK_R,), columns (BLOCK_C,), mask.

    A 64-bit integer division is a called subroutine on the GPU (the registers live across the call go
    to the stack), so the divisions are 32-bit: the tile index by the program id's int32, and with
    ``ROWS_I32`` (every row index of the grid and ``D1`` below 2**31, :func:`rows_i32`) the rows by
    ``D1``; else the rows' division is 64-bit. Offsets are int64 either way.
    """
    pid = tl.program_id(0)
    n_cb = (D2 - 1) // BLOCK_C + 1  # cdiv without D2 + BLOCK_C - 1, which passes 2**31 for D2 near it (D2 >= 1)
    rb = pid // n_cb
    cb = pid - rb * n_cb
    cols = cb.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    if ROWS_I32:
        rows = rb.to(tl.int32) * BLOCK_R + tl.arange(0, BLOCK_R)
    else:
        rows = rb.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    i0 = rows // D1
    i1 = rows - i0 * D1
    mask = (rows < R)[:, None] & (cols < D2)[None, :]
    return i0.to(tl.int64), i1.to(tl.int64), cols, mask


@triton.jit
def tile_offsets(i0, i1, cols, s0, s1, s2):
    """int64 offsets (BLOCK_R, BLOCK_C) of a tile of an operand with strides ``(s0, s1, s2)``."""
    return (i0 * s0 + i1 * s1)[:, None] + cols[None, :] * s2


@triton.jit
def load_tile(ptr, i0, i1, cols, s0, s1, s2, mask, ACC: tl.constexpr):
    """A tile of an operand as ACC; masked lanes read 0.5 (a value every loss formula accepts)."""
    return tl.load(ptr + tile_offsets(i0, i1, cols, s0, s1, s2), mask=mask, other=0.5).to(ACC)


@triton.jit
def store_or_sum(loss, out_ptr, i0, i1, cols, os0, os1, os2, part_ptr, mask, REDUCE: tl.constexpr):
    """Store a tile of elementwise loss ('none'), or its sum as this program's partial (REDUCE)."""
    if REDUCE:
        total = tl.sum(tl.sum(tl.where(mask, loss, 0.0), 1), 0)
        tl.store(part_ptr + tl.program_id(0), total.to(part_ptr.dtype.element_ty))
    else:
        dst = out_ptr + tile_offsets(i0, i1, cols, os0, os1, os2)
        tl.store(dst, loss.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_or_divided_sum(loss, out_ptr, i0, i1, cols, os0, os1, os2, part_ptr, mask, denom, REDUCE: tl.constexpr):
    """:func:`store_or_sum`, with each program's partial sum divided by ``denom`` (an integer: 'mean' in one pass)."""
    if REDUCE:
        total = tl.sum(tl.sum(tl.where(mask, loss, 0.0), 1), 0)
        total = total / denom  # int -> the accumulation dtype; exact for fp64, and 1 is exact
        tl.store(part_ptr + tl.program_id(0), total.to(part_ptr.dtype.element_ty))
    else:
        dst = out_ptr + tile_offsets(i0, i1, cols, os0, os1, os2)
        tl.store(dst, loss.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_upstream(g_ptr, i0, i1, cols, gs0, gs1, gs2, mask, ACC: tl.constexpr, G_SCALAR: tl.constexpr):
    """The upstream gradient of a tile as ACC: one load per program when it is one value (``G_SCALAR``:
    every stride 0, the 'mean' / 'sum' case), else a tile load like :func:`load_tile`."""
    if G_SCALAR:  # one return statement: the compiler wants one return type (the interpreter does not)
        g = tl.load(g_ptr).to(ACC)
    else:
        g = load_tile(g_ptr, i0, i1, cols, gs0, gs1, gs2, mask, ACC)
    return g


@triton.jit
def store_grads(dx, dy, dx_ptr, dy_ptr, i0, i1, cols, os0, os1, os2, mask, WRITE_DX: tl.constexpr,
                WRITE_DY: tl.constexpr):  # fmt: skip
    """Store the tiles of the requested gradients (both share one layout)."""
    offs = tile_offsets(i0, i1, cols, os0, os1, os2)
    if WRITE_DX:
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if WRITE_DY:
        tl.store(dy_ptr + offs, dy.to(dy_ptr.dtype.element_ty), mask=mask)


@triton.jit
def log1p(e):
    """``log(1 + e)`` accurate for small ``e`` (``libdevice.log1p`` is unavailable in the interpreter)."""
    u = 1.0 + e
    d = u - 1.0
    return tl.where(d == 0.0, e, tl.log(u) * (e / tl.where(d == 0.0, 1.0, d)))


acc_dtype = tl_acc  # the name the elementwise launchers have used; one rule (kernels._common)


def tile_for(elem_size: int) -> int:
    """Lanes per program for elements of ``elem_size`` bytes."""
    return TILE_FP64 if elem_size == 8 else TILE


def block_config(D2: int, tile: int = TILE) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_C)`` for rows of ``D2`` columns: one ``tile`` of lanes per program, at most
    ``MAX_BLOCK_R`` rows.

    ``BLOCK_C`` is the power of 2 at or above ``D2`` (at most ``tile``), so narrow rows share a
    program; at worst half the lanes idle (the kernels are memory-bound). Rows of fewer than
    ``tile // MAX_BLOCK_R`` columns get programs smaller than ``tile``.
    """
    block_c = 1
    while block_c < min(D2, tile):
        block_c *= 2
    return min(tile // block_c, MAX_BLOCK_R), block_c


def reachable_blocks(tile: int = TILE) -> list[tuple[int, int]]:
    """Every ``(BLOCK_R, BLOCK_C)`` that ``block_config`` can return for ``tile`` (for AOT tests)."""
    return sorted({block_config(1 << p, tile) for p in range(0, 14)})


def plan(shape: torch.Size, operands: list[torch.Tensor]) -> tuple[tuple[int, int, int], list[tuple]] | None:
    """Collapse ``shape`` to at most three dimensions for operands viewed (expanded) at ``shape``.

    Args:
        shape: the broadcast shape every operand is expanded to.
        operands: tensors of shape ``shape`` (stride-0 views allowed); the first one's layout
            orders the dimensions (pass the output buffer first).

    Returns:
        ``((D0, D1, D2), [(s0, s1, s2) per operand])``, or None if more than three dimensions remain.
    """
    strides = [list(t.stride()) for t in operands]
    dims = [d for d in range(len(shape)) if shape[d] != 1]
    dims.sort(key=lambda d: -strides[0][d])  # stable: equal strides keep their order
    sizes = [shape[d] for d in dims]
    st = [[s[d] for d in dims] for s in strides]
    i = len(sizes) - 1
    while i > 0:
        if all(s[i - 1] == s[i] * sizes[i] for s in st):
            sizes[i - 1] *= sizes[i]
            for s in st:
                s[i - 1] = s[i]
                del s[i]
            del sizes[i]
        i -= 1
    if len(sizes) > MAX_DIMS:
        return None
    pad = MAX_DIMS - len(sizes)
    return tuple([1] * pad + sizes), [tuple([0] * pad + s) for s in st]


def empty_like_layout(shape: torch.Size, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An output of ``shape``: ``like``'s layout when it has that shape (and is dense), else contiguous."""
    if like.shape == shape:
        return torch.empty_like(like, dtype=dtype)
    return torch.empty(shape, dtype=dtype, device=like.device)


def prepare(shape: torch.Size, outputs: list[torch.Tensor], inputs: list[torch.Tensor | None]):
    """Plan the launch over ``outputs`` (fresh dense buffers) and ``inputs`` (views at ``shape``).

    When no three-dimensional plan exists, the outputs are reallocated contiguous and the inputs
    copied contiguous (materialising broadcasts): rare layouts trade memory for correctness.

    Returns:
        ``(dims, outputs, inputs, strides)``: ``strides`` has one triple per output, then per input
        (``(0, 0, 0)`` for a None input).
    """
    present = [t for t in inputs if t is not None]
    p = plan(shape, outputs + present)
    if p is None:
        outputs = [torch.empty(shape, dtype=o.dtype, device=o.device) for o in outputs]
        inputs = [None if t is None else t.contiguous() for t in inputs]
        present = [t for t in inputs if t is not None]
        p = plan(shape, outputs + present)
    dims, st = p
    it = iter(st[len(outputs) :])
    strides = st[: len(outputs)] + [(0, 0, 0) if t is None else next(it) for t in inputs]
    return dims, outputs, inputs, strides


def _operand_args(inputs, strides, fallback: torch.Tensor) -> list:
    """``ptr, s0, s1, s2`` per input (a None input passes ``fallback``, never read)."""
    args = []
    for t, st in zip(inputs, strides):
        args += [fallback if t is None else t, *st]
    return args


def launch_forward(kernel, inputs: list, reduce: bool, **flags) -> torch.Tensor:
    """Launch an elementwise forward kernel ``kernel(*inputs, out, part, R, D1, D2, ...)``.

    Args:
        kernel: takes, per input, a pointer and three strides; then the output pointer and its
            strides, the partial-sums pointer, ``R, D1, D2`` and the constexprs.
        inputs: tensors expanded to the first one's shape (None for an absent optional operand).
        reduce: return per-program partial sums instead of the elementwise loss.
        flags: the kernel's loss-specific constexprs.

    Returns:
        ``(n_programs,)`` fp32 (fp64 for fp64) partial sums if ``reduce``, else the loss in the
        first input's shape, layout and dtype.
    """
    x = inputs[0]
    shape = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if x.numel() == 0:
        return torch.zeros(0, dtype=acc, device=x.device) if reduce else empty_like_layout(shape, x, x.dtype)
    # A reduced launch writes no loss: a meta tensor gives the output's layout (the plan) without memory.
    out = torch.empty_like(x, device="meta") if reduce else empty_like_layout(shape, x, x.dtype)
    dims, (out,), inputs, st = prepare(shape, [out], inputs)
    if reduce:
        out = inputs[0]  # a pointer of the loss dtype, never written (REDUCE)
    R, block_r, block_c, n_prog = launch_geometry(dims, tile_for(x.element_size()))
    part = torch.empty(n_prog if reduce else 1, dtype=acc, device=x.device)
    with on_device(x):
        kernel[(n_prog,)](
            *_operand_args(inputs, st[1:], out), out, *st[0], part, R, dims[1], dims[2],
            REDUCE=reduce, BLOCK_R=block_r, BLOCK_C=block_c, ROWS_I32=rows_i32(dims, block_r), ACC=acc_dtype(x.dtype),
            num_warps=NUM_WARPS, **flags,
        )  # fmt: skip
    return part if reduce else out


def launch_backward(kernel, inputs: list, need_dx: bool, need_dy: bool, **flags):
    """Launch an elementwise backward kernel ``kernel(*inputs, dx, dy, os0, os1, os2, R, D1, D2, ...)``.

    ``inputs`` are expanded to the first one's shape (the upstream gradient last, a stride-0
    view for a reduced loss); ``dx`` takes the first input's dtype, ``dy`` the second's.

    Returns:
        ``(dx, dy)`` in the first input's shape and layout (None where not needed).
    """
    x, y = inputs[0], inputs[1]
    shape = x.shape
    dx = empty_like_layout(shape, x, x.dtype) if need_dx else None
    dy = empty_like_layout(shape, x, y.dtype) if need_dy else None
    outs = [o for o in (dx, dy) if o is not None]
    if x.numel() == 0 or not outs:
        return dx, dy
    dims, outs, inputs, st = prepare(shape, outs, inputs)
    dx, dy = (outs.pop(0) if need else None for need in (need_dx, need_dy))
    R, block_r, block_c, n_prog = launch_geometry(dims, tile_for(x.element_size()))
    with on_device(x):
        kernel[(n_prog,)](
            *_operand_args(inputs, st[-len(inputs) :], x), dx if need_dx else dy, dy if need_dy else dx, *st[0],
            R, dims[1], dims[2],
            WRITE_DX=need_dx, WRITE_DY=need_dy, BLOCK_R=block_r, BLOCK_C=block_c, ROWS_I32=rows_i32(dims, block_r),
            ACC=acc_dtype(x.dtype), num_warps=NUM_WARPS, **flags,
        )  # fmt: skip
    return dx, dy


# Row indices of an elementwise grid below this are divided in int32 (:func:`rows_i32`).
ROWS_I32_LIMIT = 2**31


def rows_i32(dims: tuple[int, int, int], block_r: int) -> bool:
    """Whether every row index of the grid over ``dims`` (up to the last block's end) and ``D1`` fit int32."""
    D0, D1, _ = dims
    return triton.cdiv(D0 * D1, block_r) * block_r < ROWS_I32_LIMIT and D1 < ROWS_I32_LIMIT


def launch_geometry(dims: tuple[int, int, int], tile: int = TILE) -> tuple[int, int, int, int]:
    """``(R, BLOCK_R, BLOCK_C, n_programs)`` for collapsed dims ``(D0, D1, D2)``."""
    D0, D1, D2 = dims
    R = D0 * D1
    block_r, block_c = block_config(D2, tile)
    return R, block_r, block_c, triton.cdiv(R, block_r) * triton.cdiv(D2, block_c)


# ---- one launch for the loss, its partial sums and the operands' gradients (regression, margin) --


def launch_fused(kernel, operands: list, out_dtype: torch.dtype, write_loss: bool, reduce: bool, needs: tuple,
                 g: torch.Tensor | None = None, scale: float = 1.0, params: tuple = (0.0, 0.0), **flags):  # fmt: skip
    """Launch a three-operand elementwise kernel that writes any of: the loss, its partial sums, the gradients.

    The kernel's arguments: per operand a pointer and three strides (``a``, ``b``, ``c``); the upstream
    gradient's pointer and strides and ``scale`` (the gradient of a lane is ``scale * g``); ``out_ptr``,
    ``part_ptr``, ``da_ptr``, ``db_ptr``, ``dc_ptr`` and the strides they share; ``R, D1, D2``; the two
    loss parameters; each float as two fp32 arguments (see :func:`split_float`); then the constexprs ``WRITE_LOSS, REDUCE, WRITE_DA, WRITE_DB, WRITE_DC, HAS_G,
    G_SCALAR, BLOCK_R, BLOCK_C, ROWS_I32, ACC`` and ``flags``. Absent operands and outputs pass the partial-sums
    buffer (never read or written). A forward with ``reduce`` and ``needs`` writes the gradients of the
    reduced loss in the same pass (each operand read once, each gradient written once).

    Args:
        kernel: the ``@triton.jit`` kernel.
        operands: three tensors expanded to one shape (stride-0 views for broadcast operands), or None.
        out_dtype: dtype of the loss for ``write_loss``.
        write_loss: write the elementwise loss (reduction 'none').
        reduce: write one fp32 (fp64) partial sum of the loss per program.
        needs: per operand, whether to write its gradient (in its dtype, at the shape).
        g: the upstream gradient expanded to the shape (a stride-0 view for one value), or None for 1.
        scale: multiplies the upstream gradient.
        params: the loss's two scalar parameters.
        flags: the kernel's loss-specific constexprs.

    Returns:
        ``(out, grads)``: the partial sums (``reduce``), the loss (``write_loss``) or None; and the
        three gradients (None where not needed), at the shape.
    """
    a = operands[0]
    shape = a.shape
    present = [t for t in operands if t is not None]
    acc = partials_dtype(out_dtype, *present)
    out = empty_like_layout(shape, a, out_dtype) if write_loss else None
    grads = [empty_like_layout(shape, a, t.dtype) if need else None for t, need in zip(operands, needs)]
    if a.numel() == 0:
        return (torch.zeros(0, dtype=acc, device=a.device) if reduce else out), grads
    outs = [o for o in (out, *grads) if o is not None]
    dims, outs, inputs, st = prepare(shape, outs, [*operands, g])
    it = iter(outs)
    out = next(it) if write_loss else None
    grads = [next(it) if t is not None else None for t in grads]
    R, block_r, block_c, n_prog = launch_geometry(dims, tile_for(max(t.element_size() for t in present)))
    part = torch.empty(n_prog if reduce else 1, dtype=acc, device=a.device)
    in_st = st[len(outs) :]
    gst = in_st[3]
    ptrs = [t if t is not None else part for t in (*inputs[:3], inputs[3], out, part, *grads)]
    with on_device(a):
        kernel[(n_prog,)](
            ptrs[0], *in_st[0], ptrs[1], *in_st[1], ptrs[2], *in_st[2], ptrs[3], *gst, *split_float(scale),
            *ptrs[4:], *(st[0] if outs else (0, 0, 0)), R, dims[1], dims[2], *split_float(params[0]),
            *split_float(params[1]),
            WRITE_LOSS=write_loss, REDUCE=reduce, WRITE_DA=bool(needs[0]), WRITE_DB=bool(needs[1]),
            WRITE_DC=bool(needs[2]), HAS_G=g is not None, G_SCALAR=g is not None and not any(gst),
            BLOCK_R=block_r, BLOCK_C=block_c, ROWS_I32=rows_i32(dims, block_r), ACC=tl_acc(acc), num_warps=NUM_WARPS,
            **flags,
        )  # fmt: skip
    return (part if reduce else out), grads


def partials_dtype(out_dtype: torch.dtype, *operands: torch.Tensor | None) -> torch.dtype:
    """The dtype of :func:`launch_fused`'s partial sums: fp64 when the loss or an operand is fp64, else fp32."""
    wide = out_dtype == torch.float64 or any(t is not None and t.dtype == torch.float64 for t in operands)
    return torch.float64 if wide else torch.float32


def fused_forward(kernel, operands: list, out_dtype: torch.dtype, reduce: bool, scale: float, g, needs: tuple,
                  params: tuple, **flags) -> tuple:  # fmt: skip
    """A family's ``<family>_fwd`` launcher on a :func:`launch_fused` kernel: ``(out, da, db, dc)``.

    Args:
        kernel: the ``@triton.jit`` kernel.
        operands: three tensors expanded to one shape, or None.
        out_dtype: dtype of the loss when not ``reduce``.
        reduce: per-program partial sums instead of the loss, and the gradients in ``needs``.
        scale: the reduced loss's factor (``1 / numel`` for 'mean', 1 for 'sum'); the gradients carry it.
        g: a one-element tensor the gradients are also multiplied by, or None.
        needs: which gradients to write (with ``reduce`` only).
        params: the loss's two scalar parameters.
        flags: the kernel's loss-specific constexprs (and launch options).
    """
    g = None if g is None else g.reshape(1).expand(operands[0].shape)
    needs = needs if reduce else (False,) * 3
    out, grads = launch_fused(kernel, operands, out_dtype, not reduce, reduce, needs, g, scale, params, **flags)
    return (out, *grads)


def fused_backward(kernel, operands: list, g: torch.Tensor, needs: tuple, params: tuple, **flags) -> tuple:
    """A family's ``<family>_bwd`` launcher: the gradients ``sum(g * loss)`` at the shape (None where not asked).

    ``g`` is the upstream gradient expanded to the shape; the rest as in :func:`fused_forward`.
    """
    _, grads = launch_fused(kernel, operands, operands[0].dtype, False, False, needs, g, 1.0, params, **flags)
    return tuple(grads)


@triton.jit
def store_fused(loss, da, db, dc, out_ptr, part_ptr, da_ptr, db_ptr, dc_ptr, i0, i1, cols, os0, os1, os2, mask,
                WRITE_LOSS: tl.constexpr, REDUCE: tl.constexpr, WRITE_DA: tl.constexpr, WRITE_DB: tl.constexpr,
                WRITE_DC: tl.constexpr):  # fmt: skip
    """Store what a :func:`launch_fused` kernel was asked for: loss tile, partial sum, gradient tiles."""
    offs = tile_offsets(i0, i1, cols, os0, os1, os2)
    if WRITE_LOSS:
        tl.store(out_ptr + offs, loss.to(out_ptr.dtype.element_ty), mask=mask)
    if REDUCE:
        total = tl.sum(tl.sum(tl.where(mask, loss, 0.0), 1), 0)
        tl.store(part_ptr + tl.program_id(0), total.to(part_ptr.dtype.element_ty))
    if WRITE_DA:
        tl.store(da_ptr + offs, da.to(da_ptr.dtype.element_ty), mask=mask)
    if WRITE_DB:
        tl.store(db_ptr + offs, db.to(db_ptr.dtype.element_ty), mask=mask)
    if WRITE_DC:
        tl.store(dc_ptr + offs, dc.to(dc_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fused_upstream(g_ptr, i0, i1, cols, gs0, gs1, gs2, mask, scale, ACC: tl.constexpr, HAS_G: tl.constexpr,
                   G_SCALAR: tl.constexpr):  # fmt: skip
    """The gradient factor of a tile's lanes: ``scale`` (ACC) times the upstream gradient (1 without ``HAS_G``).

    One load per program when the upstream gradient is one value (``G_SCALAR``). Each constexpr
    case assigns one variable (the compiler visits the statements after a taken ``return`` too, so
    returns of different shapes in constexpr branches do not compile).
    """
    if HAS_G:
        if G_SCALAR:
            g = tl.load(g_ptr).to(ACC) * scale
        else:
            g = load_tile(g_ptr, i0, i1, cols, gs0, gs1, gs2, mask, ACC) * scale
    else:
        g = scale
    return g


def split_float(v: float) -> tuple[float, float]:
    """``v`` as ``(hi, lo)`` fp32 values with ``hi + lo == v`` to about 2**-48 relative.

    Triton passes a Python float as fp32; a kernel accumulating in fp64 rebuilds ``v`` with
    :func:`joined` (``hi`` alone is ``v`` rounded to fp32, what torch computes fp32 data with).
    """
    try:
        hi = struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:
        hi = math.copysign(math.inf, v)
    lo = v - hi if math.isfinite(hi) else 0.0
    return hi, struct.unpack("f", struct.pack("f", lo))[0]


@triton.jit
def joined(hi, lo, ACC: tl.constexpr):
    """The scalar :func:`split_float` split, as ACC: ``hi + lo`` in fp64, ``hi`` in fp32.

    ``tl.cast``, not ``.to``: Triton's interpreter passes scalar arguments as Python floats. In fp32
    ``hi`` is the value rounded to fp32 (``hi + lo`` in fp32 matched it on 400,000 random values).
    """
    if ACC == tl.float64:  # noqa: SIM300
        return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    return tl.cast(hi, ACC)


# ---- the results of the elementwise families' torch.library ops (their TRACED launchers) -------


def op_loss(out: torch.Tensor, reduce: bool) -> torch.Tensor:
    """A forward op's result: the sum of the partial sums as ``(1,)`` (``reduce``), else the loss, contiguous."""
    return out.sum().reshape(1) if reduce else out.contiguous()


def fake_loss(x: torch.Tensor, reduce: bool, out_dtype: torch.dtype, acc: torch.dtype) -> torch.Tensor:
    """The fake of :func:`op_loss`: ``(1,)`` in ``acc`` (``reduce``), else ``x``'s shape in ``out_dtype``."""
    return x.new_empty(1, dtype=acc) if reduce else x.new_empty(x.shape, dtype=out_dtype)


def op_grads(grads, likes) -> tuple:
    """A backward op's results: each gradient contiguous, and for one not asked for (None) an empty
    tensor in its ``likes`` entry's dtype (a custom op returns no None)."""
    return tuple(t.new_empty(0) if d is None else d.contiguous() for d, t in zip(grads, likes))


def fake_grads(likes, needs, shape: torch.Size | None = None) -> tuple:
    """The fake of :func:`op_grads`: ``shape`` (each ``likes`` entry's own without it) where asked, else ``(0,)``."""
    return tuple(t.new_empty((t.shape if shape is None else shape) if need else (0,)) for t, need in zip(likes, needs))


def asked(grads, needs) -> tuple:
    """A backward op's gradients with those not asked for set back to None (what the eager launchers return)."""
    return tuple(d if need else None for d, need in zip(grads, needs))


def traced_fused(family: str, fwd_op, bwd_op) -> SimpleNamespace:
    """The ``TRACED`` namespace of a :func:`fused_forward` family from its two custom ops.

    Args:
        family: the family's name (``'regression'``): its launchers are ``<family>_fwd`` / ``<family>_bwd``.
        fwd_op: ``(a, b, c, *opts, reduce, out_dtype) -> loss or (1,) sum``.
        bwd_op: ``(a, b, c, *opts, g, need_a, need_b, need_c) -> three gradients`` (empty where not asked).

    Returns:
        ``FUSES_GRAD=False``, the two launchers with the eager signatures (no fused gradients), and a
        ``scale_`` that raises (nothing is fused while tracing).
    """

    def fwd(a, b, c, opts, reduce, out_dtype, scale=1.0, g=None, needs=(False, False, False)):
        return fwd_op(a, b, c, *opts, reduce, out_dtype), None, None, None

    def bwd(a, b, c, opts, g, needs):
        return asked(bwd_op(a, b, c, *opts, g, *needs), needs)

    def scale_(grad: torch.Tensor, factor: torch.Tensor) -> None:
        raise RuntimeError(f"{family}: no fused gradients are made while tracing (FUSES_GRAD is False)")

    return SimpleNamespace(FUSES_GRAD=False, **{f"{family}_fwd": fwd, f"{family}_bwd": bwd}, scale_=scale_)
