"""AOT cases of ``kernels/kl_div.py``, recorded from its launchers: both targets at the common launch, every block."""

from __future__ import annotations

from functools import partial
from itertools import product

from triton_losses.kernels import kl_div as k
from triton_losses.kernels._elementwise import tile_for

from ._case import DTYPES, FLOAT_NAMES, ROWS, elementwise_shapes, launched, meta, upstream

GRADS = ((True, False), (False, True), (True, True))  # (need_dx, need_dy)


def _launches(dtype: str, name: str, geometry: dict, log_target: bool, grads, scalars):
    x, y = (meta(*geometry["shape"], dtype=dtype, row_stride=geometry.get("row_stride")) for _ in range(2))
    io = ("load",) if geometry.get("row_stride") is None else ()
    for reduce in (False, True):
        fwd = partial(k.kl_fwd, x, y, log_target, reduce, ROWS)
        yield from launched(k._kl_fwd_kernel, fwd, name=name, vector_io=io)
    for (dx, dy), scalar in product(grads, scalars):
        bwd = partial(k.kl_bwd, x, y, log_target, upstream(x, scalar), dx, dy)
        yield from launched(k._kl_bwd_kernel, bwd, name=name, vector_io=io)


def cases():
    """Both targets at a bf16 ROWS x ROWS launch (smoke first), then every block shape of every dtype."""
    name, geometry = elementwise_shapes(tile_for(2))[0]
    for log_target in (False, True):
        yield from _launches("bf16", name, geometry, log_target, GRADS, (True, False))
    for dtype in FLOAT_NAMES.values():
        for i, (name, geometry) in enumerate(elementwise_shapes(tile_for(DTYPES[dtype].itemsize))):
            yield from _launches(dtype, name, geometry, False, GRADS[:1], (True, False) if i == 0 else (False,))
