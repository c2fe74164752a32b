"""Tier 3 smoke: the AOT cases are complete, and a few of them compile as the runtime specialises them.

The full tier (every case, sm_80 and sm_90) is ``python -m tests.aot_compile 80 90 --check``, its
own step in ``.ci/run``. Here: the case lists (built in this process, where the kernels may be the
interpreter's) and each family's first case compiled for sm_90 in one subprocess, started by a
fixture at test time (the compiler needs ``TRITON_INTERPRET`` unset).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

pytest.importorskip("triton")

import triton
import triton.language as tl

from tests import aot_cases
from tests.aot_cases._case import Ptr, case
from triton_losses import _dispatch

pytestmark = pytest.mark.aot
SMOKE_ARCH = 90


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict[str, dict]:
    """``python -m tests.aot_compile 90 --smoke``: result per case key."""
    out = tmp_path_factory.mktemp("aot") / "smoke.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "tests.aot_compile", str(SMOKE_ARCH), "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {r["case"]: r for r in map(json.loads, out.read_text().splitlines())}


@pytest.fixture(scope="module")
def every_case() -> dict:
    return aot_cases.all_cases()


def test_every_family_has_cases():
    assert set(aot_cases.FAMILIES) >= set(_dispatch._KERNELS) - {"linear_cross_entropy"}
    for name in aot_cases.FAMILIES:
        assert aot_cases.family_cases(name), f"tests/aot_cases/{name}.py yields no case"


def test_every_kernel_has_a_case(every_case):
    """Each ``*_kernel`` a kernels module holds is compiled by some case."""
    import importlib
    import pkgutil

    import triton_losses.kernels as package

    compiled = {c.name for c in every_case.values()}
    modules = {
        m.name: importlib.import_module(f"{package.__name__}.{m.name}") for m in pkgutil.iter_modules(package.__path__)
    }
    assert set(_dispatch._KERNELS) <= set(modules)
    for family, module in modules.items():  # the families' modules and the shared ones (_common, _ce_reduce, ...)
        kernels = {n for n, v in vars(module).items() if n.endswith("_kernel") and hasattr(v, "fn")}
        assert kernels <= compiled, f"kernels.{family}: no AOT case for {sorted(kernels - compiled)}"


def test_smoke_subset_is_each_familys_first_cases():
    keys = aot_cases.smoke_keys()
    assert len(keys) == len(aot_cases.FAMILIES) * aot_cases.SMOKE_PER_FAMILY
    assert len(set(keys)) == len(keys)


@triton.jit
def _toy_kernel(x_ptr, n, s_x, BLOCK: tl.constexpr):
    """A kernel for the case builder's own tests."""
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs * s_x, tl.load(x_ptr + offs * s_x, mask=offs < n), mask=offs < n)


def test_case_builder_keeps_the_kernels_own_arguments_in_order():
    c = case(_toy_kernel, ptrs={"x_ptr": "bf16", "y_ptr": "fp32"}, scalars={"s_x": 1, "n": 4096, "m": 3},
             constexprs={"BLOCK": 1024}, num_warps=4, launch="toy")  # fmt: skip
    assert c.args == (("x_ptr", Ptr("bf16")), ("n", 4096), ("s_x", 1))
    assert c.constexprs == (("BLOCK", 1024),)
    assert c.key == "_toy_kernel[x_ptr:bf16|BLOCK=1024|warps=4|toy]"
    assert c.max_registers() == 128  # 16 resident warps of 4-warp programs: 4 programs per SM


def test_case_builder_rejects_a_missing_argument_or_constexpr():
    with pytest.raises(ValueError, match=r"no AOT value for \['s_x'\]"):
        case(_toy_kernel, ptrs={"x_ptr": "bf16"}, scalars={"n": 1}, constexprs={"BLOCK": 16}, num_warps=4, launch="t")
    with pytest.raises(ValueError, match=r"no AOT value for \['BLOCK'\]"):
        case(_toy_kernel, ptrs={"x_ptr": "bf16"}, scalars={"n": 1, "s_x": 1}, constexprs={}, num_warps=4, launch="t")
    with pytest.raises(ValueError, match=r"not constexprs of it: \['n'\]"):
        case(_toy_kernel, ptrs={"x_ptr": "bf16"}, scalars={"n": 1, "s_x": 1}, constexprs={"BLOCK": 16, "n": 2},
             num_warps=4, launch="t")  # fmt: skip


@pytest.mark.parametrize("key", aot_cases.smoke_keys())
def test_smoke_case_compiles_without_problems(smoke, key):
    """Compiles, no register spills, registers within the launch's occupancy, 128-bit accesses where asked."""
    r = smoke[key]
    assert r["error"] is None, r["error"]
    assert r["problems"] == [], r["problems"]
    if r["regs"] is None:
        pytest.skip("no cuobjdump in this triton install to read the cubin")


def test_smoke_uses_the_runtime_specialisation(smoke):
    """The cross-entropy forward at the LM launch: unit strides constant, sizes i32 with the divisibility hint."""
    (r,) = [r for k, r in smoke.items() if k.startswith("_ce_fwd_kernel")]
    sig = r["signature"]
    assert sig["x_ptr"] == "*bf16:D", sig
    assert [v for v in sig.values() if v == "1"], sig  # unit strides became constants
    assert not [v for v in sig.values() if v.startswith("i64")], sig  # every integer fits i32 at this launch
    if r["loads"] is not None:
        assert r["loads"].get("128"), r["loads"]


