"""Tier 3: compile every AOT case to cubin with the runtime's specialisation and read the SASS.

``python -m tests.aot_compile ARCH [ARCH ...] [--check] [--smoke] [--match TEXT] [--out FILE]``
compiles each case of ``tests/aot_cases`` for ``sm_ARCH`` (no GPU needed) and prints one JSON line
per case and architecture::

    {"case", "arch", "error", "regs", "spills", "max_regs", "loads", "stores", "signature", "problems"}

``regs`` / ``spills``: registers per thread and stack bytes (register spills) from ``cuobjdump
-res-usage``; ``loads`` / ``stores``: the global load / store instructions of the SASS by width in
bits; ``signature``: what the runtime's binder made of each argument (``i32``, ``i64:D`` with the
divisibility hint, ``1`` for a constant, ...). ``--check`` exits 1 when a case fails to compile,
spills, needs more registers than its launch's occupancy allows, or lacks the 128-bit accesses its
case asks for. The signature comes from the installed triton's launch binder
(``create_function_from_signature`` + ``JITFunction._pack_args``, the code ``JITFunction.run``
runs), fed the case's argument values. It must run without ``TRITON_INTERPRET`` (the interpreter
replaces ``@triton.jit`` functions), so tests start it as a subprocess.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor

warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION is unset")


_SMOKE = False  # set in each compiler process by main(): build only the smoke subset


def _set_policy(smoke: bool, max_spill: int = 0, registers_fail: bool = True) -> None:
    """Set, in this process, the case subset and what ``--check`` fails on."""
    global _MAX_SPILL, _REGISTERS_FAIL
    _MAX_SPILL, _REGISTERS_FAIL = max_spill, registers_fail
    _set_smoke(smoke)


def _set_smoke(smoke: bool) -> None:
    global _SMOKE
    _SMOKE = smoke


@functools.cache
def _cases() -> dict:
    from tests.aot_cases import all_cases, smoke_cases

    return smoke_cases() if _SMOKE else all_cases()


def specialise(case, target):
    """``(ASTSource, options)`` for ``case`` exactly as ``JITFunction.run`` builds them for ``target``."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = case.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = case.launch_options()
    bound, specialization, options = binder(**case.launch_kwargs(), **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options


def describe(src) -> dict:
    """Per runtime argument: its type, ``:D`` with the divisibility hint, or its value if it became a constant."""
    out = {}
    for i, param in enumerate(src.fn.params):
        name, ty = param.name, src.signature[param.name]
        if param.is_constexpr:
            continue
        if ty == "constexpr":  # a runtime argument the binder turned into a constant (an int equal to 1)
            out[name] = repr(src.constants.get((i,)))
            continue
        hint = any(a[0] == "tt.divisibility" for a in src.attrs.get((i,), []))
        out[name] = ty + (":D" if hint else "")
    return out


def _cuobjdump(cubin: bytes, flag: str) -> str | None:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


_WIDTH = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


def global_accesses(sass: str) -> tuple[dict, dict]:
    """Global loads and stores of a SASS listing, counted by width in bits (plain ``LDG.E`` is 32)."""
    counts = {"LDG": collections.Counter(), "STG": collections.Counter()}
    for op, mods in re.findall(r"\b(LDG|STG)((?:\.[A-Z0-9_]+)*)", sass):
        width = next((_WIDTH[m] for m in mods.split(".") if m in _WIDTH), 32)
        counts[op][str(width)] += 1
    return dict(sorted(counts["LDG"].items())), dict(sorted(counts["STG"].items()))


_HINTS = {"evict_last": "EL", "evict_first": "EF"}  # tl.load's eviction_policy -> its SASS modifier


def eviction_hints(sass: str) -> dict:
    """Global loads and stores carrying an L1/L2 eviction hint, e.g. ``{"LDG.EL": 2, "STG.EF": 1}``."""
    found = collections.Counter()
    for op, mods in re.findall(r"\b(LDG|STG)((?:\.[A-Z0-9_]+)*)", sass):
        for hint in set(mods.split(".")) & set(_HINTS.values()):
            found[f"{op}.{hint}"] += 1
    return dict(sorted(found.items()))


def i32_stride_products(ttir: str, signature: dict) -> list[str]:
    """The TTIR's 32-bit multiplications by a stride argument (an ``s_*`` scalar the launch passes as i32)
    or by the row count ``R``.

    An index times a stride is an element offset, which passes 2**31 on large inputs (a K-dim class
    stride of d1*...*dK, a transposed row's stride); it must be formed in 64 bits, and so must ``k * R``
    (the k-th of several per-row statistics laid out one after another). Constant-1 strides fold away,
    so a case whose strides are i32 values other than 1 is where this shows.
    """
    strides = {name for name, t in signature.items() if (name.startswith("s_") or name == "R") and t.startswith("i32")}
    out = []
    for a, b, ty in re.findall(r"arith\.muli (%[\w.]+), (%[\w.]+) : (i32|tensor<[^>]*xi32[^>]*>)", ttir):
        if {a.lstrip("%").split(".")[0], b.lstrip("%").split(".")[0]} & strides:
            out.append(f"{a} * {b} : {ty}")
    return sorted(set(out))


def unpaired_floats(signature: dict) -> list[str]:
    """Float scalar arguments not passed as an fp32 pair (``v``/``v_lo`` or ``v_hi``/``v_lo``).

    Triton passes a Python float as fp32, so a kernel computing fp64 data with a bare float option
    (0.1 as label smoothing) is off by about 1e-8 relative; the launchers split each float with
    ``_elementwise.split_float`` and the kernels rebuild it with ``joined``. (The interpreter passes
    Python floats unrounded, so only the compiled signature shows this.)
    """
    floats = {name for name, t in signature.items() if t in ("fp32", "fp64")}
    paired = set()
    for name in floats:
        base = name[:-3] if name.endswith(("_hi", "_lo")) else name
        if f"{base}_lo" in floats and (base in floats or f"{base}_hi" in floats):
            paired.add(name)
    return sorted(floats - paired)


# What ``--check`` tolerates, set by main(): spill bytes, and whether register use above the launch's
# occupancy fails the check or is only reported (``--registers report``).
_MAX_SPILL = 0
_REGISTERS_FAIL = True


def findings(case, r: dict) -> list[str]:
    """Everything the SASS shows short of the goal (no spills, registers within the launch's occupancy,
    128-bit global accesses where the case asks for them); empty when the case meets it."""
    if r["error"] is not None:
        return ["does not compile"]
    out = []
    if r["spills"]:
        out.append(f"spills {r['spills']} bytes")
    if r["regs"] is not None and r["regs"] > r["max_regs"]:
        out.append(f"{r['regs']} registers > {r['max_regs']} (the launch's occupancy)")
    if r.get("i32_strides"):
        out.append(f"stride products in 32 bits: {r['i32_strides']}")
    if r.get("signature") and unpaired_floats(r["signature"]):
        out.append(f"float arguments not split into fp32 pairs: {unpaired_floats(r['signature'])}")
    if r["loads"] is not None:
        if "load" in case.vector_io and not r["loads"].get("128"):
            out.append(f"no 128-bit global load (loads by width: {r['loads']})")
        if "store" in case.vector_io and not r["stores"].get("128"):
            out.append(f"no 128-bit global store (stores by width: {r['stores']})")
        for name, value in case.constexprs:  # an eviction policy asked for must reach the loads
            if name.startswith("EVICT") and value in _HINTS and not r["hints"].get(f"LDG.{_HINTS[value]}"):
                out.append(f"{name}={value}: no global load with .{_HINTS[value]} (hinted: {r['hints']})")
    return out


def problems(case, r: dict) -> list[str]:
    """The findings ``--check`` fails on: all of them, less spills up to ``--max-spill`` bytes and, with
    ``--registers report``, register counts above the occupancy."""
    out = []
    for f in findings(case, r):
        if f.startswith("spills") and (r["spills"] or 0) <= _MAX_SPILL:
            continue
        if "registers >" in f and not _REGISTERS_FAIL:
            continue
        out.append(f)
    return out


def _error_chain(e: BaseException) -> str:
    chain = [e]
    while chain[-1].__cause__ or chain[-1].__context__:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    return " <- ".join(f"{type(c).__name__}: {c}"[-600:] for c in reversed(chain))[-3000:]


def compile_case(key_arch: tuple[str, int]) -> dict:
    """Compile one case for one architecture; errors are reported in the result, not raised."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget

    key, arch = key_arch
    case = _cases()[key]
    r = {"case": key, "arch": arch, "error": None, "regs": None, "spills": None, "max_regs": case.max_registers()}
    r.update(loads=None, stores=None, hints=None, signature=None, i32_strides=None)
    try:
        target = GPUTarget("cuda", arch, 32)
        src, options = specialise(case, target)
        r["signature"] = describe(src)
        compiled = triton_compile(src, target=target, options=options.__dict__)
        r["i32_strides"] = i32_stride_products(compiled.asm["ttir"], r["signature"])
        cubin = compiled.asm["cubin"]
        usage = _cuobjdump(cubin, "-res-usage")
        if usage is not None:
            m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
            r["regs"], r["spills"] = int(m.group(1)), int(m.group(2))
            sass = _cuobjdump(cubin, "-sass")
            r["loads"], r["stores"] = global_accesses(sass)
            r["hints"] = eviction_hints(sass)
    except Exception as e:  # one bad case must not hide the others
        r["error"] = _error_chain(e)
    r["findings"] = findings(case, r)
    r["problems"] = problems(case, r)
    return r


def select(match: str | None, per_kernel: int | None = None) -> list[str]:
    """Case keys to compile: every case of :func:`_cases`, or those whose key contains ``match``;
    with ``per_kernel``, only the first that many of each kernel (its representative launches)."""
    keys = [k for k in _cases() if match is None or match in k]
    if per_kernel is None:
        return keys
    seen: dict[str, int] = {}
    kept = []
    for k in keys:
        name = k.split("[")[0]
        seen[name] = seen.get(name, 0) + 1
        if seen[name] <= per_kernel:
            kept.append(k)
    return kept


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.aot_compile", description=__doc__.split("\n")[0])
    parser.add_argument("archs", nargs="*", type=int, default=[80, 90], help="compute capabilities (80 90)")
    parser.add_argument("--check", action="store_true", help="exit 1 if any case has a problem")
    parser.add_argument("--smoke", action="store_true", help="only each family's first cases")
    parser.add_argument("--match", help="only cases whose name contains this text")
    parser.add_argument("--per-kernel", type=int, help="only each kernel's first N cases")
    parser.add_argument("--max-spill", type=int, default=0, help="spill bytes --check tolerates (default 0)")
    parser.add_argument(
        "--registers", choices=("fail", "report"), default="fail",
        help="whether registers above the launch's occupancy fail --check or are only reported",
    )  # fmt: skip
    parser.add_argument("--out", help="also write the JSON lines to this file")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile kernels", file=sys.stderr)
        return 2
    policy = (args.smoke, args.max_spill, args.registers == "fail")
    _set_policy(*policy)
    jobs = [(key, arch) for arch in args.archs for key in select(args.match, args.per_kernel)]
    bad, noted = [], []
    out = open(args.out, "w") if args.out else None  # noqa: SIM115 (closed below)
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), initializer=_set_policy, initargs=policy) as pool:
        for r in pool.map(compile_case, jobs, chunksize=1 if args.smoke else 4):
            line = json.dumps(r)
            print(line, flush=True)
            if out is not None:
                out.write(line + "\n")
            detail = f" ({r['error']})" if r["error"] else ""
            bad += [f"{r['case']} sm_{r['arch']}: {p}{detail}" for p in r["problems"]]
            noted += [f"{r['case']} sm_{r['arch']}: {f}" for f in r["findings"] if f not in r["problems"]]
    if out is not None:
        out.close()
    print(
        f"aot_compile: {len(jobs)} compilations, {len(bad)} problems, {len(noted)} tolerated findings", file=sys.stderr
    )
    for line in bad:
        print("  " + line[:2000], file=sys.stderr)
    for line in noted:
        print("  tolerated: " + line[:2000], file=sys.stderr)
    return 1 if (args.check and bad) or not jobs else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
