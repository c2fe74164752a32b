"""AOT cases of ``kernels/softmax.py``: the LM launch, then every reachable block configuration per dtype."""

from __future__ import annotations

import triton.language as tl

from triton_losses.kernels import softmax as k
from triton_losses.kernels._common import launch_config, row_align

from ._case import DTYPES, FLOAT_NAMES, KDIM_B, ODD_VOCAB, ROWS, VOCAB, case, meta, reachable, strides


def _ptrs(x: str) -> dict[str, str]:
    return dict(x_ptr=x, y_ptr=x, g_ptr=x, d_ptr=x, stats_ptr="fp64" if x == "fp64" else "fp32")


def _scalars(C: int, B: int = 1) -> dict:
    """``ROWS`` contiguous rows of length ``C`` seen as ``(A, C, B)``; output and gradients contiguous too."""
    return dict(
        R=ROWS, C=C, B=B, **strides("x", C, B), **strides("y", C, B), **strides("g", C, B), **strides("d", C, B)
    )


def _pair(dtype: str, C: int, B: int, config: tuple, one_block: bool, launch: str, vector_io=(), bwd=True):
    """Forward (and backward) of softmax and log_softmax at one launch (``ALIGN`` as the launchers choose it)."""
    block_r, block_c, warps = config
    x = meta(ROWS // B, C, B, dtype=dtype)
    align = 1 if one_block else row_align(x, block_r, x)
    for log in (True, False):
        acc = tl.float64 if dtype == "fp64" else tl.float32
        flags = dict(LOG=log, BLOCK_R=block_r, BLOCK_C=block_c, ACC=acc, ALIGN=align)
        common = dict(ptrs=_ptrs(dtype), scalars=_scalars(C, B), num_warps=warps, launch=launch, vector_io=vector_io)
        yield case(k._softmax_fwd_kernel, constexprs=dict(flags, ONE_BLOCK=one_block), **common)
        if bwd:
            yield case(k._softmax_bwd_kernel, constexprs=dict(flags, ALIGN=row_align(x, block_r, x, x)), **common)


def cases():
    """bf16 rows of an LM vocabulary first (smoke: log_softmax forward), then every configuration per dtype."""
    config = launch_config(VOCAB, 2, True)
    yield from _pair("bf16", VOCAB, 1, config, config[1] >= VOCAB, f"{ROWS}x{VOCAB}", ("load", "store"))
    config = launch_config(ODD_VOCAB, 2, True)  # rows not 16-byte aligned: split (ALIGN = 8), 128-bit accesses still
    yield from _pair("bf16", ODD_VOCAB, 1, config, False, f"{ROWS}x{ODD_VOCAB}", ("load", "store"))
    for name in FLOAT_NAMES.values():
        configs = reachable(launch_config, DTYPES[name].itemsize, split=lambda cfg, C: (cfg[1] >= C,))
        seen = set()  # the backward has no ONE_BLOCK: once per configuration
        for (*config, one_block), (C, contiguous) in sorted(configs.items()):
            B = 1 if contiguous else KDIM_B
            yield from _pair(name, C, B, tuple(config), one_block, f"C={C},B={B}", bwd=tuple(config) not in seen)
            seen.add(tuple(config))
