"""The performance goals, judged from one ``bench/gpu_session.sh`` run's files.

``python bench/gpu_goals.py OUT`` reads ``OUT/ce-sweep.jsonl`` (the device facts: copy bandwidth and
linear cross-entropy's three GEMMs) and ``OUT/bench.json`` / ``OUT/bench-extra.json`` (``triton-losses
bench``) and prints one table: each goal, what was measured, its target, PASS / FAIL / not measured
(and why), and which file the number comes from. Numbers compared with each other always come from
one process (one copy-bandwidth measurement, one set of clocks):

* cross-entropy fwd+bwd, N x V (default 8192 x 128256) in the bench's dtype: at least 85 % of the
  copy bandwidth measured in the same run, for the read-once-write-once bytes (logits read, gradient
  written);
* the same step at least 1.3x faster than Liger-Kernel and 1.5x faster than ``torch.compile``
  (their fwd+bwd median / ours, measured in the same ``triton-losses bench`` run as ours);
* ``linear_cross_entropy`` fwd+bwd at N x V x H (default 8192 x 128256 x 4096) within 1.15x of the
  time of its three GEMMs alone (``gpu_sweep.py facts``, the same shape and dtype).

It always exits 0: it reports, the session's other steps decide success.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CE_GOAL = dict(copy_fraction=0.85, liger=1.3, compile=1.5)
LINEAR_GOAL = 1.15  # linear cross-entropy fwd+bwd / its three GEMMs, at most
BENCH_FILES = ("bench.json", "bench-extra.json")


def _size(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.lower().split("x"))


def _load(out: Path) -> tuple[dict | None, list[tuple[str, dict]]]:
    """The facts record of ``ce-sweep.jsonl`` (or None) and ``(file name, row)`` of every bench row."""
    facts = None
    sweep = out / "ce-sweep.jsonl"
    if sweep.exists():
        for line in sweep.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a timeout
                continue
            if record.get("kind") == "facts":
                facts = record
    rows = []
    for name in BENCH_FILES:
        path = out / name
        if path.exists():
            try:
                doc = json.loads(path.read_text())
            except json.JSONDecodeError:
                continue
            rows += [(name, r) for r in doc.get("results", [])]
    return facts, rows


def _ours(rows: list[tuple[str, dict]], op: str, size: tuple[int, ...]) -> list[tuple[str, dict]]:
    """Ours' measured rows of ``op`` at ``size`` ((N, V) or (N, V, H)), in file order."""

    def at(r: dict) -> bool:
        return (r["N"], r["V"], *((r["H"],) if len(size) == 3 else ())) == size

    return [(f, r) for f, r in rows if r["op"] == op and r["provider"] == "ours" and r["status"] == "ok" and at(r)]


def _verdict(value: float | None, target: float, at_least: bool) -> str:
    if value is None:
        return "not measured"
    return "PASS" if (value >= target if at_least else value <= target) else "FAIL"


def goals(out: Path, ce: tuple[int, int], linear: tuple[int, int, int]) -> list[dict]:
    """One dict per goal: ``goal``, ``value`` (or None), ``target``, ``verdict``, ``source`` / ``why``."""
    facts, rows = _load(out)
    ce_label, lin_label = "x".join(map(str, ce)), "x".join(map(str, linear))
    ce_rows = _ours(rows, "cross_entropy", ce)
    found = []

    first = ce_rows[0] if ce_rows else None
    frac = first[1]["copy_fraction"]["fwd+bwd"] if first else None
    found.append(dict(goal=f"cross_entropy fwd+bwd {ce_label}: share of the copy bandwidth", value=frac,
                      target=CE_GOAL["copy_fraction"], at_least=True, source=first[0] if first else None,
                      why=None if first else f"no ours row for cross_entropy {ce_label}"))  # fmt: skip
    for provider, key in (("liger", "liger"), ("torch.compile", "compile")):
        hit = next(((f, r) for f, r in ce_rows if provider in (r.get("speedup_vs") or {})), None)
        why = None
        if hit is None:
            absent = [r for _, r in rows if r["op"] == "cross_entropy" and r["provider"] == provider]
            why = f"{absent[0]['status']}: {absent[0]['reason']}" if absent else f"{provider} not run with ours"
        found.append(dict(goal=f"cross_entropy fwd+bwd {ce_label}: speedup over {provider}",
                          value=hit[1]["speedup_vs"][provider] if hit else None, target=CE_GOAL[key],
                          at_least=True, source=hit[0] if hit else None, why=why))  # fmt: skip

    n, v, h = linear
    lin_rows = _ours(rows, "linear_cross_entropy", (n, v, h))
    g = (facts or {}).get("gemms") or {}
    same_shape = (g.get("N"), g.get("V"), g.get("H")) == (n, v, h)
    value, why, source = None, None, None
    if not lin_rows:
        why = f"no ours row for linear_cross_entropy {lin_label}"
    elif not same_shape:
        why = f"no GEMM reference at {lin_label} in ce-sweep.jsonl (device facts step)"
    else:
        value = lin_rows[0][1]["time_ms"]["fwd+bwd"]["median"] / g["ms"]["all3"]
        source = f"{lin_rows[0][0]} / ce-sweep.jsonl"
    found.append(dict(goal=f"linear_cross_entropy fwd+bwd {lin_label}: time over its three GEMMs", value=value,
                      target=LINEAR_GOAL, at_least=False, source=source, why=why))  # fmt: skip
    for d in found:
        d["verdict"] = _verdict(d["value"], d["target"], d.pop("at_least"))
    return found


def table(found: list[dict]) -> str:
    lines = ["| goal | measured | target | verdict | from |", "|---|---|---|---|---|"]
    for d in found:
        value = "-" if d["value"] is None else f"{d['value']:.3g}"
        cmp = "≤" if "GEMMs" in d["goal"] else "≥"
        where = d["source"] or d["why"]
        lines.append(f"| {d['goal']} | {value} | {cmp} {d['target']} | {d['verdict']} | {where} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/gpu_goals.py", description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="the session's output folder")
    ap.add_argument("--ce", type=_size, default=(8192, 128256), help="cross-entropy size NxV (default 8192x128256)")
    ap.add_argument("--linear", type=_size, default=(8192, 128256, 4096), help="linear CE size NxVxH")
    args = ap.parse_args(argv)
    print(table(goals(args.out, args.ce, args.linear)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
