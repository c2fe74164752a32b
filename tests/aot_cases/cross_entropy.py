"""AOT cases of ``kernels/cross_entropy.py``, its reductions (``_ce_reduce``) and ``_common``'s gradient scale:
every flag at the LM launch, every block configuration per dtype."""

from __future__ import annotations

from itertools import product

import torch
import triton.language as tl

from triton_losses.kernels import _ce_reduce as kr
from triton_losses.kernels import _common as kc
from triton_losses.kernels import cross_entropy as k
from triton_losses.kernels._common import launch_config, row_align

from ._case import ASSERT_OPTIONS, DTYPES, FLOAT_NAMES, KDIM_B, ODD_VOCAB, ROWS, VOCAB, case, reachable, strides

FLAGS = ("HAS_WEIGHT", "PROB_TARGET", "LOGP_INPUT", "HAS_SMOOTHING", "HAS_Z", "HAS_SOFTCAP")


def _ptrs(x: str, target: str) -> dict[str, str]:
    acc = "fp64" if x == "fp64" else "fp32"
    return dict(x_ptr=x, t_ptr=target, w_ptr="fp32", wsum_ptr=acc, loss_ptr=acc, stats_ptr=acc, g_ptr=x,
                coef_ptr=acc, gout_ptr=acc, dt_ptr=target, out_ptr=acc, norm_ptr=acc, factor_ptr=acc,
                bounds_ptr="i64")  # fmt: skip


def _scalars(C: int, B: int = 1, prob: bool = False) -> dict:
    """The launchers' scalar arguments for ``ROWS`` rows of length ``C`` (contiguous ``(A, C, B)`` logits)."""
    s = dict(R=ROWS, C=C, B=B, ignore_index=-100, smoothing_hi=0.1, smoothing_lo=1e-9, z_hi=1e-4, z_lo=1e-12,
             cap_hi=30.0, cap_lo=0.0, s_gout=0, s_w=1,
             c_off=0, NC=C, s_st=2)  # fmt: skip
    s.update(**strides("x", C, B), **strides("g", C, B), **strides("d", C, B))
    s.update(strides("t", C, B) if prob else dict(s_ta=B, s_tc=0, s_tb=1))
    return s


