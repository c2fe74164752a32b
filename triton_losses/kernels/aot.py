"""Ahead-of-time compilation of every kernel specialisation, for tests (tier 3 of DESIGN.md).

``python -m triton_losses.kernels.aot ARCH [ARCH ...]`` compiles each case that a kernels
module's ``aot_cases()`` lists to cubin for ``sm_ARCH`` and prints one JSON line per case:
``{"case": ..., "arch": ..., "error": null | "...", "regs": ..., "stack": ...}``, the last two
being the registers per thread and the stack frame (register spills) in bytes that the cubin
declares, read with the ``cuobjdump`` that ships with triton (null where there is none). It must run without ``TRITON_INTERPRET``
(the interpreter replaces ``@triton.jit`` functions); the tests start it as a subprocess.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor


def all_cases() -> dict:
    import triton_losses.kernels as kernels

    out = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        if info.name == "aot":
            continue
        module = importlib.import_module(f"triton_losses.kernels.{info.name}")
        for case in getattr(module, "aot_cases", lambda: ())():
            out.setdefault(repr(case), case)
    return out


def _resources(cubin: bytes) -> tuple[int | None, int | None]:
    """``(registers per thread, stack bytes)`` of the one kernel in ``cubin``, or Nones."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def _compile(key_arch: tuple[str, int]) -> dict:
    key, arch = key_arch
    case = all_cases()[key]
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        src = ASTSource(fn=case.kernel, signature=case.signature(), constexprs=case.constexprs)
        out = triton_compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": case.num_warps})
        error = None if len(out.asm["cubin"]) > 0 else "empty cubin"
        regs, stack = _resources(out.asm["cubin"]) if error is None else (None, None)
    except Exception as e:  # reported, not raised: one bad case must not hide the others
        chain = [e]
        while chain[-1].__cause__ or chain[-1].__context__:
            chain.append(chain[-1].__cause__ or chain[-1].__context__)
        error = " <- ".join(f"{type(c).__name__}: {c}"[-600:] for c in reversed(chain))[-3000:]
        regs = stack = None
    return {"case": key, "arch": arch, "error": error, "regs": regs, "stack": stack}


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile kernels", file=sys.stderr)
        return 2
    archs = [int(a) for a in argv] or [80, 90]
    jobs = [(key, arch) for arch in archs for key in all_cases()]
    with ProcessPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        for result in pool.map(_compile, jobs, chunksize=4):
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
