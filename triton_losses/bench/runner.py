"""The benchmark loop: every op x size x provider, measured, derived, printed as it goes."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import report
from .memory import CPU_METHOD, CUDA_METHOD, peak_memory
from .meta import load_average, stamp
from .progress import Progress
from .providers import Provider
from .registry import MODES, Op, Size
from .timing import copy_bandwidth, first_call, time_modes


@dataclass
class Config:
    ops: list[Op]
    sizes: list[Size]
    hidden: list[int]
    dtype: torch.dtype
    device: torch.device
    providers: list[Provider]
    quick: bool
    warmup_ms: float
    rep_ms: float
    min_reps: int
    copy_bytes: int

    def timing_text(self) -> str:
        if self.device.type == "cuda":
            return (
                f"triton.testing.do_bench (warmup {self.warmup_ms:g} ms, rep {self.rep_ms:g} ms, L2 flushed and "
                "gradients reset before each run) for fwd and fwd+bwd; bwd alone by the same method with an "
                "untimed forward before each timed backward"
            )
        return (
            f"wall clock; after the first call (warm-up) and the memory run, forward→backward iterations for "
            f"≥ {self.rep_ms:g} ms and ≥ {self.min_reps} iterations; fwd, bwd and fwd+bwd samples come from "
            "the same iterations"
        )

    def to_dict(self) -> dict:
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "ops": [op.name for op in self.ops],
            "sizes": [s.label for s in self.sizes],
            "hidden": self.hidden,
            "quick": self.quick,
            "warmup_ms": self.warmup_ms,
            "rep_ms": self.rep_ms,
            "min_reps": self.min_reps,
            "timing": self.timing_text(),
            "memory": CUDA_METHOD if self.device.type == "cuda" else CPU_METHOD,
        }


def op_info(op: Op) -> dict:
    """What the results record about an op besides its rows."""
    return {"axes": list(op.axes), "bytes_note": op.bytes_note, "flops": op.flops is not None}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reason(e: BaseException) -> str:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "out of memory"
    first = next((ln for ln in str(e).strip().splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {first}"[:300]


def measure(op: Op, size: Size, provider: Provider, cfg: Config, copy_gbps: float) -> dict:
    """One result row: times, bandwidth, memory (or the status and reason it was not measured)."""
    b = torch.empty((), dtype=cfg.dtype).element_size()
    row = {
        "op": op.name,
        "provider": provider.name,
        "N": size.N,
        "V": size.V,
        "H": size.H,
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "status": "ok",
        "reason": None,
        "bytes": op.bytes_moved(size, b),
        "flops": op.flops(size) if op.flops else None,
    }
    if provider.status != "ok":
        return {**row, "status": provider.status, "reason": provider.reason}
    try:
        fn = provider.build(op)
    except LookupError as e:
        return {**row, "status": "missing", "reason": str(e)}
    except Exception as e:  # e.g. an optional provider's import failing: that row, not the run
        return {**row, "status": "error", "reason": _reason(e)}
    case = None
    try:
        torch.manual_seed(0)
        case = op.inputs(size, cfg.dtype, cfg.device)
        row["first_call_s"] = first_call(fn, case, cfg.device)
        row["memory"] = peak_memory(fn, case, cfg.device)
        times = time_modes(fn, case, cfg.device, warmup_ms=cfg.warmup_ms, rep_ms=cfg.rep_ms, min_reps=cfg.min_reps)
    except Exception as e:  # reported in the table, never dropped
        return {**row, "status": "error", "reason": _reason(e)}
    finally:
        del case
        _free(cfg.device)
    row["time_ms"] = {m: times[m].to_dict() for m in MODES}
    row["gbps"] = {m: row["bytes"][m] / (times[m].median * 1e-3) / 1e9 for m in MODES}
    row["copy_fraction"] = {m: row["gbps"][m] / copy_gbps for m in MODES}
    if row["flops"]:
        row["tflops"] = {m: row["flops"][m] / (times[m].median * 1e-3) / 1e12 for m in MODES}
    return row


def _compare(row: dict, base: dict | None) -> None:
    """Speed and memory relative to torch eager on the same op and size."""
    if row["status"] != "ok" or not base or base["status"] != "ok":
        return
    row["speedup_vs_torch"] = base["time_ms"]["fwd+bwd"]["median"] / row["time_ms"]["fwd+bwd"]["median"]
    row["memory_vs_torch"] = row["memory"]["peak_bytes"] / base["memory"]["peak_bytes"]


def _compare_all(rows: list[dict]) -> None:
    """``speedup_vs``: each measured row's fwd+bwd speed against every other provider measured on the
    same op and size in this run (other's median / this one's; above 1 is faster)."""
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        mine = r["time_ms"]["fwd+bwd"]["median"]
        r["speedup_vs"] = {o["provider"]: o["time_ms"]["fwd+bwd"]["median"] / mine for o in ok if o is not r}


def run(
    cfg: Config,
    argv: list[str] | None = None,
    progress: bool | None = None,
    checkpoint: Callable[[dict], None] | None = None,
) -> dict:
    """Run the benchmark described by ``cfg``; returns the results document (see ``report``).

    ``checkpoint``, if given, receives the document as it stands after every measured row (and once
    more when a size's comparisons are in), so a run cut short (a step's time limit) still leaves
    every row measured until then.
    """
    meta = stamp(cfg.device, argv)
    v = meta["versions"]
    print(f"triton-losses bench on {meta['device']}, {cfg.to_dict()['dtype']}")
    print(f"torch {v['torch']}, triton {v.get('triton')}, commit {(meta['git']['commit'] or '?')[:12]}")
    print(f"command: {meta['command']}")
    load = meta["load_average_start"]
    cores = os.cpu_count() or 1
    if cfg.device.type == "cpu" and load and load[0] > 0.5 * cores:
        hint = "" if torch.get_num_threads() == 1 else "; threads waiting for each other slow them most (--threads 1)"
        print(f"note: the machine is busy (load average {load[0]} on {cores} cores): CPU timings will be noisy{hint}")
    for p in cfg.providers:
        print(f"  {p.name:<14} {p.status:<8} {(p.note if p.status == 'ok' else p.reason) or ''}")
    gbps, copy_stats = copy_bandwidth(cfg.device, cfg.copy_bytes, rep_ms=cfg.rep_ms, min_reps=max(cfg.min_reps, 5))
    copy_method = f"dst.copy_(src) of {cfg.copy_bytes / 2**20:g} MiB, counted as read + write, median"
    print(f"copy bandwidth: {gbps:.1f} GB/s ({copy_method})")

    plan = [(op, s) for op in cfg.ops for s in op.sizes_for(cfg.sizes, cfg.hidden)]
    live = [p for p in cfg.providers if p.status == "ok"]
    bar = Progress(len(plan) * len(live), enabled=progress)
    results: list[dict] = []
    document = lambda: _document(meta, cfg, gbps, copy_stats, copy_method, results)
    try:
        current = None
        for op, size in plan:
            info = op_info(op)
            if op is not current:
                if current is not None:
                    _print_absent(bar, current, cfg, results)
                current = op
                bar.print(f"\n{op.name}: bytes counted {op.bytes_note}")
                bar.print(report.console_header(info))
            base, group = None, []
            for p in cfg.providers:
                if p.status == "ok":
                    bar.step(f"{op.name} {size.label} {p.name}")
                row = measure(op, size, p, cfg, gbps)
                base = row if p.name == "torch" else base
                _compare(row, base)
                group.append(row)
                results.append(row)
                if p.status == "ok":
                    bar.advance()
                    if row["status"] in ("ok", "error"):
                        bar.print(report.console_row(row, info))
                    if checkpoint is not None:
                        checkpoint(document())
            _compare_all(group)
            if line := report.ours_against(group):
                bar.print(line)
                if checkpoint is not None:
                    checkpoint(document())
        if current is not None:
            _print_absent(bar, current, cfg, results)
    finally:
        bar.close()
    meta["load_average_end"] = load_average()
    return document()


def _document(meta: dict, cfg: Config, gbps: float, copy_stats, copy_method: str, results: list[dict]) -> dict:
    """The results document (``report``'s schema) of the rows measured so far."""
    return {
        "schema": 1,
        "meta": meta,
        "config": cfg.to_dict(),
        "copy_bandwidth": {
            "gbps": gbps,
            "bytes": cfg.copy_bytes,
            "time_ms": copy_stats.to_dict(),
            "method": copy_method,
        },
        "providers": {p.name: p.to_dict() for p in cfg.providers},
        "ops": {op.name: op_info(op) for op in cfg.ops},
        "results": results,
    }


def _print_absent(bar: Progress, op: Op, cfg: Config, results: list[dict]) -> None:
    providers = {p.name: p.to_dict() for p in cfg.providers}
    rows = [r for r in results if r["op"] == op.name]
    for prov, status, reason in report.op_specific_absences(providers, rows):
        bar.print(f"  not measured: {prov} ({status}: {reason})")
