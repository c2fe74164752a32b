"""AOT cases of ``kernels/ctc.py``: the bench launches first, then every reachable block configuration per dtype."""

from __future__ import annotations

import triton.language as tl

from triton_losses.kernels import ctc as k
from triton_losses.kernels._common import next_pow2

from ._case import ASSERT_OPTIONS, DTYPES, FLOAT_NAMES, case

# The bench shapes (T, N, C, S): speech-like and a large-vocabulary CTC head.
BENCH = ((1000, 32, 1024, 200), (300, 64, 10000, 80))


def _ptrs(x: str) -> dict[str, str]:
    acc = "fp64" if x == "fp64" else "fp32"
    return dict(lp_ptr=x, g_ptr=x, t_ptr="i64", off_ptr="i64", il_ptr="i64", tl_ptr="i64", perm_ptr="i64",
                srt_ptr="i64", alpha_ptr=acc, nll_ptr=acc, q_ptr=acc, gs_ptr=acc)  # fmt: skip


def _scalars(T: int, N: int, C: int, L: int) -> dict:
    """Contiguous ``(T, N, C)`` log-probabilities, padded ``(N, L)`` targets."""
    return dict(s_lt=N * C, s_ln=C, s_lc=1, n_tgt=N * L, T=T, N=N, C=C, L=L, blank=0)


def _recursions(x: str, T: int, N: int, C: int, L: int, launch: str):
    """The alpha and beta kernels as the launchers configure them for target length bound ``L``."""
    block_s = max(16, next_pow2(2 * L + 1))
    acc = tl.float64 if x == "fp64" else tl.float32
    # One program per sequence: a launch has N programs, so one resident per SM is all it relies on.
    common = dict(ptrs=_ptrs(x), scalars=_scalars(T, N, C, L), num_warps=k._recursion_warps(block_s), launch=launch,
                  programs_per_sm=1, options=ASSERT_OPTIONS)  # the target range assert on CUDA  # fmt: skip
    yield case(k._ctc_alpha_kernel, constexprs=dict(BLOCK_S=block_s, ACC=acc), **common)
    yield case(k._ctc_beta_kernel, constexprs=dict(BLOCK_S=block_s, BLOCK_L=max(16, next_pow2(L)), ACC=acc), **common)


def _grad(x: str, T: int, N: int, C: int, L: int, launch: str, zero_inf: bool):
    """The gradient-row kernel as the launcher configures it for ``C`` classes and bound ``L``."""
    block_c = min(k._ROW_TILE[{"fp64": 8, "fp32": 4}.get(x, 2)], max(128, next_pow2(C)))
    flags = dict(ZERO_INF=zero_inf, BLOCK_C=block_c, BLOCK_Q=max(16, next_pow2(L + 1)),
                 ACC=tl.float64 if x == "fp64" else tl.float32)  # fmt: skip
    yield case(k._ctc_grad_kernel, ptrs=_ptrs(x), scalars=_scalars(T, N, C, L), constexprs=flags,
               num_warps=k._grad_warps(block_c, L), launch=launch)  # fmt: skip


def cases():
    """fp32 bench launches (smoke: the first alpha kernel), then every state / class block per dtype."""
    for T, N, C, S in BENCH:
        launch = f"T{T}xN{N}xC{C}xS{S}"
        yield from _recursions("fp32", T, N, C, S, launch)
        for zero_inf in (False, True):
            yield from _grad("fp32", T, N, C, S, launch, zero_inf)
    for name in FLOAT_NAMES.values():
        for p in range(12):  # target length bounds 2**p - 1 up to MAX_TARGET_LENGTH
            L = min((1 << p) - 1 + (p == 0), k.max_target_length(DTYPES[name]))
            yield from _recursions(name, 100, 8, 64, L, f"L={L}")
            yield from _grad(name, 100, 8, 64, L, f"L={L}", False)
        for C in (64, 1024, 2048, 10000):
            yield from _grad(name, 100, 8, C, 80, f"C={C}", False)
