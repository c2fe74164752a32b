"""AOT cases of ``kernels/distill.py``, recorded from its launchers: every flag at the LM launch, every row block."""

from __future__ import annotations

from functools import partial

from triton_losses.kernels import distill as k
from triton_losses.kernels._common import launch_config

from ._case import DTYPES, FLOAT_NAMES, ODD_VOCAB, ROWS, VOCAB, launched, meta, reachable

GRADS = ((False, False), (True, False), (False, True), (True, True))  # which inputs get a gradient
# (only the full set, GRADS itself, also records the backward launches)


def _rows(dtype: str, V: int, labels: bool):
    """Two ``(ROWS, 1, V)`` row views, the ``(ROWS, 1)`` labels (or None), and both gradient scales."""
    acc = "fp64" if dtype == "fp64" else "fp32"
    a, b = meta(ROWS, 1, V, dtype=dtype), meta(ROWS, 1, V, dtype=dtype)
    return a, b, meta(ROWS, 1, dtype="i64") if labels else None, meta(1, dtype=acc), meta(ROWS, dtype=acc)


def _jsd(dtype: str, V: int, labels: bool, beta: float, name: str, io: bool, grads=GRADS):
    a, b, lab, one, per_row = _rows(dtype, V, labels)
    for ga, gb in grads:
        fwd = partial(k.jsd_fwd, a, b, lab, beta, -100, one, ga, gb)
        yield from launched(k._jsd_kernel, fwd, name=name, vector_io=("load",) if io else ())
        if (ga or gb) and grads is GRADS:
            bwd = partial(k.jsd_bwd, a, b, lab, beta, -100, per_row, ga, gb)
            yield from launched(k._jsd_kernel, bwd, name=name, vector_io=("load", "store") if io else ())


def _kd(dtype: str, V: int, labels: bool, name: str, io: bool, grads=GRADS):
    a, b, lab, one, per_row = _rows(dtype, V, labels)
    stats = meta(5, ROWS, dtype="fp64" if dtype == "fp64" else "fp32")
    for ds, dt in grads:
        fwd = partial(k.kd_fwd, a, b, lab, 0.5, -100, one, ds, dt)
        yield from launched(k._kd_kernel, fwd, name=name, vector_io=("load",) if io else ())
        if (ds or dt) and grads is GRADS:
            bwd = partial(k.kd_bwd, a, b, lab, 0.5, -100, stats, per_row, ds, dt)
            yield from launched(k._kd_kernel, bwd, name=name, vector_io=("load", "store") if io else ())


def cases():
    """Every flag of both kernels at bf16 rows of an LM vocabulary (smoke first) and of an odd one, then every row
    block per dtype."""
    lm = f"{ROWS}x{VOCAB}"
    for labels in (True, False):
        yield from _kd("bf16", VOCAB, labels, lm, io=True)
        for beta in (0.5, 0.0, 1.0):
            yield from _jsd("bf16", VOCAB, labels, beta, lm, io=True)
    odd = f"{ROWS}x{ODD_VOCAB}"  # rows not 16-byte aligned: split (ALIGN = 8), 128-bit accesses still
    yield from _kd("bf16", ODD_VOCAB, True, odd, io=True)
    for beta in (0.5, 0.0):
        yield from _jsd("bf16", ODD_VOCAB, True, beta, odd, io=True)
    rows_config = lambda C, elem_size, contiguous: launch_config(C, elem_size, True)  # the launcher's call
    for dtype in FLOAT_NAMES.values():
        for V, _ in sorted(set(reachable(rows_config, DTYPES[dtype].itemsize).values())):
            # The flags only add stores or skip a pass: one launch per kernel (forward + fused gradient).
            yield from _kd(dtype, V, True, f"{ROWS}x{V}", io=False, grads=GRADS[1:2])
            yield from _jsd(dtype, V, True, 0.5, f"{ROWS}x{V}", io=False, grads=GRADS[1:2])
