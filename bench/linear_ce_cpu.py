"""CPU benchmark of ``linear_cross_entropy`` (forward + backward) against torch, time and peak memory.

Providers (fp32 by default, N=8192, H=256, V=32000, gradients for input and weight):

* ``ours``: ``triton_losses.linear_cross_entropy`` (the chunked PyTorch path on the CPU);
  ``ours@K``: the same with ``chunk_size=K`` (``--chunk-sizes``, to tune the heuristic);
* ``eager``: ``F.cross_entropy(F.linear(x, W), t)``;
* ``torch_chunked``: ``F.linear_cross_entropy(x, W, t, options=LinearCrossEntropyOptions())``
  (torch >= 2.13; skipped where it does not exist).

Time: wall-clock of one forward + backward (``loss.backward()``, gradients set to None between calls),
in one process, providers interleaved round by round in a shuffled order (the machine may be shared,
so a slow spell hits every provider alike); the median and the minimum over ``--rounds`` are reported.

Peak added memory: each provider runs in a fresh subprocess, which builds the inputs, runs the provider
once on a tiny problem (library initialisation), frees it, calls ``malloc_trim(0)`` so freed heap goes
back to the OS, records the resident set size (VmRSS), resets the kernel's high-water mark
(``echo 5 > /proc/self/clear_refs``), runs one forward + backward at full size and reads ``VmHWM``.
Peak added = VmHWM - baseline VmRSS: everything the call allocated, including the gradients it returns
(``x.grad`` and ``W.grad``, which every provider must produce; their size is reported alongside).

Writes ``bench/results/linear_ce_cpu.json`` and ``.md``, stamped with the CPU model, torch / triton
versions, date, git commit and the command line. Run: ``python bench/linear_ce_cpu.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import triton_losses  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def _status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def has_torch_chunked() -> bool:
    return hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def make_step(name: str):
    """The forward + backward of provider ``name`` as ``step(x, W, t)``."""
    if name == "eager":
        return lambda x, W, t: F.cross_entropy(F.linear(x, W), t).backward()
    if name == "torch_chunked":
        opts = torch.nn.LinearCrossEntropyOptions()
        return lambda x, W, t: F.linear_cross_entropy(x, W, t, options=opts).backward()
    if name == "ours" or name.startswith("ours@"):
        chunk = int(name.split("@")[1]) if "@" in name else None
        return lambda x, W, t: triton_losses.linear_cross_entropy(x, W, t, chunk_size=chunk).backward()
    raise ValueError(name)


def make_inputs(N: int, H: int, V: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    return x, W, t


def _clear(x, W) -> None:
    x.grad = None
    W.grad = None


def measure_memory(name: str, N: int, H: int, V: int, dtype: torch.dtype) -> dict:
    """Runs in the child process: peak RSS added by one forward + backward of ``name``."""
    step = make_step(name)
    x, W, t = make_inputs(N, H, V, dtype)
    xs, Ws, ts = make_inputs(64, H, 512, dtype, seed=1)
    step(xs, Ws, ts)  # initialise the libraries on a tiny problem
    del xs, Ws, ts
    _trim()
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    step(x, W, t)
    peak = _status("VmHWM")
    grads = x.grad.numel() * x.grad.element_size() + W.grad.numel() * W.grad.element_size()
    return {"peak_added_bytes": peak - base, "grad_bytes": grads, "baseline_rss_bytes": base}


def memory_in_subprocess(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child-memory", name, "--N", str(args.N), "--H", str(args.H),
           "--V", str(args.V), "--dtype", args.dtype]  # fmt: skip
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child for {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_time(names: list[str], args, dtype: torch.dtype) -> dict:
    x, W, t = make_inputs(args.N, args.H, args.V, dtype)
    steps = {n: make_step(n) for n in names}
    for n in names:  # warm-up
        steps[n](x, W, t)
        _clear(x, W)
    samples: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = list(names)
        rng.shuffle(order)
        for n in order:
            _clear(x, W)
            t0 = time.perf_counter()
            steps[n](x, W, t)
            samples[n].append(time.perf_counter() - t0)
    _clear(x, W)
    return {n: {"median_s": statistics.median(s), "min_s": min(s), "samples_s": s} for n, s in samples.items()}


def check_agreement(names: list[str], args, dtype: torch.dtype) -> dict:
    """Max |difference| of the loss and gradients of each provider against eager, on the bench inputs."""
    x, W, t = make_inputs(args.N, args.H, args.V, dtype)
    out = {}
    ref = None
    for n in ["eager", *[m for m in names if m != "eager"]]:
        _clear(x, W)
        if n == "eager":
            loss = F.cross_entropy(F.linear(x, W), t)
        elif n == "torch_chunked":
            loss = F.linear_cross_entropy(x, W, t, options=torch.nn.LinearCrossEntropyOptions())
        else:
            chunk = int(n.split("@")[1]) if "@" in n else None
            loss = triton_losses.linear_cross_entropy(x, W, t, chunk_size=chunk)
        loss.backward()
        got = (loss.detach().clone(), x.grad.clone(), W.grad.clone())
        if ref is None:
            ref = got
            continue
        out[n] = {k: float((a - b).abs().max()) for k, a, b in zip(("loss", "grad_input", "grad_weight"), got, ref)}
    _clear(x, W)
    return out


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def stamp(argv: list[str]) -> dict:
    def git(*a):
        r = subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": f"CPU: {cpu_model()} ({os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "triton": triton_version,
        "triton_losses": triton_losses.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "command": " ".join(["python", *(shlex.quote(a) for a in argv)]),
    }


def markdown(res: dict) -> str:
    s, cfg = res["stamp"], res["config"]
    mib = 1 << 20
    eager_mem = res["memory"]["eager"]["peak_added_bytes"]
    lines = [
        "# linear_cross_entropy on the CPU: forward + backward",
        "",
        f"{s['device']}; torch {s['torch']}, triton {s['triton']}; {s['date']}; "
        f"commit {s['git_commit']}{' (dirty)' if s['git_dirty'] else ''}.",
        f"Command: `{s['command']}`",
        "",
        f"{cfg['dtype']}, N={cfg['N']}, H={cfg['H']}, V={cfg['V']}; gradients for input and weight "
        f"({res['memory']['eager']['grad_bytes'] / mib:.1f} MiB of them, counted in every row). "
        f"Time: wall-clock median (min) of {cfg['rounds']} rounds, providers interleaved in a shuffled order "
        "(every sample is in the JSON; the machine may be shared, and a busy spell slows a whole round).",
        "Memory: peak RSS added by one call, in a fresh process per provider: inputs built, a tiny warm-up "
        "call, `malloc_trim(0)`, baseline VmRSS, high-water mark reset (`/proc/self/clear_refs`), the call, "
        "then VmHWM - baseline.",
        "",
        "| provider | chunk rows | median s | min s | peak added MiB | % of eager memory |",
        "|---|---|---|---|---|---|",
    ]
    for n, tm in res["time"].items():
        mem = res["memory"][n]["peak_added_bytes"]
        lines.append(
            f"| {n} | {res['chunk_rows'].get(n, '-')} | {tm['median_s']:.3f} | {tm['min_s']:.3f} | "
            f"{mem / mib:.1f} | {100 * mem / eager_mem:.1f}% |"
        )
    lines += ["", "Bars: ours at most 15% of eager's peak added memory, and no worse than "
              "torch_chunked in time and memory.", ""]  # fmt: skip
    for name, ok in res["bars"].items():
        lines.append(f"- {name}: {'met' if ok else 'NOT met'}")
    lines += ["", "Max |difference| against eager (loss, grad_input, grad_weight):", ""]
    for n, d in res["agreement"].items():
        lines.append(f"- {n}: " + ", ".join(f"{k} {v:.2e}" for k, v in d.items()))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=8192)
    ap.add_argument("--H", type=int, default=256)
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--chunk-sizes", default="", help="comma-separated chunk sizes to add as ours@K providers")
    ap.add_argument("--no-eager-time", action="store_true", help="measure eager's memory but not its time")
    ap.add_argument("--out", default=str(RESULTS / "linear_ce_cpu"), help="output path without extension")
    ap.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv[1:])
    dtype = getattr(torch, args.dtype)
    if args.child_memory:
        print(json.dumps(measure_memory(args.child_memory, args.N, args.H, args.V, dtype)))
        return
    names = ["ours", "eager"] + (["torch_chunked"] if has_torch_chunked() else [])
    names += [f"ours@{k}" for k in args.chunk_sizes.split(",") if k.strip()]
    from triton_losses._linear_ce_chunks import chunk_rows

    rows = {n: (int(n.split("@")[1]) if "@" in n else None) for n in names if n.startswith("ours")}
    rows["ours"] = chunk_rows(args.N, args.V, dtype.itemsize, torch.device("cpu"))
    if "torch_chunked" in names:
        opts = torch.nn.LinearCrossEntropyOptions()._adjust(args.N, args.H, args.V, dtype, torch.device("cpu"))
        rows["torch_chunked"] = opts.batch_chunk_size
    res = {"stamp": stamp(argv), "config": vars(args) | {"child_memory": None}, "chunk_rows": rows}
    print(json.dumps(res["stamp"], indent=1), flush=True)
    res["memory"] = {}
    for n in names:
        res["memory"][n] = memory_in_subprocess(n, args)
        print(f"memory {n}: {res['memory'][n]['peak_added_bytes'] / (1 << 20):.1f} MiB", flush=True)
    timed = [n for n in names if not (args.no_eager_time and n == "eager")]
    res["time"] = measure_time(timed, args, dtype)
    for n, tm in res["time"].items():
        print(f"time {n}: median {tm['median_s']:.3f} s, min {tm['min_s']:.3f} s", flush=True)
    res["agreement"] = check_agreement([n for n in names if n != "eager"], args, dtype)
    mem = {n: m["peak_added_bytes"] for n, m in res["memory"].items()}
    res["bars"] = {"ours peak added <= 15% of eager": mem["ours"] <= 0.15 * mem["eager"]}
    if "torch_chunked" in names:
        res["bars"]["ours memory <= torch_chunked"] = mem["ours"] <= mem["torch_chunked"]
        res["bars"]["ours median time <= torch_chunked"] = (
            res["time"]["ours"]["median_s"] <= res["time"]["torch_chunked"]["median_s"]
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
