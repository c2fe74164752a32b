"""Device helpers shared by the kernels, and the launch-configuration policy.

Row addressing: every row-wise kernel sees its operand as a 3-D strided view ``(A, C, B)`` where
``C`` is the reduced (class) dimension; row ``r`` of the ``R = A * B`` rows is ``(r // B, r % B)``.
A 2-D ``(N, C)`` tensor is ``(N, C, 1)``; a K-dim ``(N, C, d1..dk)`` tensor is ``(N, C, d1*..*dk)``.
All offsets are computed in int64, so tensors with more than 2**31 elements are addressed correctly.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Taylor coefficients of tanh(y) = sum_k c_k * y**(2k+1), used for |y| < 0.25 where the
# exp-based formula would cancel; 12 terms are exact to fp64 precision on that interval.
_T1 = tl.constexpr(-0.3333333333333333)
_T2 = tl.constexpr(0.13333333333333333)
_T3 = tl.constexpr(-0.05396825396825397)
_T4 = tl.constexpr(0.021869488536155203)
_T5 = tl.constexpr(-0.008863235529902197)
_T6 = tl.constexpr(0.003592128036572481)
_T7 = tl.constexpr(-0.0014558343870513183)
_T8 = tl.constexpr(0.000590027440945586)
_T9 = tl.constexpr(-0.00023912911424355248)
_T10 = tl.constexpr(9.691537956929451e-05)
_T11 = tl.constexpr(-3.927832388331683e-05)


@triton.jit
def tanh(y):
    """Accurate tanh in the dtype of ``y`` (fp32 or fp64); saturates to +-1, NaN stays NaN."""
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    y2 = y * y
    p = _T11
    p = p * y2 + _T10
    p = p * y2 + _T9
    p = p * y2 + _T8
    p = p * y2 + _T7
    p = p * y2 + _T6
    p = p * y2 + _T5
    p = p * y2 + _T4
    p = p * y2 + _T3
    p = p * y2 + _T2
    p = p * y2 + _T1
    small = a + a * y2 * p
    t = tl.where(a < 0.25, small, big)
    return tl.where(y < 0, -t, t)


@triton.jit
def row_block(R, BLOCK_R: tl.constexpr):
    """This program's ``BLOCK_R`` row indices (int64) and the mask of those ``< R``."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    return rows, rows < R


@triton.jit
def kept_rows(lab_ptr, rows, rmask, B, s_la, s_lb, ignore_index, HAS_LABELS: tl.constexpr):
    """Rows to keep: in range and, with labels ``(A, B)``, whose label is not ``ignore_index``."""
    keep = rmask
    if HAS_LABELS:
        lab = tl.load(lab_ptr + row_offsets(rows, B, s_la, s_lb), mask=rmask, other=ignore_index)
        keep = rmask & (lab.to(tl.int64) != ignore_index)
    return keep


@triton.jit
def row_offsets(rows, B, s_a, s_b):
    """int64 offsets of rows ``rows`` (int64 vector) of a strided ``(A, C, B)`` view."""
    a = rows // B
    b = rows - a * B
    return a * s_a + b * s_b


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# Tile elements each thread holds when a program has one row, per element size, and the most
# warps a program gets. Chosen statically, as no GPU has timed them yet: compiled for sm_80 and
# sm_90 (ptxas register counts, read by tests/test_aot_compile.py), 32 bf16 values per thread
# (8192-column blocks at 8 warps, the first guess) spilled up to 504 bytes of registers in the
# weighted / smoothed / distillation kernels, and 512-thread programs are capped at 128 registers,
# which spilled too; 16 per thread (8 for fp64, two registers each) at 8 warps spills at most a
# few words. Programs holding several short rows (``BLOCK_R > 1``) carry per-row state as well, so
# they hold half as much. Longer rows take the online (running max / sum) loop over blocks of
# 4096 columns (2048 for fp64). Time wider tiles and 16 warps on a GPU before calling this tuned.
_PER_THREAD = {2: 16, 4: 16, 8: 8}
_MAX_WARPS = 8
_MIN_BLOCK_C = 16


def launch_config(C: int, elem_size: int, col_contiguous: bool) -> tuple[int, int, int]:
    """Choose ``(BLOCK_R, BLOCK_C, num_warps)`` for a row-wise kernel over rows of length ``C``.

    Rows whose classes are contiguous (``stride_c == 1``) are tiled along the row; K-dim rows
    (classes strided, neighbouring rows contiguous) are tiled across rows, so loads coalesce.
    Short rows share a program (``BLOCK_R > 1``) in a tile half as large.
    """
    per_thread = _PER_THREAD[elem_size]
    tile = 32 * _MAX_WARPS * per_thread
    block_c = max(_MIN_BLOCK_C, next_pow2(C))
    if col_contiguous:
        block_c = min(block_c, tile)
        block_r = max(1, min(64, tile // 2 // block_c))
    else:
        block_c = min(block_c, 32)
        block_r = max(1, min(256, tile // 2 // block_c))
    if block_r > 1:
        per_thread //= 2
    num_warps = max(4, min(_MAX_WARPS, block_r * block_c // (32 * per_thread)))
    return block_r, block_c, num_warps


def reachable_configs(elem_size: int) -> set[tuple[int, int, int, bool]]:
    """Every ``(BLOCK_R, BLOCK_C, num_warps, C <= BLOCK_C)`` a launch can use (for AOT tests)."""
    out = set()
    for contig in (True, False):
        for p in range(0, 21):
            for C in (1 << p, (1 << p) + 1):
                block_r, block_c, warps = launch_config(C, elem_size, contig)
                out.add((block_r, block_c, warps, block_c >= C))
    return out


class AotCase:
    """One kernel specialisation a launcher can produce, for ahead-of-time compilation tests.

    Attributes:
        kernel: the ``@triton.jit`` function.
        ptr_dtypes: Triton dtype name (``"fp32"``, ``"bf16"``, ``"i64"``, ...) of each ``*_ptr`` argument.
        constexprs: value of every ``tl.constexpr`` argument.
        num_warps: the launch's ``num_warps``.
        floats: names of scalar float arguments (all other scalars are ``i64``).
    """

    def __init__(self, kernel, ptr_dtypes: dict, constexprs: dict, num_warps: int, floats=()):
        self.kernel, self.ptr_dtypes, self.constexprs = kernel, ptr_dtypes, constexprs
        self.num_warps, self.floats = num_warps, set(floats)

    def signature(self) -> dict:
        sig = {}
        for name in self.kernel.arg_names:
            if name in self.constexprs:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*" + self.ptr_dtypes[name]
            else:
                sig[name] = "fp32" if name in self.floats else "i64"
        return sig

    def __repr__(self) -> str:
        """A unique name: every pointer's dtype and every constexpr's value."""
        names = self.kernel.arg_names
        ptrs = ",".join(f"{k}:{v}" for k, v in self.ptr_dtypes.items() if k in names)
        flags = ",".join(f"{k}={getattr(v, 'name', v)}" for k, v in self.constexprs.items())
        return f"{self.kernel.fn.__name__}[{ptrs}|{flags}|warps={self.num_warps}]"


TL_NAMES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}
