"""``triton-losses bench`` and ``triton-losses check``: argument parsing and the defaults per device.

Default sizes (``--sizes`` overrides them):

* GPU: N = 4096, 16384 tokens x V = 32000, 50257, 128256, 151936, 262144; H = 2048, 4096 for
  linear ops; bf16. ``--quick``: N = 4096 x V = 32000, 128256; H = 2048.
* CPU: N = 128 x the same five vocabularies; H = 256; fp32. The GPU's shapes hold up to 16 GiB of
  fp32 logits each and take minutes per call on a 2-core CPU, so the CPU default keeps the
  vocabularies (the axis the plots show) and uses fewer tokens (the full CPU run takes about 10
  minutes on 2 cores). ``--quick``: N = 16 x V = 32000, 128256; H = 128; torch.compile skipped
  unless named in ``--providers`` (it compiles C++ per shape): a smoke test of the harness and the
  install in well under a minute, not numbers to quote.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .registry import Size

VOCABS = (32000, 50257, 128256, 151936, 262144)
DEFAULTS = {
    # (device type, quick): (N values, V values, H values)
    ("cuda", False): ((4096, 16384), VOCABS, (2048, 4096)),
    ("cuda", True): ((4096,), (32000, 128256), (2048,)),
    ("cpu", False): ((128,), VOCABS, (256,)),
    ("cpu", True): ((16,), (32000, 128256), (128,)),
}
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def parse_size(text: str) -> Size:
    try:
        parts = [int(p) for p in text.lower().split("x")]
        if len(parts) not in (2, 3) or min(parts) < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected NxV or NxVxH, e.g. 4096x128256") from None
    return Size(*parts)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="triton-losses", description="triton-losses: benchmarks and self-check.")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "bench",
        help="time the ops against torch eager, torch.compile and Liger-Kernel on this device",
        description="Forward, backward and forward+backward times, GB/s against the measured copy bandwidth, "
        "and peak memory, for every registered op and size; writes results.json, results.md and a PNG.",
        epilog=__doc__[__doc__.index("Default sizes") :] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("--quick", action="store_true", help="small sizes (under a minute on a 2-core CPU)")
    b.add_argument("--ops", nargs="+", metavar="OP", help="ops to run (default: all registered; see --list)")
    b.add_argument("--sizes", nargs="+", type=parse_size, metavar="NxV[xH]", help="problem sizes, e.g. 4096x128256")
    b.add_argument("--hidden", nargs="+", type=int, metavar="H", help="hidden sizes for linear ops")
    b.add_argument("--dtype", choices=sorted(DTYPES), help="input dtype (default: bfloat16 on GPU, float32 on CPU)")
    b.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if available, else cpu")
    b.add_argument(
        "--providers",
        nargs="+",
        metavar="P",
        help="providers to run: torch ours torch.compile liger (default: all; the others are reported as skipped)",
    )
    b.add_argument("--out", type=Path, default=Path("out/bench"), help="output folder (default: out/bench)")
    b.add_argument(
        "--prefix", default="results", help="file name stem (default: results); 'auto' gives <device>-<date>"
    )
    b.add_argument("--warmup-ms", type=float, default=25.0, help="GPU: do_bench warmup (default 25)")
    b.add_argument("--rep-ms", type=float, help="time spent per measurement (GPU default 100, CPU 500, CPU --quick 0)")
    b.add_argument(
        "--min-reps", type=int, help="timed runs at least per measurement (default: GPU 10, CPU 5, --quick 3)"
    )
    b.add_argument(
        "--copy-mib", type=int, default=1024, help="buffer for the copy bandwidth (default 1024: beyond the caches)"
    )
    b.add_argument("--threads", type=int, help="CPU: torch.set_num_threads (default: torch's choice)")
    b.add_argument("--no-plots", action="store_true", help="do not draw the PNG")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--list", action="store_true", help="list the registered ops and exit")

    c = sub.add_parser("check", help="compare every op with torch on random inputs on this device")
    c.add_argument("--ops", nargs="+", metavar="OP", help="ops to check (default: all registered)")
    c.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if available, else cpu")
    c.add_argument(
        "--dtype", nargs="+", choices=sorted(DTYPES), help="default: bfloat16 and float32 on GPU, float32 on CPU"
    )
    return ap


def _device(name: str | None) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("triton-losses: --device cuda but torch sees no CUDA device")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _list_ops() -> int:
    from .registry import get_ops

    for op in get_ops():
        liger = "yes" if op.liger else "no"
        print(f"{op.name:<34} axes {'x'.join(op.axes):<6} liger {liger:<4} bytes: {op.bytes_note}")
    return 0


def bench(args: argparse.Namespace, argv: list[str]) -> int:
    from . import plots, report, runner
    from .meta import device_slug
    from .providers import ALIASES, NAMES, resolve
    from .registry import get_ops

    if args.list:
        return _list_ops()
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [p for p in args.providers or [] if ALIASES.get(p, p) not in NAMES]
    if unknown:
        raise SystemExit(f"triton-losses: unknown provider(s) {unknown}; choose from {list(NAMES)}")
    try:
        ops = get_ops(args.ops)
    except ValueError as e:
        raise SystemExit(f"triton-losses: {e}") from None
    n_default, v_default, h_default = DEFAULTS[(device.type, args.quick)]
    sizes = args.sizes or [Size(n, v) for n in n_default for v in v_default]
    cpu = device.type == "cpu"
    cfg = runner.Config(
        ops=ops,
        sizes=sizes,
        hidden=args.hidden or list(h_default),
        dtype=DTYPES[args.dtype] if args.dtype else (torch.float32 if cpu else torch.bfloat16),
        device=device,
        providers=resolve(args.providers, device, args.quick),
        quick=args.quick,
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms if args.rep_ms is not None else (100.0 if not cpu else 0.0 if args.quick else 500.0),
        min_reps=args.min_reps or (3 if args.quick else 5 if cpu else 10),
        copy_bytes=args.copy_mib * 2**20,
    )
    args.out.mkdir(parents=True, exist_ok=True)

    def stem_of(doc: dict) -> str:
        return f"{device_slug(device)}-{doc['meta']['date']}" if args.prefix == "auto" else args.prefix

    def checkpoint(doc: dict) -> None:  # the tables so far: a run cut short keeps what it measured
        report.write_json(doc, args.out / f"{stem_of(doc)}.json")
        (args.out / f"{stem_of(doc)}.md").write_text(report.markdown(doc, None))

    doc = runner.run(cfg, argv, progress=False if args.no_progress else None, checkpoint=checkpoint)
    stem = stem_of(doc)
    png = args.out / f"{stem}.png"
    plot_name = None
    if args.no_plots:
        print("plots: skipped (--no-plots)")
    elif reason := plots.matplotlib_missing():
        print(f"plots: skipped: {reason}")
    elif plots.plot(doc, png):
        plot_name = png.name
    report.write_json(doc, args.out / f"{stem}.json")
    (args.out / f"{stem}.md").write_text(report.markdown(doc, plot_name))
    written = [f"{stem}.json", f"{stem}.md", *([plot_name] if plot_name else [])]
    print(f"\nwrote {', '.join(str(args.out / w) for w in written)}")
    errors = [r for r in doc["results"] if r["status"] == "error"]
    for r in errors:
        print(f"error: {r['op']} {r['N']}x{r['V']} {r['provider']}: {r['reason']}")
    # An error in ours or torch eager fails the run; optional providers' errors are reported only.
    return 1 if any(r["provider"] in ("ours", "torch") for r in errors) else 0


def check(args: argparse.Namespace) -> int:
    from .check import run_check

    device = _device(args.device)
    if args.dtype:
        dtypes = list(dict.fromkeys(DTYPES[d] for d in args.dtype))
    else:
        dtypes = [torch.float32] if device.type == "cpu" else [torch.bfloat16, torch.float32]
    try:
        return run_check(device, dtypes, args.ops)
    except ValueError as e:
        raise SystemExit(f"triton-losses: {e}") from None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``triton-losses`` and ``python -m triton_losses``."""
    args = parser().parse_args(argv)
    full_argv = sys.argv if argv is None else ["triton-losses", *argv]
    return bench(args, full_argv) if args.command == "bench" else check(args)
