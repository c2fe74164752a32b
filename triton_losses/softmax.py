"""``log_softmax`` and ``softmax`` over any dimension, with their autograd Function."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _dispatch
from ._checks import FLOAT_DTYPES, as_3d, compiling

__all__ = ["SoftmaxFunction", "log_softmax", "softmax"]


class SoftmaxFunction(torch.autograd.Function):
    """Softmax or log-softmax along C of a ``(A, C, B)`` view, by the Triton kernels."""

    @staticmethod
    def forward(ctx, x, log: bool):
        if compiling():
            y = _dispatch.implementation("triton", "ops").softmax_fwd_op(x, log)
        else:
            y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            _dispatch.implementation("triton", "softmax").softmax_fwd(x, y, log)
        ctx.save_for_backward(y)
        ctx.log = log
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        if compiling():
            return _dispatch.implementation("triton", "ops").softmax_bwd_op(y, g, ctx.log), None
        dx = torch.empty(y.shape, dtype=y.dtype, device=y.device)
        _dispatch.implementation("triton", "softmax").softmax_bwd(y, g, dx, ctx.log)
        return dx, None


def _softmax(name: str, torch_fn, input, dim, dtype, log: bool, stacklevel: int):
    if dim is None:
        dim = F._get_softmax_dim(name, input.dim(), stacklevel + 1)
    if dtype is not None:
        input = input.to(dtype)
    ndim = max(input.dim(), 1)
    if not (input.dtype in FLOAT_DTYPES and isinstance(dim, int) and -ndim <= dim < ndim):
        result = torch_fn(input, dim)  # raises torch's own error for a bad dim or dtype
        _dispatch.backend(input, op=name, unsupported="this combination of arguments")
        return result
    if _dispatch.backend(input, op=name) == "torch":
        return torch_fn(input, dim)
    x = as_3d(input, dim % ndim if input.dim() else 0)
    return SoftmaxFunction.apply(x, log).view(input.shape)


def log_softmax(input: torch.Tensor, dim: int | None = None, _stacklevel: int = 3, dtype=None) -> torch.Tensor:
    """Log-softmax along ``dim``, as ``torch.nn.functional.log_softmax``.

    Args:
        input: any shape, floating dtype (or any dtype with ``dtype=`` given).
        dim: the dimension to normalise over; None picks torch's legacy choice with its warning.
        dtype: if given, ``input`` is cast to it first and the output has it.

    Returns:
        A tensor of ``input``'s shape.
    """
    return _softmax("log_softmax", torch.log_softmax, input, dim, dtype, True, _stacklevel)


def softmax(input: torch.Tensor, dim: int | None = None, _stacklevel: int = 3, dtype=None) -> torch.Tensor:
    """Softmax along ``dim``, as ``torch.nn.functional.softmax``.

    Args:
        input: any shape, floating dtype (or any dtype with ``dtype=`` given).
        dim: the dimension to normalise over; None picks torch's legacy choice with its warning.
        dtype: if given, ``input`` is cast to it first and the output has it.

    Returns:
        A tensor of ``input``'s shape.
    """
    return _softmax("softmax", torch.softmax, input, dim, dtype, False, _stacklevel)
