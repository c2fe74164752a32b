"""PNG plots: fwd+bwd time and peak memory against vocabulary size, one line per provider (and N, H)."""

from __future__ import annotations

import math
from pathlib import Path

PROVIDER_COLORS = {"ours": "tab:red", "torch": "tab:blue", "torch.compile": "tab:green", "liger": "tab:purple"}
LINESTYLES = ("-", "--", ":", "-.")


def _minor_label(y: float, _pos) -> str:
    """Label the 2s and 5s between powers of ten, so a log axis has readable numbers but no clutter."""
    if y <= 0:
        return ""
    lead = round(y / 10 ** math.floor(math.log10(y)))
    return f"{y:g}" if lead in (2, 5) else ""


def matplotlib_missing() -> str | None:
    """Why plots cannot be drawn here, or None when they can."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install 'triton-losses[bench]')"
    return None


def plot(doc: dict, path: Path) -> bool:
    """Write the figure for ``doc``'s results to ``path``; False when there was nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullLocator

    ok = [r for r in doc["results"] if r["status"] == "ok"]
    ops = [op for op in doc["ops"] if any(r["op"] == op for r in ok)]
    if not ops:
        return False
    height = 3.6 * len(ops)  # inches
    fig, axes = plt.subplots(len(ops), 2, figsize=(12, height), squeeze=False)
    for (ax_t, ax_m), op in zip(axes, ops):
        rows = [r for r in ok if r["op"] == op]
        shapes = sorted({(r["N"], r["H"] or 0) for r in rows})
        for prov in dict.fromkeys(r["provider"] for r in rows):
            for k, (n, h) in enumerate(shapes):
                line = sorted(
                    (r for r in rows if r["provider"] == prov and (r["N"], r["H"] or 0) == (n, h)), key=lambda r: r["V"]
                )
                if not line:
                    continue
                label = f"{prov}, N={n}" + (f", H={h}" if h else "")
                style = {
                    "color": PROVIDER_COLORS.get(prov),
                    "linestyle": LINESTYLES[k % len(LINESTYLES)],
                    "marker": "o",
                }
                vs = [r["V"] for r in line]
                ax_t.plot(vs, [r["time_ms"]["fwd+bwd"]["median"] for r in line], label=label, **style)
                ax_m.plot(vs, [r["memory"]["peak_bytes"] / 2**20 for r in line], label=label, **style)
        for ax, what in ((ax_t, "fwd+bwd time (ms, median)"), (ax_m, "peak memory (MiB)")):
            ax.set_title(f"{op}: {what}", fontsize=10)
            ax.set_xlabel("vocabulary size V")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            vs = sorted({r["V"] for r in rows})
            ax.set_xticks(vs, [str(v) for v in vs], rotation=30, fontsize=8)
            ax.xaxis.set_minor_locator(NullLocator())
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label))
        ax_t.legend(fontsize=7)
    meta = doc["meta"]
    title = f"{meta['device']} · {doc['config']['dtype']} · torch {meta['versions']['torch']} · {meta['date']}"
    fig.suptitle(title, fontsize=10, y=1 - 0.15 / height, va="top")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / height))  # half an inch on top for the title
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True
