"""Input checks that give torch's exceptions, and the row view every row-wise op works on.

Structural checks (shapes, dtypes, devices, option ranges) are plain Python on tensor metadata.
When one fails, the call is handed to torch's own function on the same arguments, so the user
gets exactly torch's exception type and message (and nothing is launched); if torch accepts a
call our kernels do not model, ``auto`` mode returns torch's result and ``triton`` mode raises.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch.nn import _reduction

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def reduction_string(size_average, reduce, reduction: str) -> str:
    """torch's mapping of the legacy ``size_average`` / ``reduce`` (with its warning) and its check."""
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    _reduction.get_enum(reduction)  # ValueError: "<x> is not a valid value for reduction"
    return reduction


class TorchAccepted(Exception):
    """torch accepted a call our checks rejected; ``result`` is torch's answer."""

    def __init__(self, result):
        super().__init__("torch accepted the call")
        self.result = result


def raise_like_torch(torch_fn: Callable, *args, **kwargs):
    """Run torch's function so it raises its own error; if it does not, raise ``TorchAccepted``."""
    result = torch_fn(*args, **kwargs)
    raise TorchAccepted(result)


def compiling() -> bool:
    """True while dynamo traces or a CUDA graph is being captured (no data-dependent checks then)."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_target_range(target: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """Raise torch's ``IndexError: Target 5 is out of bounds.`` for the first bad index target.

    Needs a host sync, so it runs in eager mode only; on CUDA it can be switched off with
    ``TRITON_LOSSES_CHECK_TARGETS=0`` (an out-of-range target then yields a NaN loss).
    """
    if target.numel() == 0 or compiling():
        return
    if target.is_cuda and os.environ.get("TRITON_LOSSES_CHECK_TARGETS", "1") == "0":
        return
    t = target.long()
    bad = (t != ignore_index) & ((t < 0) | (t >= n_classes))
    if bool(bad.any()):
        raise IndexError(f"Target {int(t[bad][0])} is out of bounds.")


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, but ``t`` itself when it already has that dtype.

    Autograd Functions build their outputs with this: under ``torch.compile``, torch 2.11's dynamo
    gives an output made by a no-op ``.to()`` of another traced value a zero upstream gradient
    (seen on the CPU with torch 2.11.0; torch 2.13 is not affected).
    """
    return t if t.dtype == dtype else t.to(dtype)


def as_3d(x: torch.Tensor, dim: int) -> torch.Tensor:
    """View ``x`` as ``(A, C, B)`` with ``C = x.shape[dim]``; copies only if no such view exists."""
    shape = x.shape
    A = 1
    for s in shape[:dim]:
        A *= s
    B = 1
    for s in shape[dim + 1 :]:
        B *= s
    C = shape[dim] if x.dim() else 1
    if dim == x.dim() - 1 or x.dim() == 0:
        if x.dim() <= 1:
            return x.reshape(1, C, 1)
        try:
            return x.view(A, C).unsqueeze(-1)
        except RuntimeError:
            return x.reshape(A, C, 1)
    try:
        return x.view(A, C, B)
    except RuntimeError:
        return x.reshape(A, C, B)