def _row_cases(x: str, C: int, B: int, config: tuple, flags: dict, launch: str, vector_io: bool, every_fwd=True,
               variant: str | None = None, with_bwd: bool = True):  # fmt: skip
    """The backward and the forward of one launch: with and without the fused gradient and its scale
    (``every_fwd``), or only the fused forward of 'mean'. The forward is the variant the launcher picks
    for it (``kernels.cross_entropy.default_variant``) unless ``variant`` names one."""
    block_r, block_c, warps = config
    prob, logp = flags["PROB_TARGET"], flags["LOGP_INPUT"]
    rows = torch.empty(ROWS // B, C, B, dtype=DTYPES[x], device="meta")  # contiguous, as strides() has them
    tile = dict(BLOCK_R=block_r, BLOCK_C=block_c, ACC=tl.float64 if x == "fp64" else tl.float32,
                ALIGN=row_align(rows, block_r, rows))  # fmt: skip
    common = dict(ptrs=_ptrs(x, x if prob else "i64"), scalars=_scalars(C, B, prob), num_warps=warps,
                  options=ASSERT_OPTIONS, launch=launch)  # fmt: skip
    fwds = ((True, True), (False, True), (True, False)) if every_fwd else ((True, True),)
    for write, coef in fwds if not logp else ((False, True),):
        io = (("load", "store") if write else ("load",)) if vector_io and not logp else ()
        chosen = variant or k.default_variant(C, DTYPES[x].itemsize, B == 1, write)
        yield case(k._ce_fwd_kernel, constexprs=dict(flags, WRITE_GRAD=write, HAS_COEF=coef, **tile,
                                                     **k._VARIANT_FLAGS[chosen]),
                   vector_io=io, **common)  # fmt: skip
    for tgrad in ((False, True) if prob else (False,)) if with_bwd else ():
        io = (("store",) if logp else ("load", "store")) if vector_io else ()
        yield case(k._ce_bwd_kernel, constexprs=dict(flags, WRITE_TGRAD=tgrad, HAS_COEF=True, GIVEN_S1=False,
                                                     SLICE_IN_MEMORY=False, **tile),
                   vector_io=io, **common)  # fmt: skip


def _reduction_cases(x: str):
    """The single-program denominator and 'mean' / 'sum' kernels, and the in-place gradient scale."""
    acc = tl.float64 if x == "fp64" else tl.float32
    scalars = dict(_scalars(VOCAB), n=ROWS * VOCAB, P=kr.SPLIT_PROGRAMS, rows_per=kr.SPLIT_STEPS * kr._NORM_BLOCK)
    common = dict(ptrs=dict(_ptrs(x, "i64"), part_ptr=_ptrs(x, "i64")["out_ptr"]), scalars=scalars,
                  launch=f"{ROWS}x{VOCAB}")  # fmt: skip
    for weight, mean, partials in product((False, True), repeat=3):
        flags = dict(HAS_WEIGHT=weight, PROB_TARGET=False, MEAN=mean, PARTIALS=partials, BLOCK=kr._NORM_BLOCK, ACC=acc)
        yield case(kr._ce_norm_kernel, constexprs=flags, num_warps=kr._NORM_WARPS, **common)
    # the first stage over many rows: the denominator's (with and without weights) and the loss sum's
    acc_name = common["ptrs"]["out_ptr"]
    for targets, weight, block, warps in ((True, False, kr._NORM_BLOCK, kr._NORM_WARPS),
                                          (True, True, kr._NORM_BLOCK, kr._NORM_WARPS),
                                          (False, False, kr._FINISH_BLOCK, kr._FINISH_WARPS)):  # fmt: skip
        flags = dict(TARGETS=targets, HAS_WEIGHT=weight, BLOCK=block, ACC=acc)
        yield case(kr._ce_split_sum_kernel, constexprs=flags, num_warps=warps,
                   **dict(common, ptrs=dict(common["ptrs"], x_ptr=acc_name)))  # fmt: skip
    for mean, nan in ((False, False), (True, False), (True, True)):
        flags = dict(MEAN=mean, NAN_IF_ZERO=nan, BLOCK=kr._FINISH_BLOCK, ACC=acc)
        yield case(kr._ce_finish_kernel, constexprs=flags, ptrs=dict(_ptrs(x, "i64"), out_ptr=x),
                   num_warps=kr._FINISH_WARPS, **{k_: v for k_, v in common.items() if k_ != "ptrs"})  # fmt: skip
    yield case(kc._scale_kernel, constexprs=dict(BLOCK=kc._SCALE_BLOCK, ACC=acc), vector_io=("load", "store"),
               **dict(common, num_warps=8))  # fmt: skip


def _parallel_cases(x: str):
    """The vocabulary-parallel launches at the LM shape: the partial sums per flag set with the slice's
    bounds read from the device (a plain process group), and with them as integers (a DTensor) for the
    plain flags; the backward reading the global ``sum_c w_c t_c`` from ``(R, 3)`` statistics, both ways."""
    config = launch_config(VOCAB, 2, True)
    block_r, block_c, warps = config
    tile = dict(BLOCK_R=block_r, BLOCK_C=block_c, ACC=tl.float64 if x == "fp64" else tl.float32, ALIGN=1)
    sets = [(*v, True) for v in product((False, True), repeat=4)] + [(False, False, False, False, False)]
    for weight, prob, smoothing, cap, in_memory in sets:
        flags = dict(HAS_WEIGHT=weight, PROB_TARGET=prob, HAS_SMOOTHING=smoothing, HAS_SOFTCAP=cap)
        yield case(k._ce_partial_kernel, constexprs=dict(flags, SLICE_IN_MEMORY=in_memory, **tile),
                   ptrs=_ptrs(x, x if prob else "i64"), scalars=_scalars(VOCAB, 1, prob), num_warps=warps,
                   launch=f"{ROWS}x{VOCAB}")  # fmt: skip
    flags = dict(dict.fromkeys(FLAGS, False), PROB_TARGET=True, HAS_Z=True)
    for in_memory in (False, True):
        yield case(k._ce_bwd_kernel, constexprs=dict(flags, WRITE_TGRAD=True, HAS_COEF=True, GIVEN_S1=True,
                                                     SLICE_IN_MEMORY=in_memory, **tile),
                   ptrs=_ptrs(x, x), scalars=dict(_scalars(VOCAB, 1, True), s_st=3), num_warps=warps,
                   options=ASSERT_OPTIONS, launch=f"{ROWS}x{VOCAB}")  # fmt: skip


def cases():
    """The LM launch first (smoke), an unaligned vocabulary, every reachable block configuration, the reductions."""
    lm = launch_config(VOCAB, 2, True)
    for values in product((False, True), repeat=len(FLAGS)):
        flags = dict(zip(FLAGS, values, strict=True))
        if flags["LOGP_INPUT"] and (
            flags["PROB_TARGET"] or flags["HAS_SMOOTHING"] or flags["HAS_Z"] or flags["HAS_SOFTCAP"]
        ):
            continue
        yield from _row_cases("bf16", VOCAB, 1, lm, flags, f"{ROWS}x{VOCAB}", vector_io=True)
    plain = dict.fromkeys(FLAGS, False)
    # The LM launch's other forward variant (TRITON_LOSSES_CE_VARIANT=rows), fused 'mean' only.
    yield from _row_cases("bf16", VOCAB, 1, lm, plain, f"{ROWS}x{VOCAB}", True, every_fwd=False, variant="rows",
                          with_bwd=False)  # fmt: skip
    # Rows of an odd length start unaligned: the runtime specialises without the divisibility hints, and
    # the kernels stream each row's aligned middle unmasked (ALIGN = 8): 128-bit loads and stores asked for.
    yield from _row_cases("bf16", ODD_VOCAB, 1, launch_config(ODD_VOCAB, 2, True), plain, f"{ROWS}x{ODD_VOCAB}", True)
    for name in FLOAT_NAMES.values():
        for config, (C, contiguous) in sorted(reachable(launch_config, DTYPES[name].itemsize).items()):
            B = 1 if contiguous else KDIM_B
            yield from _row_cases(name, C, B, config, plain, f"C={C},B={B}", vector_io=False, every_fwd=False)
    for name in ("bf16", "fp32", "fp64"):
        yield from _reduction_cases(name)
    yield from _parallel_cases("bf16")
