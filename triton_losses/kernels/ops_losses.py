"""The binary / divergence launchers as ``torch.library`` custom ops, for calls traced by ``torch.compile``.

Eager calls launch the kernels directly; under ``torch.compile`` the autograd Functions of
``triton_losses.binary`` / ``triton_losses.divergence`` call the functions below instead (same
interface as the launchers in ``binary``, ``divergence`` and ``kl_logits``), which dynamo keeps
opaque: their fake implementations give output shapes without running anything. The ops are
functional: outputs are fresh contiguous tensors; a gradient that is not asked for comes back
empty and is returned as None. Gradients are never fused into a traced forward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import binary as _bin
from . import divergence as _div
from . import kl_logits as _kd

FUSES_GRAD = False


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _grad_or_empty(g: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if g is None else g.contiguous()


def _grads_fake(a: Tensor, b: Tensor, need_a: bool, need_b: bool) -> tuple[Tensor, Tensor]:
    return a.new_empty(a.shape if need_a else (0,)), b.new_empty(b.shape if need_b else (0,))


def _none_if_empty(grads: tuple[Tensor, Tensor], needs: tuple[bool, bool]):
    return tuple(g if need else None for g, need in zip(grads, needs))


@torch.library.custom_op("triton_losses::bce_fwd", mutates_args=())
def _bce_fwd_op(x: Tensor, y: Tensor, w: Tensor | None, pw: Tensor | None, logits: bool, reduce: bool) -> Tensor:
    """The elementwise loss, or its sum as a ``(1,)`` fp32 (fp64) tensor when ``reduce``."""
    out = _bin.bce_fwd(x, y, w, pw, logits, reduce)
    return out.sum().reshape(1) if reduce else out.contiguous()


@_bce_fwd_op.register_fake
def _(x, y, w, pw, logits, reduce):
    return x.new_empty(1, dtype=_acc(x)) if reduce else x.new_empty(x.shape)


@torch.library.custom_op("triton_losses::bce_bwd", mutates_args=())
def _bce_bwd_op(
    x: Tensor, y: Tensor, w: Tensor | None, pw: Tensor | None, logits: bool, g: Tensor, need_dx: bool, need_dy: bool
) -> tuple[Tensor, Tensor]:
    dx, dy = _bin.bce_bwd(x, y, w, pw, logits, g, need_dx, need_dy)
    return _grad_or_empty(dx, x), _grad_or_empty(dy, y)


@_bce_bwd_op.register_fake
def _(x, y, w, pw, logits, g, need_dx, need_dy):
    return _grads_fake(x, y, need_dx, need_dy)


def bce_fwd(x, y, w, pw, logits: bool, reduce: bool) -> Tensor:
    return _bce_fwd_op(x, y, w, pw, logits, reduce)


def bce_bwd(x, y, w, pw, logits: bool, g: Tensor, need_dx: bool, need_dy: bool):
    return _none_if_empty(_bce_bwd_op(x, y, w, pw, logits, g, need_dx, need_dy), (need_dx, need_dy))


@torch.library.custom_op("triton_losses::kl_fwd", mutates_args=())
def _kl_fwd_op(x: Tensor, y: Tensor, log_target: bool, reduce: bool) -> Tensor:
    """The elementwise KL at the broadcast shape, or its sum as ``(1,)`` fp32 (fp64) when ``reduce``."""
    out = _div.kl_fwd(x, y, log_target, reduce)
    return out.sum().reshape(1) if reduce else out.contiguous()


@_kl_fwd_op.register_fake
def _(x, y, log_target, reduce):
    return x.new_empty(1, dtype=_acc(x)) if reduce else x.new_empty(x.shape)


@torch.library.custom_op("triton_losses::kl_bwd", mutates_args=())
def _kl_bwd_op(
    x: Tensor, y: Tensor, log_target: bool, g: Tensor, need_dx: bool, need_dy: bool
) -> tuple[Tensor, Tensor]:
    dx, dy = _div.kl_bwd(x, y, log_target, g, need_dx, need_dy)
    return _grad_or_empty(dx, x), _grad_or_empty(dy, y)


@_kl_bwd_op.register_fake
def _(x, y, log_target, g, need_dx, need_dy):
    return _grads_fake(x, y, need_dx, need_dy)


def kl_fwd(x, y, log_target: bool, reduce: bool) -> Tensor:
    return _kl_fwd_op(x, y, log_target, reduce)


def kl_bwd(x, y, log_target: bool, g: Tensor, need_dx: bool, need_dy: bool):
    return _none_if_empty(_kl_bwd_op(x, y, log_target, g, need_dx, need_dy), (need_dx, need_dy))


@torch.library.custom_op("triton_losses::jsd_fwd", mutates_args=())
def _jsd_fwd_op(x: Tensor, y: Tensor, labels: Tensor | None, beta: float, ignore_index: int) -> Tensor:
    """Per-row generalised JSD ``(A * B,)`` fp32 (fp64) of ``(A, B, V)`` log-probabilities."""
    return _div.jsd_fwd(x, y, labels, beta, ignore_index, None, False, False)[0]


@_jsd_fwd_op.register_fake
def _(x, y, labels, beta, ignore_index):
    return x.new_empty(x.shape[0] * x.shape[1], dtype=_acc(x))


@torch.library.custom_op("triton_losses::jsd_bwd", mutates_args=())
def _jsd_bwd_op(
    x: Tensor, y: Tensor, labels: Tensor | None, beta: float, ignore_index: int, gscale: Tensor, need_gx: bool,
    need_gy: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    gx, gy = _div.jsd_bwd(x, y, labels, beta, ignore_index, gscale, need_gx, need_gy)
    return _grad_or_empty(gx, x), _grad_or_empty(gy, y)


@_jsd_bwd_op.register_fake
def _(x, y, labels, beta, ignore_index, gscale, need_gx, need_gy):
    return _grads_fake(x, y, need_gx, need_gy)


def jsd_fwd(x, y, labels, beta: float, ignore_index: int, gscale, need_gx: bool, need_gy: bool):
    assert not (need_gx or need_gy), "traced calls do not fuse gradients into the forward"
    return _jsd_fwd_op(x, y, labels, beta, ignore_index), None, None


def jsd_bwd(x, y, labels, beta: float, ignore_index: int, gscale, need_gx: bool, need_gy: bool):
    grads = _jsd_bwd_op(x, y, labels, beta, ignore_index, gscale, need_gx, need_gy)
    return _none_if_empty(grads, (need_gx, need_gy))


@torch.library.custom_op("triton_losses::kd_fwd", mutates_args=())
def _kd_fwd_op(s: Tensor, t: Tensor, labels: Tensor | None, inv_temp: float, ignore_index: int) -> Tensor:
    """Per-row statistics ``(5, A * B)`` fp32 (fp64): loss, then max and log-sum-exp-minus-max of each row."""
    return _kd.kd_fwd(s, t, labels, inv_temp, ignore_index, None, False, False)[0]


@_kd_fwd_op.register_fake
def _(s, t, labels, inv_temp, ignore_index):
    return s.new_empty(5, s.shape[0] * s.shape[1], dtype=_acc(s))


@torch.library.custom_op("triton_losses::kd_bwd", mutates_args=())
def _kd_bwd_op(
    s: Tensor, t: Tensor, labels: Tensor | None, inv_temp: float, ignore_index: int, stats: Tensor, gscale: Tensor,
    need_ds: bool, need_dt: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    ds, dt = _kd.kd_bwd(s, t, labels, inv_temp, ignore_index, stats, gscale, need_ds, need_dt)
    return _grad_or_empty(ds, s), _grad_or_empty(dt, t)


@_kd_bwd_op.register_fake
def _(s, t, labels, inv_temp, ignore_index, stats, gscale, need_ds, need_dt):
    return _grads_fake(s, t, need_ds, need_dt)


def kd_fwd(s, t, labels, inv_temp: float, ignore_index: int, gscale, need_ds: bool, need_dt: bool):
    assert not (need_ds or need_dt), "traced calls do not fuse gradients into the forward"
    return _kd_fwd_op(s, t, labels, inv_temp, ignore_index), None, None


def kd_bwd(s, t, labels, inv_temp: float, ignore_index: int, stats, gscale, need_ds: bool, need_dt: bool):
    grads = _kd_bwd_op(s, t, labels, inv_temp, ignore_index, stats, gscale, need_ds, need_dt)
    return _none_if_empty(grads, (need_ds, need_dt))
