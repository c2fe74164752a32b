"""Addressing, math helpers and the launch policy shared by the elementwise loss kernels (BCE, KL).

An elementwise loss runs over the broadcast shape of its operands. On the host, ``plan`` orders
the dimensions by the output's layout, drops size-1 dimensions and merges neighbours that every
operand addresses contiguously, so that any broadcast (stride-0) or strided view becomes at most
three dimensions ``(D0, D1, D2)``; nothing is copied. A kernel program covers a tile of
``BLOCK_R`` rows (of the ``D0 * D1`` rows) by ``BLOCK_C`` columns (of ``D2``), so integer division
happens once per row, not once per element. All offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements per program: one tile of BLOCK_R * BLOCK_C lanes, 16 per thread at 8 warps; fp64 values
# take two registers each, and at 4096 the fp64 kernels spilled 40-48 bytes (tests/test_aot_compile.py).
TILE = 4096
TILE_FP64 = 2048
NUM_WARPS = 8
MAX_DIMS = 3


@triton.jit
def tile_coords(R, D1, D2, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile: row coordinates ``(i0, i1)`` (BLOCK_R,), columns (BLOCK_C,), mask."""
    pid = tl.program_id(0).to(tl.int64)
    n_cb = tl.cdiv(D2, BLOCK_C)
    rb = pid // n_cb
    cb = pid - rb * n_cb
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask = (rows < R)[:, None] & (cols < D2)[None, :]
    i0 = rows // D1
    i1 = rows - i0 * D1
    return i0, i1, cols, mask


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


def acc_dtype(dtype: torch.dtype):
    """Triton accumulation dtype: fp64 for fp64 data, fp32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def tile_for(elem_size: int) -> int:
    """Lanes per program for elements of ``elem_size`` bytes."""
    return TILE_FP64 if elem_size == 8 else TILE


def block_config(D2: int, tile: int = TILE) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_C)`` for rows of ``D2`` columns: one ``tile`` of lanes per program.

    ``BLOCK_C`` is the power of 2 at or above ``D2`` (at most ``tile``), so narrow rows share a
    program; at worst half the lanes idle (the kernels are memory-bound).
    """
    block_c = 1
    while block_c < min(D2, tile):
        block_c *= 2
    return tile // block_c, block_c


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
    out = empty_like_layout(shape, x, x.dtype)
    if x.numel() == 0:
        return torch.zeros(0, dtype=acc, device=x.device) if reduce else out
    dims, (out,), inputs, st = prepare(shape, [out], inputs)
    R, block_r, block_c, n_prog = launch_geometry(dims, tile_for(x.element_size()))
    part = torch.empty(n_prog if reduce else 1, dtype=acc, device=x.device)
    kernel[(n_prog,)](
        *_operand_args(inputs, st[1:], out), out, *st[0], part, R, dims[1], dims[2],
        REDUCE=reduce, BLOCK_R=block_r, BLOCK_C=block_c, ACC=acc_dtype(x.dtype), num_warps=NUM_WARPS, **flags,
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
    kernel[(n_prog,)](
        *_operand_args(inputs, st[-len(inputs) :], x), dx if need_dx else dy, dy if need_dy else dx, *st[0],
        R, dims[1], dims[2],
        WRITE_DX=need_dx, WRITE_DY=need_dy, BLOCK_R=block_r, BLOCK_C=block_c, ACC=acc_dtype(x.dtype),
        num_warps=NUM_WARPS, **flags,
    )  # fmt: skip
    return dx, dy


def launch_geometry(dims: tuple[int, int, int], tile: int = TILE) -> tuple[int, int, int, int]:
    """``(R, BLOCK_R, BLOCK_C, n_programs)`` for collapsed dims ``(D0, D1, D2)``."""
    D0, D1, D2 = dims
    R = D0 * D1
    block_r, block_c = block_config(D2, tile)
    return R, block_r, block_c, triton.cdiv(R, block_r) * triton.cdiv(D2, block_c)
