"""Pure-PyTorch margin losses with the kernels' interface: the CPU fallback.

Same formulas as ``kernels.margin`` (see its docstring), in fp32 (fp64 when an operand is fp64),
chunk by chunk (``reference._fused``): the forward of a reduced loss also writes its gradients in
the same pass over each chunk, so the backward only rescales them (``scale_``).
"""

from __future__ import annotations

import functools

import torch

from ..options import MarginOptions
from . import _fused
from ._fused import scale_  # noqa: F401  (the fused-gradient rescale, cross-entropy's in eager mode)

FUSES_GRAD = True


def _soft_margin(a, b, gs, want_loss, needs, ldst, dsts):
    """``softplus(-b * a)`` of one chunk, and its gradient w.r.t. ``a``."""
    z = torch.mul(b, a).neg_()
    da = torch.sigmoid(z, out=dsts[0]).mul_(b).mul_(gs).neg_() if needs[0] else None
    loss = None
    if want_loss:
        loss = torch.abs(z, out=ldst).neg_().exp_().log1p_().add_(z.clamp_min_(0.0))
    return loss, [da, None, None]


def _hinge(a, b, m, gs, want_loss, needs, ldst, dsts):
    """The hinge embedding loss of one chunk, and its gradient w.r.t. ``a``."""
    u = torch.rsub(a, m)
    ne1, ne_m1 = b != 1.0, b != -1.0
    da = None
    if needs[0]:
        da = torch.logical_and(ne1, u >= 0.0).to(a.dtype).neg_().add_(ne_m1).mul_(gs)
        if dsts[0] is not None:
            da = dsts[0].copy_(da)
    loss = None
    if want_loss:
        zero = a.new_zeros(())
        loss = torch.where(ne1, u.clamp_min_(0.0), zero, out=ldst).add_(torch.where(ne_m1, a, zero))
    return loss, [da, None, None]


def _ranking(a, b, c, m, gs, want_loss, needs, ldst, dsts):
    """``max(-c * (a - b) + m, 0)`` of one chunk, and its gradients w.r.t. ``a``, ``b``, ``c``."""
    diff = torch.sub(a, b)
    u = torch.mul(c, diff).neg_().add_(m)
    grads = [None, None, None]
    if any(needs):
        k = (u >= 0.0).to(a.dtype).mul_(gs)  # 0 / 1 times the upstream gradient: NaN inputs give NaN, as torch
        if needs[0]:
            grads[0] = torch.mul(k, c, out=dsts[0]).neg_()
        if needs[1]:
            grads[1] = torch.mul(k, c, out=dsts[1])
        if needs[2]:
            grads[2] = torch.mul(k, diff, out=dsts[2]).neg_()
    loss = torch.clamp_min(u, 0.0, out=ldst) if want_loss else None
    return loss, grads


def _math(opts: MarginOptions, a, b, c, gs, want_loss, reduce, needs, ldst, dsts):
    """One chunk of any margin loss (the interface of ``reference._fused``)."""
    if opts.loss == "soft_margin":
        loss, grads = _soft_margin(a, b, gs, want_loss, needs, ldst, dsts)
    elif opts.loss == "hinge":
        loss, grads = _hinge(a, b, opts.margin, gs, want_loss, needs, ldst, dsts)
    else:
        loss, grads = _ranking(a, b, c, opts.margin, gs, want_loss, needs, ldst, dsts)
    if want_loss and reduce and loss.dim():
        loss = loss.sum()
    return loss, grads


def margin_fwd(a, b, c, opts: MarginOptions, reduce: bool, out_dtype, scale=1.0, g=None, needs=(False,) * 3):
    """The loss ('none') or its partial sums (with ``reduce``, plus the gradients of the reduced loss).

    Same arguments and results as ``kernels.margin.margin_fwd`` (one partial sum per chunk).
    """
    return _fused.forward(functools.partial(_math, opts), [a, b, c], out_dtype, reduce, scale, g, needs)


def margin_bwd(a, b, c, opts: MarginOptions, g: torch.Tensor, needs):
    """Gradients ``(da, db, dc)`` of ``sum(g * loss)`` at the broadcast shape; as ``kernels.margin.margin_bwd``."""
    return _fused.backward(functools.partial(_math, opts), [a, b, c], g, needs)
