"""Host-side pieces shared by the elementwise losses (BCE, BCE-with-logits, KL): autocast, reductions.

An elementwise loss's kernels return either the loss ('none') or partial sums; the reduction is
finished here, in one place. The backward receives the upstream gradient as a view expanded to
the loss's shape: for 'mean' / 'sum' a stride-0 view of one fp32 (fp64) value, so no
input-sized tensor of ones is ever made.
"""

from __future__ import annotations

import torch

from . import _dispatch
from ._checks import cast, compiling

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def implementation(backend: str, family: str):
    """``_dispatch.implementation``, except that traced (``torch.compile``) Triton calls go through
    ``kernels.ops_losses``: the same launcher interface, as opaque ``torch.library`` custom ops."""
    if backend == "triton" and compiling():
        return _dispatch.implementation("triton", "ops_losses")
    return _dispatch.implementation(backend, family)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_fp32(*tensors: torch.Tensor | None) -> tuple:
    """torch's autocast 'fp32' policy (BCE, BCE-with-logits and KL are on its list on CPU and CUDA).

    Inside an autocast region for the tensors' device, fp16 / bf16 tensors are cast to fp32, so
    the loss is computed and returned in fp32 exactly as torch does; elsewhere nothing changes.
    """
    first = next(t for t in tensors if t is not None)
    if not torch.is_autocast_enabled(first.device.type):
        return tensors
    return tuple(t.float() if t is not None and t.dtype in _LOW_PRECISION else t for t in tensors)


def finish_reduction(partials: torch.Tensor, reduction: str, numel: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Sum the kernels' partial sums; 'mean' divides by ``numel`` (0 elements give NaN, as in torch)."""
    total = partials.sum()
    if reduction == "mean":
        total = total / numel
    return cast(total, out_dtype)


def upstream(gout: torch.Tensor, reduction: str, numel: int, shape: torch.Size) -> torch.Tensor:
    """The upstream gradient of every element, as a view expanded to ``shape``."""
    if reduction == "none":
        return gout.expand(shape)
    g = gout.to(acc_dtype(gout.dtype))
    if reduction == "mean":
        g = g / numel
    return g.reshape(()).expand(shape)


def expand_or_none(t: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    return None if t is None else t.expand(shape)


def same_float_dtype(tensors, dtypes) -> bool:
    """All tensors share one dtype among ``dtypes``."""
    first = tensors[0].dtype
    return first in dtypes and all(t.dtype == first for t in tensors)


def broadcasts_to(t: torch.Tensor, shape: torch.Size) -> bool:
    """``t`` broadcasts to ``shape`` without enlarging it (what an in-place ``mul_`` accepts)."""
    try:
        return torch.broadcast_shapes(t.shape, shape) == shape
    except RuntimeError:
        return False
