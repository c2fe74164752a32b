"""AOT cases of ``kernels/logprobs.py``: every flag at the LM launch, every block configuration per dtype."""

from __future__ import annotations

import triton.language as tl

from triton_losses.kernels import logprobs as k
from triton_losses.kernels._common import launch_config, row_align

from ._case import ASSERT_OPTIONS, DTYPES, FLOAT_NAMES, ODD_VOCAB, ROWS, VOCAB, case, meta, reachable

_GRAD_FLAGS = ((True, False), (True, True), (False, True))  # (HAS_GLP, HAS_GENT)


def _ptrs(x: str) -> dict[str, str]:
    acc = "fp64" if x == "fp64" else "fp32"
    rows = dict.fromkeys(("logp_ptr", "ent_ptr", "max_ptr", "sum_ptr", "glp_ptr", "gent_ptr", "temp_ptr"), acc)
    return dict(x_ptr=x, g_ptr=x, tok_ptr="i64", **rows)


def _scalars(V: int, contiguous: bool = True) -> dict:
    """Scalar arguments for ``ROWS`` rows of ``V`` logits (row-major, or column-major when not ``contiguous``)."""
    s_r, s_c = (V, 1) if contiguous else (1, ROWS)
    return dict(R=ROWS, V=V, s_xr=s_r, s_xc=s_c, s_gr=V, s_gc=1, s_tok=1)


def _launch_cases(name: str, V: int, contiguous: bool, launch: str, all_flags: bool):
    """Forward and backward kernels of one launch: every flag combination, or one of each."""
    block_r, block_c, warps = launch_config(V, DTYPES[name].itemsize, contiguous)
    acc = tl.float64 if name == "fp64" else tl.float32
    x = meta(ROWS, V, dtype=name) if contiguous else meta(V, ROWS, dtype=name).t()
    align = row_align(x[:, :, None], block_r, x[:, :, None])  # > 1: odd rows split for 16-byte accesses
    tile = dict(BLOCK_R=block_r, BLOCK_C=block_c, ACC=acc, ALIGN=align)
    common = dict(
        ptrs=_ptrs(name), scalars=_scalars(V, contiguous), num_warps=warps, launch=launch, options=ASSERT_OPTIONS
    )  # the token range assert on CUDA
    aligned = contiguous and V * DTYPES[name].itemsize % 16 == 0  # rows start on 16-byte boundaries
    io = ("load", "store") if aligned or align > 1 else ()
    for entropy in (True, False) if all_flags else (True,):
        yield case(k._logprobs_fwd_kernel, constexprs=dict(ENTROPY=entropy, **tile), vector_io=io[:1], **common)
    for glp, gent in _GRAD_FLAGS if all_flags else _GRAD_FLAGS[1:2]:
        yield case(k._logprobs_bwd_kernel, constexprs=dict(HAS_GLP=glp, HAS_GENT=gent, **tile), vector_io=io, **common)


def cases():
    """The bf16 LM launch first (smoke), an unaligned vocabulary, then every reachable block configuration."""
    yield from _launch_cases("bf16", VOCAB, True, f"{ROWS}x{VOCAB}", all_flags=True)
    yield from _launch_cases("bf16", ODD_VOCAB, True, f"{ROWS}x{ODD_VOCAB}", all_flags=False)
    for name in FLOAT_NAMES.values():
        for _config, (V, contiguous) in sorted(reachable(launch_config, DTYPES[name].itemsize).items()):
            launch = f"V={V},{'rows' if contiguous else 'cols'}"
            yield from _launch_cases(name, V, contiguous, launch, all_flags=False)
