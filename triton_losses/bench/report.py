"""Tables: the rows printed while the benchmark runs, ``results.md`` and ``results.json``."""

from __future__ import annotations

import json
from pathlib import Path

from .registry import Size

MIB = 1024**2

# (name, width); "H" only for ops with a hidden axis, "TFLOP/s" only for ops that count FLOPs.
COLUMNS = (
    ("N", 6),
    ("V", 7),
    ("H", 5),
    ("provider", 13),
    ("fwd ms", 14),
    ("bwd ms", 14),
    ("fwd+bwd ms", 14),
    ("GB/s", 7),
    ("% copy", 6),
    ("TFLOP/s", 7),
    ("peak MiB", 9),
    ("work MiB", 9),
    ("speedup", 7),
    ("mem/torch", 9),
)
NOTES = (
    "Times: medians in ms of fwd (inputs requiring grad, as in training), bwd (alone) and fwd+bwd (one step); "
    "± is half the 20-80 percentile range.",
    "GB/s: the bytes the op must move in fwd+bwd (counted per op, below) / the fwd+bwd median; "
    "% copy: that against the device's copy bandwidth measured in this run (above 100: the data sat in "
    "cache, or the traffic is mostly writes, such as nll_loss's zero-filled gradient).",
    "peak MiB: inputs + the most memory allocated on top of them during one fwd+bwd (the gradient included).",
    "work MiB: the most memory allocated during one fwd+bwd beyond the inputs and the gradients it returns.",
    "speedup: torch eager's fwd+bwd time / this provider's (above 1 is faster); "
    "mem/torch: this provider's peak / torch eager's (below 1 is leaner).",
    "TFLOP/s (matmul ops): the FLOPs of fwd+bwd (counted per op) / the fwd+bwd median.",
)


def _ms(stats: dict | None) -> str:
    if not stats:
        return "-"
    med = stats["median"]
    spread = (stats["p80"] - stats["p20"]) / (2 * med) * 100 if med > 0 else 0.0
    digits = 3 if med < 1 else 2 if med < 100 else 1 if med < 1000 else 0
    return f"{med:.{digits}f} ±{spread:.0f}%"


def _num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _sig(x: float | None) -> str:
    """Three significant digits at most, without exponents for the values these tables hold."""
    if x is None:
        return "-"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 1 else f"{x:.2g}"


def _optional(op_info: dict) -> dict[str, bool]:
    return {"H": "H" in op_info["axes"], "TFLOP/s": bool(op_info.get("flops"))}


def _columns(op_info: dict) -> list[tuple[str, int]]:
    show = _optional(op_info)
    return [(c, w) for c, w in COLUMNS if show.get(c, True)]


def cells(row: dict, op_info: dict) -> list[str]:
    """The table cells of one result row (a row not measured gets its status and reason in one cell).

    ``op_info`` is the op's entry in the results' ``ops`` (its ``axes``, whether it counts ``flops``).
    """
    show = _optional(op_info)
    head = [str(row["N"]), str(row["V"]), *([str(row["H"])] if show["H"] else []), row["provider"]]
    if row["status"] != "ok":
        return [*head, f"{row['status']}: {row['reason']}"]
    t, mem, frac = row["time_ms"], row.get("memory") or {}, row["copy_fraction"].get("fwd+bwd")
    tflops = [_sig((row.get("tflops") or {}).get("fwd+bwd"))] if show["TFLOP/s"] else []
    return [
        *head,
        _ms(t.get("fwd")),
        _ms(t.get("bwd")),
        _ms(t.get("fwd+bwd")),
        _sig(row["gbps"].get("fwd+bwd")),
        _sig(None if frac is None else 100 * frac),
        *tflops,
        _num(None if "peak_bytes" not in mem else mem["peak_bytes"] / MIB),
        _num(None if "grads_bytes" not in mem else (mem["extra_bytes"] - mem["grads_bytes"]) / MIB),
        _num(row.get("speedup_vs_torch"), 2),
        _num(row.get("memory_vs_torch"), 2),
    ]


def _size_label(row: dict) -> str:
    return Size(row["N"], row["V"], row.get("H")).label


def ours_against(rows: list[dict]) -> str | None:
    """One line for a size's rows: ours' fwd+bwd speedup over each other provider measured with it."""
    ours = next((r for r in rows if r["provider"] == "ours" and r.get("speedup_vs")), None)
    if ours is None:
        return None
    parts = ", ".join(f"{x:.2f}x {name}" for name, x in ours["speedup_vs"].items())
    return f"  ours fwd+bwd at {_size_label(ours)}: {parts} (their median / ours)"


