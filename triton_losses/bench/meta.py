"""The stamp on every result: device, versions, date, git commit, and the command that reproduces it."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

# Environment variables that change what is measured; the reproducing command line sets them.
ENV_VARS = ("TRITON_LOSSES_BACKEND", "TRITON_INTERPRET", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {model} ({os.cpu_count()} cores; torch threads: {torch.get_num_threads()})"


def device_slug(device: torch.device) -> str:
    """Short file-name tag: ``cpu``, or the GPU model (``h100``, ``h200``, ``a100``, ...)."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Za-z]?)\b", name)
    return (m.group(1) if m else re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")).lower()


def git_commit() -> dict:
    """The commit of the checkout ``triton_losses`` was imported from, and whether it had local changes."""
    root = Path(__file__).resolve().parents[2]
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True, timeout=10)
        top = run("rev-parse", "--show-toplevel")
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:
            return {"commit": None, "dirty": None, "note": "not run from a git checkout (installed package)"}
        head = run("rev-parse", "HEAD")
        dirty = bool(run("status", "--porcelain", "--untracked-files=no").stdout.strip())
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError) as e:
        return {"commit": None, "dirty": None, "note": f"git unavailable: {e}"}


def command_line(argv: list[str] | None = None) -> str:
    """The command that reproduces this run, with the environment variables that matter."""
    argv = list(sys.argv if argv is None else argv)
    prog = Path(argv[0]).name if argv else "triton-losses"
    head = {"triton-losses": "triton-losses", "__main__.py": "python -m triton_losses"}.get(
        prog, argv[0] if argv else prog
    )
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in ENV_VARS if os.environ.get(k)]
    return " ".join([*env, head, *(shlex.quote(a) for a in argv[1:])])


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    import triton_losses

    out["triton_losses"] = triton_losses.__version__
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages: other work on the machine skews CPU timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def stamp(device: torch.device, argv: list[str] | None = None) -> dict:
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "device": device_name(device),
        "device_type": device.type,
        "date": now.strftime("%Y-%m-%d"),
        "datetime_utc": now.isoformat(timespec="seconds"),
        "versions": versions(),
        "git": git_commit(),
        "command": command_line(argv),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": load_average(),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }
