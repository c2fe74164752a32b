"""Device facts and the cross-entropy launch-configuration sweep of ``bench/gpu_session.sh``.

``python bench/gpu_sweep.py facts [--out FILE]`` prints the device (name, SMs, L2, memory, versions),
its measured copy bandwidth and the time of the three GEMMs of a linear cross-entropy step at
N = 8192, H = 4096, V = 128256 bf16 (the denominator of the goal "linear cross-entropy within 1.15x
of its GEMMs") as one JSON line, and appends it to FILE (``"kind": "facts"``).

``python bench/gpu_sweep.py sweep --out FILE`` times the cross-entropy *forward* of ``triton_losses``
at N = 8192 x V in {128256, 32000, 262144} bf16, with the gradient write first (the fused gradient:
reads and writes N*V*2 bytes; what a training step runs) and then without it (``x`` needs no grad:
reads N*V*2 bytes), for every launch configuration in :data:`CONFIGS` (forced through the
launch-configuration function the launchers call), and every CE variant the kernels module offers
through its environment override (``two_pass`` only with the gradient: without it, it is ``rows``).
Each measurement is a JSON line in FILE as it is taken (``"kind": "sweep"``, GB/s and % of the copy
bandwidth); at the end it prints the tables and the launch configuration the measurements imply per
V and mode. The sweep times the forward alone; the goals are read from the forward+backward of
``triton-losses bench`` (``bench/gpu_goals.py``). ``--budget-s`` stops taking new measurements in
time to print them. ``--dry-run``: toy sizes on the CPU (through Triton's interpreter).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton_losses as tl_
from triton_losses.bench.meta import versions
from triton_losses.bench.timing import copy_bandwidth
from triton_losses.kernels import cross_entropy as ce_kernels

N = 8192
VOCABS = (128256, 32000, 262144)  # most valuable first: a budget cut drops the last
# (BLOCK_C, num_warps) forced on the launchers; BLOCK_R = 1 (rows this long take one row per program).
CONFIGS = [(bc, w) for bc in (4096, 8192, 16384, 2048) for w in (8, 16, 4)]
DRY = dict(N=4, VOCABS=(200, 64), CONFIGS=[(64, 4), (32, 4)])
# The linear cross-entropy goal's shape (tokens, hidden, vocabulary), and a toy one for --dry-run.
LINEAR, DRY_LINEAR = (8192, 4096, 128256), (8, 16, 300)  # (N, H, V)


def gemms(device: torch.device, n: int, h: int, v: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Milliseconds of the three GEMMs of a linear cross-entropy step, each alone and all three in a row.

    ``logits = x @ W.T`` (N, V), ``grad_input = g @ W`` (N, H) and ``grad_weight = g.T @ x`` (V, H), for
    ``x`` (N, H), ``W`` (V, H) and a (N, V) gradient ``g``, in ``dtype`` (cuBLAS accumulates in fp32) with
    the layouts ``linear_cross_entropy`` uses; L2 flushed before each run (do_bench).
    """
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, h, device=device, generator=gen).to(dtype)
    w = torch.randn(v, h, device=device, generator=gen).to(dtype)
    g = torch.randn(n, v, device=device, generator=gen).to(dtype)
    fns = {"logits": lambda: x @ w.t(), "grad_input": lambda: g @ w, "grad_weight": lambda: g.t() @ x}
    out = {name: time_ms(f, device, warmup=200, rep=500) for name, f in fns.items()}
    out["all3"] = time_ms(lambda: [f() for f in fns.values()], device, warmup=200, rep=800)
    out["tflops_all3"] = 6 * n * h * v / (out["all3"] * 1e-3) / 1e12
    return dict(N=n, H=h, V=v, dtype=str(dtype).removeprefix("torch."), ms=out)


def copy_gbps(device: torch.device, copy_mib: int) -> tuple[float, float]:
    """The measured copy bandwidth (GB/s, read + write) and the median ms of one copy."""
    gbps, st = copy_bandwidth(device, copy_mib * 2**20, rep_ms=200.0 if device.type == "cuda" else 0.0, min_reps=3)
    return gbps, st.median


