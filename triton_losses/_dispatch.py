"""The one place that decides which implementation serves a call: the Triton kernels or torch.

``TRITON_LOSSES_BACKEND`` (read at every call) = ``auto`` (default) | ``triton`` | ``torch``:

* ``auto``: CUDA tensors run the Triton kernels; CPU tensors run the PyTorch reference, except
  when ``TRITON_INTERPRET=1`` is set, where CPU tensors run the kernels through Triton's interpreter.
* ``triton``: always the kernels; a call they cannot serve raises ``NotImplementedError``.
* ``torch``: always the PyTorch reference.
"""

from __future__ import annotations

import importlib
import os
import pkgutil

import torch

_BACKENDS = ("auto", "triton", "torch")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _import_all(package: str) -> dict:
    """Import every module of ``triton_losses.<package>``: ``{family: module}``."""
    pkg = importlib.import_module(f"triton_losses.{package}")
    return {
        info.name: importlib.import_module(f"{pkg.__name__}.{info.name}")
        for info in pkgutil.iter_modules(pkg.__path__)
        if not info.name.startswith("_") and info.name != "aot"
    }


# Imported with the package (torch.compile cannot trace an import); importing triton queries no
# device. TRITON_INTERPRET must therefore be set before ``import triton_losses``.
try:
    importlib.import_module("triton")
    _TRITON = True
except ImportError:
    _TRITON = False
_IMPLEMENTATIONS = {"torch": _import_all("reference"), "triton": _import_all("kernels") if _TRITON else {}}


def triton_available() -> bool:
    """Whether ``triton`` could be imported (it has no wheels on some platforms)."""
    return _TRITON


def backend(*tensors: torch.Tensor | None, op: str, unsupported: str | None = None) -> str:
    """Return ``"triton"`` or ``"torch"`` for a call of ``op`` on ``tensors``.

    Args:
        tensors: the call's tensors (None entries are skipped); the first decides the device.
        op: the public function's name, for error messages.
        unsupported: why the kernels cannot serve this call, or None when they can.
    """
    mode = os.environ.get("TRITON_LOSSES_BACKEND", "auto").strip().lower() or "auto"
    if mode not in _BACKENDS:
        raise ValueError(f"TRITON_LOSSES_BACKEND must be one of {_BACKENDS}, got {mode!r}")
    if mode == "torch":
        return "torch"
    x = next(t for t in tensors if t is not None)
    device_ok = x.is_cuda or (x.device.type == "cpu" and _interpreting())
    if mode == "auto":
        return "triton" if device_ok and unsupported is None and triton_available() else "torch"
    if unsupported is not None:
        raise NotImplementedError(f"triton_losses.{op}: the Triton kernels do not support {unsupported}")
    if not triton_available():
        raise NotImplementedError(f"triton_losses.{op}: TRITON_LOSSES_BACKEND=triton but triton is not installed")
    if not device_ok:
        raise NotImplementedError(
            f"triton_losses.{op}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU "
            f"tensors), got a tensor on {x.device}"
        )
    return "triton"


def implementation(name: str, family: str):
    """The module implementing ``family`` (e.g. ``"cross_entropy"``) for backend ``name``."""
    return _IMPLEMENTATIONS[name][family]
