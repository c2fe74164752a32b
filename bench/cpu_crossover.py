"""Where the CPU fallback overtakes torch: the sizes behind ``_dispatch.TORCH_FASTER_BELOW``.

For each op of the table (the regression, margin and embedding losses, the softmaxes), forward +
backward with 'mean' (a random upstream gradient for the softmaxes' tensor outputs) at
E = 2**10 ... 2**24 elements (``(E / W, W)`` inputs, the bench's own input builders,
fp32, one thread), the PyTorch reference (``TORCH_FASTER_BELOW`` emptied, so it serves every size)
against torch's own function. Wall-clock medians; the two alternate call by call, so a busy spell
on a shared machine slows both. An op's crossover is the smallest measured size from which the
reference is at least as fast at every larger measured size; torch serves the calls below it. An op
the reference never overtakes up to the largest size gets 2**62 (torch serves every call). The sweep
runs ``--repeats`` times (large sizes vary by tens of percent from run to run on this machine) and
each op takes the largest of its crossovers: where any run found torch faster, torch serves. Rows are
W = 256 wide; the row losses (whose speed depends on the row length) are also measured at W = 65536
(the bench's LM-like rows; ``(1, E)`` below that) and take the larger crossover of the two widths.

Writes ``bench/results/cpu-crossover.json`` and ``.md`` (CPU, versions, date, commit) and prints the
table to paste into ``triton_losses/_dispatch.py``. Run: ``python bench/cpu_crossover.py``;
``--ops A B --merge`` measures those ops only and adds (or replaces) their rows in the existing files,
under a line saying when and where they were measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from triton_losses import _dispatch
from triton_losses.bench.registry import Size, get_ops

OPS = (
    "l1_loss", "mse_loss", "smooth_l1_loss", "huber_loss", "poisson_nll_loss", "gaussian_nll_loss",
    "hinge_embedding_loss", "margin_ranking_loss", "multilabel_soft_margin_loss", "multi_margin_loss",
    "multilabel_margin_loss", "cosine_embedding_loss", "triplet_margin_loss", "log_softmax", "softmax",
)  # fmt: skip
# triplet_margin_with_distance_loss (distance_function=None) is triplet_margin_loss's path; it shares its entry.
ALIASES = {"triplet_margin_with_distance_loss": "triplet_margin_loss"}
ROW_LOSSES = {"multilabel_soft_margin_loss", "multi_margin_loss", "multilabel_margin_loss", "cosine_embedding_loss",
              "triplet_margin_loss"}  # fmt: skip
WIDTHS = (256, 65536)
ALWAYS = 2**62
ROOT = Path(__file__).resolve().parents[1]


def _step(fn, case) -> float:
    case.clear_grads()
    t0 = time.perf_counter()
    out = fn(*case.args)
    out.backward(case.grad_out)
    return time.perf_counter() - t0


def measure(op, E: int, W: int, budget_s: float) -> tuple[float, float]:
    """Median seconds of one forward + backward of ``(E / W, W)`` inputs: (the reference, torch)."""
    case = op.inputs(Size(max(1, E // W), min(E, W)), torch.float32, torch.device("cpu"))
    for _ in range(2):  # warm-up: allocator, first-call paths
        _step(op.ours, case), _step(op.torch, case)
    ours, theirs = [], []
    start = time.perf_counter()
    while len(ours) < 5 or (time.perf_counter() - start < budget_s and len(ours) < 400):
        ours.append(_step(op.ours, case))
        theirs.append(_step(op.torch, case))
    return statistics.median(ours), statistics.median(theirs)


def crossover(rows: list[dict]) -> int:
    """The smallest size from which the reference is at least as fast at every larger size (or ALWAYS)."""
    best = ALWAYS
    for r in reversed(rows):
        if r["ours_s"] > r["torch_s"]:
            break
        best = r["E"]
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", nargs="+", default=list(OPS))
    ap.add_argument("--exponents", nargs="+", type=int, default=[10, 12, 14, 16, 18, 20, 22, 24])
    ap.add_argument("--budget-s", type=float, default=0.4, help="seconds per op and size (at least 5 calls each)")
    ap.add_argument("--repeats", type=int, default=3, help="whole sweeps; each op takes its largest crossover")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu-crossover"))
    ap.add_argument("--merge", action="store_true", help="add these ops' rows to the existing files")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    _dispatch.TORCH_FASTER_BELOW.clear()
    ops = {op.name: op for op in get_ops(args.ops)}
    series = [(name, W) for name in args.ops for W in (WIDTHS if name in ROW_LOSSES else WIDTHS[:1])]
    results, table = {f"{name} W={W}": [] for name, W in series}, dict.fromkeys(args.ops, 0)
    for rep in range(args.repeats):
        for name, W in series:
            rows = []
            for e in args.exponents:
                ours, theirs = measure(ops[name], 2**e, W, args.budget_s)
                rows.append({"E": 2**e, "ours_s": ours, "torch_s": theirs})
                print(f"[{rep + 1}/{args.repeats}] {name:28s} W={W:<5d} E=2^{e:<2d} ours {ours * 1e3:9.3f} ms  "
                      f"torch {theirs * 1e3:9.3f} ms  speed-up {theirs / ours:5.2f}x", flush=True)  # fmt: skip
            results[f"{name} W={W}"].append(rows)
            table[name] = max(table[name], crossover(rows))
    for alias, name in ALIASES.items():
        if name in table:
            table[alias] = table[name]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    meta = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "commit": commit.stdout.strip(),
        "dtype": "float32",
        "mode": "forward + backward, reduction='mean'",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    added = None
    if args.merge:
        old = json.loads(Path(args.out + ".json").read_text())
        added = {**meta, "ops": list(args.ops)}
        results = {**{k: v for k, v in old["results"].items() if k.split(" W=")[0] not in args.ops}, **results}
        table = {**old["table"], **table}
        meta = {**old["meta"], "added": [*old["meta"].get("added", []), added]}
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "results": results, "table": table}, indent=1))
    lines = [
        "# CPU fallback against torch: forward + backward, 'mean', fp32, one thread",
        "",
        " | ".join(f"{k}: {v}" for k, v in meta.items() if k != "added"),
        *[
            f"\nadded ({', '.join(a['ops'])}): " + " | ".join(f"{k}: {v}" for k, v in a.items() if k != "ops")
            for a in meta.get("added", [])
        ],
        "",
        "Speed-up of the PyTorch reference over torch's own function (> 1: the reference is faster), "
        f"by element count E, one cell per run ({args.repeats} runs, '/'-separated); the last column is the "
        "size below which torch's function serves the call (`_dispatch.TORCH_FASTER_BELOW`: the largest "
        "crossover of the runs). Produced by `python bench/cpu_crossover.py`.",
        "",
        "| op | " + " | ".join(f"2^{e}" for e in args.exponents) + " | torch below |",
        "|---" * (len(args.exponents) + 2) + "|",
    ]
    for key, runs in results.items():
        name = key.split(" W=")[0]
        cells = [" / ".join(f"{r['torch_s'] / r['ours_s']:.2f}x" for r in at) for at in zip(*runs)]
        below = "always" if table[name] == ALWAYS else f"2^{table[name].bit_length() - 1}"
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {below} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("TORCH_FASTER_BELOW = {")
    for name, below in table.items():
        print(f'    "{name}": {"2**62" if below == ALWAYS else f"2**{below.bit_length() - 1}"},')
    print("}")


if __name__ == "__main__":
    main()
