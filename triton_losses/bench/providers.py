"""Providers measured side by side: torch eager, ours, torch.compile, Liger-Kernel.

A provider that cannot run is kept with ``status`` ``"missing"`` or ``"skipped"`` and the reason,
so every table says what was not measured and why.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .registry import Op

NAMES = ("torch", "ours", "torch.compile", "liger")
ALIASES = {"compile": "torch.compile", "eager": "torch", "triton_losses": "ours", "liger-kernel": "liger"}


@dataclass
class Provider:
    """One provider's availability in this run."""

    name: str
    status: str  # "ok" | "missing" | "skipped"
    reason: str | None = None
    version: str | None = None
    note: str | None = None

    def build(self, op: Op) -> Callable[..., torch.Tensor]:
        """The callable for ``op``; raises ``LookupError`` with the reason when this provider has none."""
        if self.name == "torch":
            return op.torch
        if self.name == "ours":
            return op.ours
        if self.name == "torch.compile":
            # A fresh compile per op and size: static shapes (the fastest code inductor makes), and
            # no recompile limit that would fall back to eager without saying so.
            torch._dynamo.reset()
            return torch.compile(op.torch, dynamic=False, fullgraph=True)
        return op.liger_fn()

    def to_dict(self) -> dict:
        return {"status": self.status, "reason": self.reason, "version": self.version, "note": self.note}


def ours_backend(device: torch.device) -> str:
    """In words, what ``triton_losses`` runs on ``device`` in this process."""
    from triton_losses import _dispatch

    try:
        chosen = _dispatch.backend(torch.empty(1, device=device), op="bench")
    except NotImplementedError as e:
        return f"unusable here: {e}"
    if chosen == "torch":
        return "PyTorch reference path (the CPU fallback)" if device.type == "cpu" else "PyTorch reference path"
    if device.type == "cpu":
        return "Triton kernels through the interpreter (TRITON_INTERPRET=1): a correctness path, not a speed one"
    return "Triton kernels"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cxx_compiler() -> str | None:
    for cxx in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cxx and shutil.which(cxx):
            return shutil.which(cxx)
    return None


def resolve(requested: list[str] | None, device: torch.device, quick: bool) -> list[Provider]:
    """Every provider, in :data:`NAMES` order, with its status on ``device``.

    ``requested`` names the providers to run (None: all); the others are reported as skipped.
    ``torch.compile`` on the CPU is skipped by ``--quick`` unless named in ``requested``.
    """
    wanted = None if requested is None else {ALIASES.get(n, n) for n in requested}
    out = []
    for name in NAMES:
        p = _probe(name, device)
        if p.status == "ok" and wanted is not None and name not in wanted:
            p.status, p.reason = "skipped", "not in --providers"
        elif p.status == "ok" and name == "torch.compile" and device.type == "cpu" and quick and wanted is None:
            p.status = "skipped"
            p.reason = (
                "--quick on the CPU: inductor compiles C++ for every op and size (seconds each); "
                "run without --quick, or add --providers torch ours torch.compile"
            )
        out.append(p)
    return out


def _probe(name: str, device: torch.device) -> Provider:
    if name == "torch":
        return Provider(name, "ok", version=torch.__version__, note="eager torch.nn.functional")
    if name == "ours":
        import triton_losses

        return Provider(name, "ok", version=triton_losses.__version__, note=ours_backend(device))
    if name == "torch.compile":
        if not hasattr(torch, "compile"):
            return Provider(name, "missing", f"torch {torch.__version__} has no torch.compile")
        if device.type == "cpu" and _cxx_compiler() is None:
            return Provider(name, "missing", "no C++ compiler found (inductor's CPU backend needs one, e.g. g++)")
        if device.type == "cuda" and importlib.util.find_spec("triton") is None:
            return Provider(name, "missing", "triton is not installed (inductor's GPU backend needs it)")
        note = "torch.compile(torch reference, dynamic=False, fullgraph=True), compiled per op and size"
        return Provider(name, "ok", version=torch.__version__, note=note)
    # liger
    version = _version("liger-kernel") or _version("liger_kernel")
    if device.type != "cuda":
        return Provider(name, "missing", f"Liger-Kernel runs on CUDA GPUs only (device is {device.type})", version)
    try:
        importlib.import_module("liger_kernel")
    except ImportError as e:
        return Provider(name, "missing", f"liger-kernel is not installed (pip install liger-kernel): {e}")
    return Provider(
        name,
        "ok",
        version=version,
        note="liger_kernel.transformers.functional (its cross_entropy overwrites the logits with the gradient)",
    )
