"""AOT cases of ``kernels/embedding.py``: the (8192, 4096) launches first, then every flag and block shape."""

from __future__ import annotations

from itertools import product

import triton.language as tl

from triton_losses.kernels import embedding as k
from triton_losses.kernels._common import launch_config

from ._case import DTYPES, FLOAT_NAMES, ROWS, case, reachable

DIM = 4096
_NORMS = (2, 1, 0, 3)  # NORM: p = 2, p = 1, p = inf, any other p


def _ptrs(x: str) -> dict[str, str]:
    acc = "fp64" if x == "fp64" else "fp32"
    return dict(a_ptr=x, b_ptr=x, p_ptr=x, n_ptr=x, y_ptr="i64", f_ptr=acc, loss_ptr=acc,
                ga_ptr=x, gb_ptr=x, gp_ptr=x, gn_ptr=x)  # fmt: skip


def _scalars(D: int, contiguous: bool = True) -> dict:
    """``ROWS`` rows of ``D`` features (row-major, or column-major when not ``contiguous``)."""
    s_r, s_c = (D, 1) if contiguous else (1, ROWS)
    strides = {f"s_{t}{d}": v for t in "abpn" for d, v in (("r", s_r), ("c", s_c))}
    return dict(R=ROWS, D=D, s_y=1, s_f=0, margin_hi=1.0, margin_lo=0.0, p_hi=2.0, p_lo=0.0, eps_hi=1e-6,
                eps_lo=0.0, **strides)  # fmt: skip


def _cases(name: str, D: int, contiguous: bool, launch: str, all_flags: bool):
    acc = tl.float64 if name == "fp64" else tl.float32
    size = DTYPES[name].itemsize
    writes = [(True, False), (True, True), (False, True)]
    block_r, block_c, warps = launch_config(D, size, contiguous)
    common = dict(ptrs=_ptrs(name), scalars=_scalars(D, contiguous), launch=launch)
    tile = dict(ONE_BLOCK=block_c >= D, BLOCK_R=block_r, BLOCK_C=block_c, ACC=acc)
    for loss, grad in writes if all_flags else writes[1:2]:
        flags = dict(WRITE_LOSS=loss, WRITE_GRAD=grad, **tile)
        yield case(k._cosine_kernel, constexprs=flags, num_warps=warps, **common)
    block_r, block_c, warps = k.triplet_config(D, size, contiguous)
    tile = dict(ONE_BLOCK=block_c >= D, BLOCK_R=block_r, BLOCK_C=block_c, ACC=acc)
    for norm, swap, (loss, grad) in product(_NORMS, (False, True), writes if all_flags else writes[1:2]):
        if not all_flags and (norm, swap) not in ((2, False), (0, True)):
            continue
        flags = dict(NORM=norm, SWAP=swap, WRITE_LOSS=loss, WRITE_GRAD=grad, **tile)
        yield case(k._triplet_kernel, constexprs=flags, num_warps=warps, **common)


def cases():
    """fp32 and bf16 (8192, 4096) with every flag first (smoke: the cosine forward), then every block shape."""
    seen = set()
    for c in _all():
        if c.key not in seen:
            seen.add(c.key)
            yield c


def _all():
    for name in ("fp32", "bf16"):
        yield from _cases(name, DIM, True, f"{ROWS}x{DIM}", all_flags=True)
    for name in FLOAT_NAMES.values():
        size = DTYPES[name].itemsize
        configs = reachable(launch_config, size, split=lambda cfg, D: (cfg[1] >= D,))
        configs.update(reachable(k.triplet_config, size, split=lambda cfg, D: (cfg[1] >= D,)))
        for _, (D, contiguous) in sorted(configs.items()):
            yield from _cases(name, D, contiguous, f"D={D},{'rows' if contiguous else 'cols'}", all_flags=False)
