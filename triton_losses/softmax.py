"""``log_softmax`` and ``softmax`` over any dimension: validation, the autograd Function, and their nn modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn as _nn

from . import _dispatch
from ._checks import FLOAT_DTYPES, as_3d, autocast_fp32, warn
from ._precision import acc_dtype

__all__ = ["LogSoftmax", "Softmax", "SoftmaxFunction", "log_softmax", "softmax"]


class SoftmaxFunction(torch.autograd.Function):
    """Softmax or log-softmax along C of a ``(A, C, B)`` view.

    Saves the input and per-row fp32 (fp64) statistics ``(max, sum of exp(x - max))``; the
    backward computes the probabilities from them, not from the rounded output. Under
    ``create_graph=True`` the backward is built from differentiable torch ops.
    """

    @staticmethod
    def forward(ctx, x, log: bool, eng):
        y, stats = eng.softmax_fwd(x, log)
        ctx.save_for_backward(x, stats)
        ctx.log, ctx.eng = log, eng
        return y

    @staticmethod
    def backward(ctx, g):
        x, stats = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient
            with torch.enable_grad():
                p = torch.softmax(x.to(acc_dtype(x.dtype)), 1)
                gs = g.to(p.dtype)
                dx = gs - p * gs.sum(1, keepdim=True) if ctx.log else p * (gs - (gs * p).sum(1, keepdim=True))
            return dx.to(x.dtype), None, None
        return ctx.eng.softmax_bwd(x, stats, g, ctx.log), None, None


def _softmax(name: str, torch_fn, input, dim, dtype, log: bool, stacklevel: int):
    """Validate, dispatch and run one call; ``torch_fn`` is torch's functional (for its exact errors)."""
    if not isinstance(input, torch.Tensor) or not (dtype is None or isinstance(dtype, torch.dtype)):
        return torch_fn(input, dim, _stacklevel=stacklevel, dtype=dtype)  # raises torch's TypeError
    if dim is None:
        warn(
            f"Implicit dimension choice for {name} has been deprecated. "
            "Change the call to include dim=X as an argument.",
            stacklevel,
        )
        dim = 0 if input.dim() in (0, 1, 3) else 1  # torch's F._get_softmax_dim rule
    if _dispatch.torch_serves(name, input):  # CPU: torch's own function is faster at every size measured
        return torch_fn(input, dim, dtype=dtype)
    if dtype is not None:
        input = input.to(dtype)
    elif input.is_cuda:
        # torch's autocast puts softmax / log_softmax on its fp32 list for CUDA only (under CPU
        # autocast torch 2.13 returns the input's dtype; checked)
        (input,) = autocast_fp32(input)
    ndim = max(input.dim(), 1)
    if not (input.dtype in FLOAT_DTYPES and type(dim) is int and -ndim <= dim < ndim):
        result = torch_fn(input, dim)  # raises torch's own error for a bad dim or dtype
        _dispatch.backend(input, op=name, unsupported="this combination of arguments")
        return result
    eng = _dispatch.engine("softmax", input, op=name)
    x = as_3d(input, dim % ndim if input.dim() else 0)
    return SoftmaxFunction.apply(x, log, eng).view(input.shape)


def log_softmax(input: torch.Tensor, dim: int | None = None, _stacklevel: int = 3, dtype=None) -> torch.Tensor:
    """Log-softmax along ``dim``, as ``torch.nn.functional.log_softmax``.

    Args:
        input: any shape, floating dtype (or any dtype with ``dtype=`` given).
        dim: the dimension to normalise over; None picks torch's legacy choice with its warning.
        dtype: if given, ``input`` is cast to it first and the output has it.

    Returns:
        A tensor of ``input``'s shape (fp32 for 16-bit CUDA input under autocast, as torch).
    """
    return _softmax("log_softmax", F.log_softmax, input, dim, dtype, True, _stacklevel)


def softmax(input: torch.Tensor, dim: int | None = None, _stacklevel: int = 3, dtype=None) -> torch.Tensor:
    """Softmax along ``dim``, as ``torch.nn.functional.softmax``.

    Args:
        input: any shape, floating dtype (or any dtype with ``dtype=`` given).
        dim: the dimension to normalise over; None picks torch's legacy choice with its warning.
        dtype: if given, ``input`` is cast to it first and the output has it.

    Returns:
        A tensor of ``input``'s shape (fp32 for 16-bit CUDA input under autocast, as torch).
    """
    return _softmax("softmax", F.softmax, input, dim, dtype, False, _stacklevel)


class Softmax(_nn.Softmax):
    """``torch.nn.Softmax`` computed by :func:`softmax`; ``forward(input)``: any shape, normalised over ``dim``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return softmax(input, self.dim, _stacklevel=5)


class LogSoftmax(_nn.LogSoftmax):
    """``torch.nn.LogSoftmax`` computed by :func:`log_softmax`; ``forward(input)``: any shape, over ``dim``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return log_softmax(input, self.dim, _stacklevel=5)
