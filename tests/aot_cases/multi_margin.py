"""AOT cases of ``kernels/multi_margin.py``: the (8192, 4096) launches first, then every flag and block shape."""

from __future__ import annotations

from itertools import product

import triton.language as tl

from triton_losses.kernels import multi_margin as k
from triton_losses.kernels._common import launch_config

from ._case import DTYPES, FLOAT_NAMES, ROWS, case, reachable

CLASSES = 4096
# The compile options the margin launchers add on CUDA (device-side target asserts kept).
ASSERTS = dict(debug=True, sanitize_overflow=False)


def _ptrs(x: str, t: str = "fp32") -> dict[str, str]:
    acc = "fp64" if x == "fp64" else "fp32"
    return dict(x_ptr=x, t_ptr=t, w_ptr=x, y_ptr="i64", f_ptr=acc, loss_ptr=acc, gx_ptr=x, gt_ptr=t)


def _scalars(C: int, contiguous: bool = True) -> dict:
    """``ROWS`` rows of ``C`` classes (row-major, or column-major when not ``contiguous``)."""
    s_r, s_c = (C, 1) if contiguous else (1, ROWS)
    return dict(
        R=ROWS, C=C, s_xr=s_r, s_xc=s_c, s_tr=s_r, s_tc=s_c, s_wr=0, s_wc=1, s_w=1, s_y=1, s_yr=s_r, s_yc=s_c,
        s_f=0, margin_hi=1.0, margin_lo=0.0,
    )  # fmt: skip


def _acc(name: str):
    return tl.float64 if name == "fp64" else tl.float32


def _mlm(name: str, C: int, contiguous: bool, write_loss: bool, write_grad: bool):
    acc_bytes = DTYPES["fp64" if name == "fp64" else "fp32"].itemsize
    block_c, block_k, nb, warps = k.mlm_config(C, acc_bytes)
    flags = dict(WRITE_LOSS=write_loss, WRITE_GRAD=write_grad, BITMAP=k.mlm_bitmap_max(acc_bytes) >= C, NB=nb,
                 BLOCK_C=block_c, BLOCK_K=block_k, ACC=_acc(name))  # fmt: skip
    return case(k._mlm_kernel, ptrs=_ptrs(name), scalars=_scalars(C, contiguous), constexprs=flags,
                num_warps=warps, options=ASSERTS, launch=f"{ROWS}x{C}")  # fmt: skip


def _row_cases(name: str, C: int, contiguous: bool, launch: str, all_flags: bool):
    block_r, block_c, warps = launch_config(C, DTYPES[name].itemsize, contiguous)
    tile = dict(BLOCK_R=block_r, BLOCK_C=block_c, ACC=_acc(name))
    common = dict(ptrs=_ptrs(name), scalars=_scalars(C, contiguous), num_warps=warps, launch=launch)
    writes = [(True, False), (True, True), (False, True)]
    for p, weight, (loss, grad) in product((1, 2), (False, True), writes):
        if all_flags or ((p == 2) == weight and (loss, grad) == (True, True)):
            flags = dict(P=p, HAS_WEIGHT=weight, WRITE_LOSS=loss, WRITE_GRAD=grad, **tile)
            yield case(k._mm_kernel, constexprs=flags, options=ASSERTS, **common)
    block_r, block_c, warps = k.mlsm_config(C, DTYPES[name].itemsize, contiguous)
    tile = dict(BLOCK_R=block_r, BLOCK_C=block_c, ACC=_acc(name))
    common = dict(ptrs=_ptrs(name), scalars=_scalars(C, contiguous), num_warps=warps, launch=launch)
    gwrites = [
        (True, True, False),
        (True, False, False),
        (True, True, True),
        (False, True, False),
        (False, False, True),
    ]
    for weight, (loss, gx, gt) in product((False, True), gwrites if all_flags else gwrites[:1]):
        if all_flags or not weight:
            flags = dict(HAS_WEIGHT=weight, WRITE_LOSS=loss, WRITE_GX=gx, WRITE_GT=gt, **tile)
            yield case(k._mlsm_kernel, constexprs=flags, **common)


def _all():
    for loss, grad in ((True, True), (True, False), (False, True)):
        yield _mlm("fp32", CLASSES, True, loss, grad)
    for name in ("bf16", "fp32"):
        yield from _row_cases(name, CLASSES, True, f"{ROWS}x{CLASSES}", all_flags=True)
    for name in FLOAT_NAMES.values():
        configs = reachable(launch_config, DTYPES[name].itemsize)
        configs.update(reachable(k.mlsm_config, DTYPES[name].itemsize))
        for _, (C, contiguous) in sorted(configs.items()):
            yield from _row_cases(name, C, contiguous, f"C={C},{'rows' if contiguous else 'cols'}", all_flags=False)
        bitmap_max = k.mlm_bitmap_max(DTYPES[name].itemsize)
        for C in (16, 256, CLASSES + 1, bitmap_max, 2 * bitmap_max):  # every block shape, bitmap or not
            yield _mlm(name, C, True, True, True)


def cases():
    """fp32 (8192, 4096) first (smoke: the multilabel margin forward with its fused gradient), each case once."""
    seen = set()
    for c in _all():
        if c.key not in seen:
            seen.add(c.key)
            yield c
