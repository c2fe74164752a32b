"""The kernels as ``torch.library`` custom ops, for calls traced by ``torch.compile``.

Eager calls launch the kernels directly (no dispatcher overhead, in-place fused gradients);
under ``torch.compile`` the autograd Functions call these functional ops instead, which dynamo
keeps opaque (their fake implementations give output shapes without running anything).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..spec import CESpec
from . import cross_entropy as _ce
from . import softmax as _sm


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _spec(weight, wsum, ignore_index, smoothing, z_loss, softcap, prob, logp) -> CESpec:
    return CESpec(weight, wsum, ignore_index, smoothing, z_loss, softcap if softcap > 0 else None, prob, logp)


@torch.library.custom_op("triton_losses::ce_fwd", mutates_args=())
def ce_fwd_op(
    x: Tensor, t: Tensor, weight: Tensor | None, wsum: Tensor | None, coef: Tensor,
    ignore_index: int, smoothing: float, z_loss: float, softcap: float, prob: bool, logp: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Per-row ``(loss, lse)`` of ``(A, C, B)`` logits; ``softcap <= 0`` means none."""
    spec = _spec(weight, wsum, ignore_index, smoothing, z_loss, softcap, prob, logp)
    return _ce.ce_fwd(x, t, spec, coef, None)


@ce_fwd_op.register_fake
def _(x, t, weight, wsum, coef, ignore_index, smoothing, z_loss, softcap, prob, logp):
    R = x.shape[0] * x.shape[2]
    return x.new_empty(R, dtype=_acc(x)), x.new_empty(R, dtype=_acc(x))


@torch.library.custom_op("triton_losses::ce_bwd", mutates_args=())
def ce_bwd_op(
    x: Tensor, t: Tensor, weight: Tensor | None, wsum: Tensor | None, lse: Tensor, gout: Tensor, coef: Tensor,
    ignore_index: int, smoothing: float, z_loss: float, softcap: float, prob: bool, logp: bool, want_tgrad: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(dlogits, dtarget)``; ``dtarget`` is empty unless ``want_tgrad``."""
    spec = _spec(weight, wsum, ignore_index, smoothing, z_loss, softcap, prob, logp)
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    tgrad = torch.empty(t.shape if want_tgrad else (0,), dtype=t.dtype, device=t.device)
    _ce.ce_bwd(x, t, spec, lse, gout, coef, grad, tgrad if want_tgrad else None)
    return grad, tgrad


@ce_bwd_op.register_fake
def _(x, t, weight, wsum, lse, gout, coef, ignore_index, smoothing, z_loss, softcap, prob, logp, want_tgrad):
    return torch.empty_like(x, memory_format=torch.contiguous_format), t.new_empty(t.shape if want_tgrad else (0,))


@torch.library.custom_op("triton_losses::softmax_fwd", mutates_args=())
def softmax_fwd_op(x: Tensor, log: bool) -> Tensor:
    """``(log_)softmax`` along C of ``(A, C, B)``."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _sm.softmax_fwd(x, y, log)
    return y


@softmax_fwd_op.register_fake
def _(x, log):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("triton_losses::softmax_bwd", mutates_args=())
def softmax_bwd_op(y: Tensor, g: Tensor, log: bool) -> Tensor:
    """Input gradient of ``(log_)softmax`` from its output ``y`` and upstream ``g``."""
    dx = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    _sm.softmax_bwd(y, g, dx, log)
    return dx


@softmax_bwd_op.register_fake
def _(y, g, log):
    return torch.empty_like(y, memory_format=torch.contiguous_format)