def facts(device: torch.device, copy_mib: int, linear: tuple[int, int, int] = LINEAR) -> dict:
    """Device name, SMs, L2, memory, versions, the measured copy bandwidth (GB/s, read + write) and the
    time of linear cross-entropy's three GEMMs at ``linear`` = (N, H, V)."""
    out = {"device": str(device), "versions": versions()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        out.update(name=p.name, sms=p.multi_processor_count, l2_mib=getattr(p, "L2_cache_size", 0) / 2**20,
                   memory_gib=p.total_memory / 2**30, capability=f"{p.major}.{p.minor}")  # fmt: skip
    else:
        out.update(name="cpu", sms=os.cpu_count(), l2_mib=None, memory_gib=None, capability=None)
    # triton builds its launcher stubs with a host C compiler and Python's headers on a process's first launch
    cc = next((shutil.which(c) for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)
    headers = Path(sysconfig.get_paths()["include"], "Python.h").exists()
    out.update(c_compiler=cc, python_headers=headers)
    gbps, ms = copy_gbps(device, copy_mib)
    out.update(copy_gbps=gbps, copy_ms=ms, copy_mib=copy_mib)
    out["gemms"] = gemms(device, *linear)
    return out


def time_ms(fn, device: torch.device, warmup: float = 10, rep: float = 40) -> float:
    """Median milliseconds of ``fn()``: ``do_bench`` on CUDA, the best of 3 wall-clock runs on a CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return min(samples)


@contextlib.contextmanager
def forced_config(block_c: int, warps: int):
    """Make the cross-entropy launchers use ``(1, block_c, warps)``; yields the list of calls it served."""
    original = ce_kernels.launch_config
    calls: list[tuple] = []

    def config(C, elem_size, contiguous, *rest, **kw):
        calls.append((C, elem_size, contiguous))
        return 1, block_c, warps

    ce_kernels.launch_config = config
    try:
        yield calls
    finally:
        ce_kernels.launch_config = original


def variants() -> list[tuple[str, str | None]]:
    """``(env var, value)`` per CE variant the kernels module lists (``VARIANT_ENV``, ``VARIANTS``), or the default."""
    env, names = getattr(ce_kernels, "VARIANT_ENV", None), getattr(ce_kernels, "VARIANTS", ())
    return [(env, v) for v in names] if env and names else [("", None)]


def measure(x: torch.Tensor, t: torch.Tensor, config: tuple[int, int] | None, variant, copy_gbps: float) -> dict:
    """One measurement: the forward of ``cross_entropy(x, t)``, writing the fused gradient if ``x`` needs one."""
    (n, V), grad = x.shape, x.requires_grad
    env, value = variant
    saved = os.environ.get(env) if env else None
    if env:
        os.environ[env] = value
    try:
        with forced_config(*config) if config else contextlib.nullcontext([None]) as calls:
            ms = time_ms(lambda: tl_.cross_entropy(x, t), x.device)
        if config and not calls:
            raise RuntimeError("the cross-entropy launchers no longer call kernels.cross_entropy.launch_config")
    finally:
        if env:
            os.environ.pop(env) if saved is None else os.environ.__setitem__(env, saved)
    moved = n * V * 2 * (2 if grad else 1)
    gbps = moved / (ms * 1e-3) / 1e9
    return dict(kind="sweep", V=V, N=n, grad=grad, config=list(config) if config else "default",
                variant=value or "default", ms=ms, gbps=gbps, pct_copy=100 * gbps / copy_gbps, bytes=moved)  # fmt: skip


def table(rows: list[dict]) -> str:
    """Markdown: every measurement, then the best configuration per (V, mode) against the default."""
    lines = ["Cross-entropy forward alone (the fwd+bwd goals are in triton-losses bench's tables):", ""]
    lines += ["| V | mode | variant | BLOCK_C, warps | ms | GB/s | % copy |", "|---|---|---|---|---|---|---|"]
    key = lambda r: (r["V"], r["grad"], -r["gbps"])
    for r in sorted(rows, key=key):
        mode = "fwd+grad write" if r["grad"] else "fwd"
        lines.append(f"| {r['V']} | {mode} | {r['variant']} | {r['config']} | {r['ms']:.3f} | {r['gbps']:.4g} | "
                     f"{r['pct_copy']:.3g} |")  # fmt: skip
    lines += ["", "## launch configurations implied", ""]
    lines += ["| V | mode | best variant | best BLOCK_C, warps | GB/s | % copy | default GB/s |", "|" + "---|" * 7]
    for V, grad in sorted({(r["V"], r["grad"]) for r in rows}):
        group = [r for r in rows if r["V"] == V and r["grad"] == grad]
        best = max(group, key=lambda r: r["gbps"])
        default = [r["gbps"] for r in group if r["config"] == "default" and r["variant"] == "default"]
        mode = "fwd+grad write" if grad else "fwd"
        lines.append(f"| {V} | {mode} | {best['variant']} | {best['config']} | {best['gbps']:.4g} | "
                     f"{best['pct_copy']:.3g} | {f'{default[0]:.4g}' if default else '-'} |")  # fmt: skip
    return "\n".join(lines)


def sweep(args, device: torch.device) -> int:
    """Every (V, mode, variant, configuration) in order of value, until done or ``args.budget_s`` is spent."""
    n, vocabs, configs = (DRY["N"], DRY["VOCABS"], DRY["CONFIGS"]) if args.dry_run else (N, VOCABS, CONFIGS)
    start = time.monotonic()
    copy, _ = copy_gbps(device, 16 if args.dry_run else 1024)
    rows: list[dict] = []
    with open(args.out, "a") as f:
        for V, grad in itertools.product(vocabs, (True, False)):  # the gradient-writing forward first
            x = torch.randn(n, V, device=device, dtype=torch.bfloat16).requires_grad_(grad)
            t = torch.randint(0, V, (n,), device=device)
            # without the gradient, two_pass is the rows variant: measured once, as rows
            kinds = [v for v in variants() if grad or v[1] != "two_pass"]
            for variant, config in itertools.product(kinds, [None, *configs]):
                if time.monotonic() - start > args.budget_s:
                    print(f"sweep: the budget of {args.budget_s:.0f} s is spent after {len(rows)} measurements")
                    print(table(rows))
                    return 0
                try:
                    r = measure(x, t, config, variant, copy)
                    rows.append(r)
                except Exception as e:  # recorded: one failing configuration must not end the sweep
                    r = dict(kind="sweep", V=V, grad=grad, config=config, variant=variant[1],
                             error=f"{type(e).__name__}: {e}")  # fmt: skip
                    print("sweep:", r)
                f.write(json.dumps(r) + "\n")
                f.flush()
            del x, t
    print(table(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/gpu_sweep.py", description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=("facts", "sweep"))
    ap.add_argument("--out", type=Path, help="JSON lines file, appended to (sweep: as measurements come)")
    ap.add_argument("--budget-s", type=float, default=120.0, help="sweep: stop taking measurements after this")
    ap.add_argument("--copy-mib", type=int, default=1024, help="facts: copy-bandwidth buffer (default 1024)")
    ap.add_argument("--dry-run", action="store_true", help="toy sizes, on the CPU")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if args.command == "facts":
        record = facts(device, 16 if args.dry_run else args.copy_mib, DRY_LINEAR if args.dry_run else LINEAR)
        print(json.dumps(record))
        if args.out is not None:
            with open(args.out, "a") as f:
                f.write(json.dumps({"kind": "facts", **record}) + "\n")
        return 0
    if args.out is None:
        ap.error("sweep needs --out")
    return sweep(args, device)


if __name__ == "__main__":
    raise SystemExit(main())
