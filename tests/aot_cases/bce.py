"""AOT cases of ``kernels/bce.py``, recorded from its launchers: every flag at the common launch, every block shape."""

from __future__ import annotations

from functools import partial
from itertools import product

from triton_losses.kernels import bce as k
from triton_losses.kernels._elementwise import tile_for

from ._case import ASSERT_OPTIONS, DTYPES, FLOAT_NAMES, ROWS, elementwise_shapes, launched, meta, upstream

GRADS = ((True, False), (False, True), (True, True))  # (need_dx, need_dy)


def _operands(dtype: str, shape: tuple, row_stride: int | None, weight: bool, pos: bool):
    x, y = (meta(*shape, dtype=dtype, row_stride=row_stride) for _ in range(2))
    w = meta(shape[-1], dtype=dtype).expand(shape) if weight else None  # a (C,) weight broadcast over rows
    pw = meta(shape[-1], dtype=dtype).expand(shape) if pos else None
    return x, y, w, pw


def _launches(dtype: str, name: str, geometry: dict, logits: bool, weight: bool, pos: bool, grads, scalars):
    x, y, w, pw = _operands(dtype, geometry["shape"], geometry.get("row_stride"), weight, pos)
    fwd_options = {} if logits else ASSERT_OPTIONS  # the probability range assert on CUDA
    io = ("load",) if geometry.get("row_stride") is None else ()
    for reduce in (False, True):
        yield from launched(k._bce_fwd_kernel, partial(k.bce_fwd, x, y, w, pw, logits, reduce, ROWS * ROWS),
                            name=name, options=fwd_options, vector_io=io)  # fmt: skip
    for (dx, dy), scalar in product(grads, scalars):
        g = upstream(x, scalar)
        yield from launched(k._bce_bwd_kernel, partial(k.bce_bwd, x, y, w, pw, logits, g, 1e-12, dx, dy),
                            name=name, vector_io=io)  # fmt: skip


def cases():
    """Every flag at a bf16 ROWS x ROWS launch (smoke first), then every block shape of every dtype."""
    common = elementwise_shapes(tile_for(2))[0]
    for logits, weight, pos in product((True, False), repeat=3):
        if pos and not logits:
            continue
        yield from _launches("bf16", common[0], common[1], logits, weight, pos, GRADS, (True, False))
    for dtype in FLOAT_NAMES.values():
        for i, (name, geometry) in enumerate(elementwise_shapes(tile_for(DTYPES[dtype].itemsize))):
            scalars = (True, False) if i == 0 else (False,)
            yield from _launches(dtype, name, geometry, True, False, False, GRADS[:1], scalars)