def _compiled_configs(family: str, kernel: str, itemsize: int) -> set[tuple[int, int, int]]:
    """``(BLOCK_R, BLOCK_C, num_warps)`` of ``kernel``'s cases whose first pointer has ``itemsize``-byte elements."""
    out = set()
    for c in aot_cases.family_cases(family):
        first = next(v for _, v in c.args if isinstance(v, Ptr))
        if c.name == kernel and first.dtype.itemsize == itemsize:
            flags = dict(c.constexprs)
            out.add((flags["BLOCK_R"], flags["BLOCK_C"], c.num_warps))
    return out


VOCABS = [*range(1, 2049), 4095, 4097, 8191, 8193, 32000, 50257, 128256, 151936, 262144, 300000, 1 << 20]
ROW_KERNELS = {  # family -> (kernels, whether its launchers also tile across rows (classes strided))
    "cross_entropy": (("_ce_fwd_kernel", "_ce_bwd_kernel"), True),
    "softmax": (("_softmax_fwd_kernel", "_softmax_bwd_kernel"), True),
    "distill": (("_jsd_kernel", "_kd_kernel"), False),
    "logprobs": (("_logprobs_fwd_kernel", "_logprobs_bwd_kernel"), True),
}


@pytest.mark.parametrize("family", sorted(ROW_KERNELS))
def test_row_kernels_cover_every_launch_config(family):
    """Every ``launch_config`` a row launcher can choose, for every element size, is compiled."""
    from triton_losses.kernels._common import launch_config

    kernels, strided = ROW_KERNELS[family]
    for itemsize in (2, 4, 8):
        wanted = {tuple(launch_config(v, itemsize, c)) for v in VOCABS for c in ((True, False) if strided else (True,))}
        for kernel in kernels:
            missing = wanted - _compiled_configs(family, kernel, itemsize)
            assert not missing, f"{kernel}, {itemsize}-byte elements: no case for {sorted(missing)}"


@pytest.mark.parametrize(("family", "kernels"), [("bce", ("_bce_fwd_kernel", "_bce_bwd_kernel")),
                                                 ("kl_div", ("_kl_fwd_kernel", "_kl_bwd_kernel"))])  # fmt: skip
def test_elementwise_kernels_cover_every_block_shape(family, kernels):
    """Every ``(BLOCK_R, BLOCK_C)`` an elementwise launcher can choose (rows of 2 columns up) is compiled."""
    from triton_losses.kernels._elementwise import NUM_WARPS, block_config, tile_for

    for itemsize in (2, 4, 8):
        tile = tile_for(itemsize)
        wanted = {(*block_config(d, tile), NUM_WARPS) for d in range(2, 20000)}
        for kernel in kernels:
            missing = wanted - _compiled_configs(family, kernel, itemsize)
            assert not missing, f"{kernel}, {itemsize}-byte elements: no case for {sorted(missing)}"


def test_eviction_hints_are_read_from_the_sass_and_checked():
    from tests import aot_compile

    sass = "LDG.E.EL.128 R4, desc[UR4][R2.64] ;\n LDG.E.EF.128 R8 ;\n STG.E.EF.128 [R2], R4 ;\n LDG.E.128 R1 ;"
    assert aot_compile.eviction_hints(sass) == {"LDG.EF": 1, "LDG.EL": 1, "STG.EF": 1}
    asked = types.SimpleNamespace(constexprs=(("EVICT_1ST", "evict_last"), ("EVICT_2ND", "")), vector_io=())
    r = dict(error=None, spills=0, regs=32, max_regs=128, loads={"128": 2}, stores={"128": 1})
    assert aot_compile.findings(asked, dict(r, hints={"LDG.EL": 1})) == []
    (finding,) = aot_compile.findings(asked, dict(r, hints={}))
    assert "EVICT_1ST=evict_last" in finding


def test_32_bit_products_with_a_stride_or_the_row_count_are_found_in_the_ttir():
    from tests import aot_compile

    ttir = """
    %0 = arith.muli %c0, %s_xc : i32
    %1 = arith.muli %c4_i32, %R : i32
    %2 = arith.muli %rows, %R : tensor<16xi64>
    %3 = arith.muli %k, %BLOCK : i32
    %4 = arith.muli %c0, %s_w : i32
    """
    signature = {"s_xc": "i32:D", "R": "i32:D", "s_w": "1", "C": "i32"}
    found = aot_compile.i32_stride_products(ttir, signature)
    assert found == ["%c0 * %s_xc : i32", "%c4_i32 * %R : i32"]


def test_float_arguments_must_come_as_fp32_pairs():
    from tests import aot_compile

    signature = {"x_ptr": "*fp32:D", "smoothing": "fp32", "m": "fp32", "m_lo": "fp32", "eps_hi": "fp32",
                 "eps_lo": "fp32", "beta_hi": "fp32", "stray_lo": "fp32", "R": "i32"}  # fmt: skip
    assert aot_compile.unpaired_floats(signature) == ["beta_hi", "smoothing", "stray_lo"]


def test_the_smoke_kernels_take_no_bare_float(smoke):
    """What the runtime specialises: every float option of the smoke cases arrives as an fp32 pair."""
    from tests import aot_compile

    bare = {k: aot_compile.unpaired_floats(r["signature"]) for k, r in smoke.items() if r["signature"]}
    assert not any(bare.values()), {k: v for k, v in bare.items() if v}


def test_the_lm_forward_keeps_its_row_in_l2_for_the_gradient_pass(smoke):
    """The fused LM forward is the persistent variant: its first read hinted evict_last, its second evict_first."""
    (key,) = [k for k in smoke if k.startswith("_ce_fwd_kernel") and "WRITE_GRAD=True,HAS_COEF=True" in k][:1]
    assert "PERSISTENT=True" in key
    assert smoke[key]["hints"].get("LDG.EL") and smoke[key]["hints"].get("LDG.EF"), smoke[key]["hints"]