def _ours_table(rows: list[dict]) -> list[str]:
    """Markdown rows: per size, ours' fwd+bwd speedup over each other provider (empty if none was compared)."""
    ours = [r for r in rows if r["provider"] == "ours" and r.get("speedup_vs")]
    others = list(dict.fromkeys(name for r in ours for name in r["speedup_vs"]))
    if not ours:
        return []
    out = ["", "ours' fwd+bwd speedup over each provider (their median / ours; above 1: ours is faster):", ""]
    out += ["| size | " + " | ".join(others) + " |", "|" + " --- |" * (len(others) + 1)]
    for r in ours:
        out.append(f"| {_size_label(r)} | " + " | ".join(_num(r["speedup_vs"].get(o), 2) for o in others) + " |")
    return out


def _pad(cell: str, name: str, width: int) -> str:
    return cell.ljust(width) if name == "provider" else cell.rjust(width)


def console_header(op_info: dict) -> str:
    return "  ".join(_pad(c, c, w) for c, w in _columns(op_info))


def console_row(row: dict, op_info: dict) -> str:
    """One fixed-width line; a row that was not measured ends with its status and reason."""
    cols, cs = _columns(op_info), cells(row, op_info)
    if row["status"] != "ok":
        return "  ".join([*(_pad(c, n, w) for c, (n, w) in zip(cs[:-1], cols)), cs[-1]])
    return "  ".join(_pad(c, n, w) for c, (n, w) in zip(cs, cols))


def markdown(doc: dict, plot_name: str | None) -> str:
    """The results document a person reads; the reproducing command line comes first."""
    meta, copy = doc["meta"], doc["copy_bandwidth"]
    v = meta["versions"]
    git = meta["git"]
    commit = (git["commit"] or git.get("note", "unknown"))[:12] + (" (with local changes)" if git.get("dirty") else "")
    lines = [
        f"# triton-losses benchmark: {meta['device']}",
        "",
        "Reproduce with:",
        "",
        "```",
        meta["command"],
        "```",
        "",
        f"- Device: {meta['device']}; dtype {doc['config']['dtype']}",
        f"- torch {v['torch']}, triton {v.get('triton')}, triton_losses {v['triton_losses']}, Python {v['python']}"
        + (f", CUDA {v['cuda']}" if v.get("cuda") else ""),
        f"- Date {meta['datetime_utc']}; commit {commit}",
        f"- Load average (1, 5, 15 min) at start {meta.get('load_average_start')}, "
        f"at end {meta.get('load_average_end')}; torch threads {meta['torch_threads']}",
        f"- Copy bandwidth measured in this run: {copy['gbps']:.1f} GB/s ({copy['method']})",
        f"- Timing: {doc['config']['timing']}",
        f"- Memory: {doc['config']['memory']}",
        *[f"- {n}" for n in NOTES],
        "",
        "## Providers",
        "",
        "| provider | status | version | details |",
        "| --- | --- | --- | --- |",
    ]
    for name, p in doc["providers"].items():
        details = p["note"] if p["status"] == "ok" else p["reason"]
        lines.append(f"| {name} | {p['status']} | {p.get('version') or '-'} | {details or ''} |")
    for op, info in doc["ops"].items():
        rows = [r for r in doc["results"] if r["op"] == op]
        cols = [c for c, _ in _columns(info)]
        lines += ["", f"## {op}", "", f"Bytes counted: {info['bytes_note']}.", ""]
        lines += ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
        for r in rows:
            if r["status"] in ("ok", "error"):
                c = cells(r, info)
                c += [""] * (len(cols) - len(c))
                lines.append("| " + " | ".join(c) + " |")
        lines += _ours_table(rows)
        aliased = sorted({r["provider"] for r in rows if (r.get("memory") or {}).get("aliased_grads_bytes")})
        if aliased:
            lines.append(f"\n*{', '.join(aliased)}: the gradient is written into an input's storage (it overwrites "
                         "the input); its bytes are not in peak or work MiB*")  # fmt: skip
        for prov, status, reason in op_specific_absences(doc["providers"], rows):
            lines.append(f"\n*{prov}: {status}: {reason}*")
    if plot_name:
        lines += ["", "## Plots", "", f"![time and memory against vocabulary size]({plot_name})"]
    return "\n".join(lines) + "\n"


def op_specific_absences(providers: dict, rows: list[dict]) -> list[tuple[str, str, str]]:
    """``(provider, status, reason)`` of providers available in this run that did not run this op.

    Providers unavailable for the whole run are listed once, in the providers table, not per op.
    """
    absent = {
        (r["provider"], r["status"], r["reason"])
        for r in rows
        if r["status"] in ("missing", "skipped") and providers[r["provider"]]["status"] == "ok"
    }
    return sorted(absent)


def write_json(doc: dict, path: Path) -> None:
    path.write_text(json.dumps(doc, indent=1, allow_nan=True) + "\n")
