"""AOT cases of ``kernels/regression.py``, recorded from its launchers: every loss and flag at the common launch,
every block shape of every dtype for the most common loss (mse)."""

from __future__ import annotations

from functools import partial
from itertools import product

from triton_losses.kernels import regression as k
from triton_losses.kernels._elementwise import tile_for
from triton_losses.options import RegressionOptions

from ._case import DTYPES, FLOAT_NAMES, elementwise_shapes, launched, meta, upstream

# (loss options, third operand): weight for l1 / mse / huber, var for gaussian.
VARIANTS = [
    (RegressionOptions("mse"), False),
    (RegressionOptions("mse"), True),
    (RegressionOptions("l1"), False),
    (RegressionOptions("l1"), True),
    (RegressionOptions("smooth_l1", 0.5), False),
    (RegressionOptions("huber", 0.5), False),
    (RegressionOptions("huber", 0.5), True),
    *((RegressionOptions("poisson", 1e-8, 0.0, full, log), False) for full, log in product((False, True), repeat=2)),
    *(
        (RegressionOptions("gaussian", 1e-6, 0.0 if v else 0.5, full), v)
        for full, v in product((False, True), repeat=2)
    ),
]


def _grads(opts: RegressionOptions, has_v: bool) -> list[tuple[bool, bool, bool]]:
    """The gradient sets a call asks for: input, input and target, and (gaussian) var too."""
    out = [(True, False, False), (True, True, False)]
    return [*out, (True, True, True)] if opts.loss == "gaussian" and has_v else out


def _launches(dtype: str, name: str, geometry: dict, opts: RegressionOptions, has_v: bool, grads, scalars):
    x, y = (meta(*geometry["shape"], dtype=dtype, row_stride=geometry.get("row_stride")) for _ in range(2))
    v = meta(*geometry["shape"], dtype=dtype) if has_v else None
    io = ("load",) if geometry.get("row_stride") is None else ()
    fwd_options = {"debug": True, "sanitize_overflow": False} if opts.loss == "gaussian" and has_v else {}
    n = x.numel()
    yield from launched(k._regression_kernel, partial(k.regression_fwd, x, y, v, opts, False, x.dtype),
                        name=name, options=fwd_options, vector_io=io)  # fmt: skip
    weight_mean = has_v and opts.loss in ("l1", "mse")  # 'mean' divides by sum(weight): one value on the device
    g = meta(1, dtype="fp64" if dtype == "fp64" else "fp32") if weight_mean else None
    for needs in [(False, False, False), *grads]:  # 'mean' / 'sum': the loss's partial sums and fused gradients
        fwd = partial(k.regression_fwd, x, y, v, opts, True, x.dtype, 1.0 / n, g, needs)
        yield from launched(k._regression_kernel, fwd, name=name, options=fwd_options, vector_io=io)
    for needs, scalar in product(grads, scalars):
        bwd = partial(k.regression_bwd, x, y, v, opts, upstream(x, scalar), needs)
        yield from launched(k._regression_kernel, bwd, name=name, vector_io=io)


def cases():
    """Every loss and flag at a bf16 ROWS x ROWS launch (smoke first), then every block shape of every dtype."""
    name, geometry = elementwise_shapes(tile_for(2))[0]
    for opts, has_v in VARIANTS:
        yield from _launches("bf16", name, geometry, opts, has_v, _grads(opts, has_v), (True, False))
    for dtype in FLOAT_NAMES.values():
        for i, (name, geometry) in enumerate(elementwise_shapes(tile_for(DTYPES[dtype].itemsize))):
            scalars = (True, False) if i == 0 else (False,)
            yield from _launches(
                dtype, name, geometry, RegressionOptions("mse"), False, [(True, False, False)], scalars
            )
