"""AOT cases of ``kernels/margin.py``, recorded from its launchers: every loss at the common launch, every block
shape of every dtype for margin ranking."""

from __future__ import annotations

from functools import partial
from itertools import product

from triton_losses.kernels import margin as k
from triton_losses.kernels._elementwise import tile_for
from triton_losses.options import MarginOptions

from ._case import DTYPES, FLOAT_NAMES, elementwise_shapes, launched, meta, upstream

# loss -> the gradient sets a call asks for (soft margin and hinge: the input only).
GRADS = {
    "soft_margin": [(True, False, False)],
    "hinge": [(True, False, False)],
    "ranking": [(True, False, False), (True, True, False), (True, True, True)],
}


def _launches(dtype: str, name: str, geometry: dict, loss: str, grads, scalars):
    a, b = (meta(*geometry["shape"], dtype=dtype, row_stride=geometry.get("row_stride")) for _ in range(2))
    c = meta(*geometry["shape"], dtype=dtype) if loss == "ranking" else None
    opts = MarginOptions(loss, 0.0 if loss == "soft_margin" else 0.5)
    io = ("load",) if geometry.get("row_stride") is None else ()
    yield from launched(k._margin_kernel, partial(k.margin_fwd, a, b, c, opts, False, a.dtype), name=name, vector_io=io)
    for needs in [(False, False, False), *grads]:  # 'mean' / 'sum': the loss's partial sums and fused gradients
        fwd = partial(k.margin_fwd, a, b, c, opts, True, a.dtype, 1.0 / a.numel(), None, needs)
        yield from launched(k._margin_kernel, fwd, name=name, vector_io=io)
    for needs, scalar in product(grads, scalars):
        bwd = partial(k.margin_bwd, a, b, c, opts, upstream(a, scalar), needs)
        yield from launched(k._margin_kernel, bwd, name=name, vector_io=io)


def cases():
    """Every loss at a bf16 ROWS x ROWS launch (smoke first), then every block shape of every dtype."""
    name, geometry = elementwise_shapes(tile_for(2))[0]
    for loss, grads in GRADS.items():
        yield from _launches("bf16", name, geometry, loss, grads, (True, False))
    for dtype in FLOAT_NAMES.values():
        for i, (name, geometry) in enumerate(elementwise_shapes(tile_for(DTYPES[dtype].itemsize))):
            scalars = (True, False) if i == 0 else (False,)
            yield from _launches(dtype, name, geometry, "ranking", GRADS["ranking"][:1], scalars)
