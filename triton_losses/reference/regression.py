"""Pure-PyTorch regression losses with the kernels' interface: the CPU fallback.

Same formulas as ``kernels.regression`` (see its docstring), in fp32 (fp64 when an operand is
fp64), chunk by chunk (``reference._fused``): the forward of a reduced loss also writes its
gradients in the same pass over each chunk, so the backward only rescales them (``scale_``).
Each chunk is computed with in-place / ``out=`` ops; the clipped difference ``c`` turns smooth L1
and Huber into three passes without masks: ``c * (d - c / 2)`` (divided by beta for smooth L1),
with gradient ``c`` (``c / beta``).
"""

from __future__ import annotations

import functools
import math

import torch

from ..options import RegressionOptions
from . import _fused
from ._fused import scale_  # noqa: F401  (the fused-gradient rescale, cross-entropy's in eager mode)

FUSES_GRAD = True
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _neg_into(t: torch.Tensor, dst) -> torch.Tensor:
    return torch.neg(t, out=dst) if dst is not None else t.neg()


# torch's own CPU kernels of mse, smooth_l1 and huber, called on each chunk: one vectorised pass for the
# loss and one for the gradient, where the in-place formulas below take three or four. On the 2-core
# benchmark machine (1 thread) the chunked in-place passes were 1.5-2x slower than torch eager at 2**18
# elements; the whole-tensor kernels were slower still once a gradient buffer was live (their loss-sized
# temporary then came from fresh pages: ~0.5 ms of page faults per MiB). Chunk by chunk they are exact
# (torch's formulas) and their temporaries are chunk-sized.
_NATIVE = {
    "mse": (torch._C._nn.mse_loss, torch.ops.aten.mse_loss_backward.grad_input),
    "smooth_l1": (torch._C._nn.smooth_l1_loss, torch.ops.aten.smooth_l1_loss_backward.grad_input),
    "huber": (torch._C._nn.huber_loss, torch.ops.aten.huber_loss_backward.out),
}
_NONE, _SUM = 0, 2  # torch's reduction enum


def _native_losses(opts, x, y, gs, want_loss, sum_ok, needs, ldst, dsts):
    """mse, smooth_l1 and huber of one chunk by torch's kernels: ``(loss, [dx, dy, None])``."""
    fwd, bwd, extra = *_NATIVE[opts.loss], (() if opts.loss == "mse" else (opts.p,))
    grads = [None, None, None]
    if needs[0] or needs[1]:
        scalar = not isinstance(gs, torch.Tensor) or gs.dim() == 0
        g = torch.as_tensor(gs, dtype=x.dtype) if scalar else gs.expand(x.shape)
        dst = dsts[0] if needs[0] and dsts[0] is not None else torch.empty_like(x)
        dx = bwd(g, x, y, _SUM if scalar else _NONE, *extra, grad_input=dst)
        grads[0] = dx if needs[0] else None
        grads[1] = _neg_into(dx, dsts[1]) if needs[1] else None
    if not want_loss:
        return None, grads
    if sum_ok:
        return fwd(x, y, _SUM, *extra), grads
    loss = fwd(x, y, _NONE, *extra)
    return (ldst.copy_(loss) if ldst is not None else loss), grads


def _difference_losses(opts, x, y, gs, want_loss, sum_ok, needs, ldst, dsts):
    """l1, mse, smooth_l1 and huber of one chunk: ``(loss, [dx, dy, None])``."""
    d = torch.sub(x, y)
    name, p = opts.loss, opts.p
    c = torch.clamp(d, -p, p) if name in ("smooth_l1", "huber") else None
    grads = [None, None, None]
    if needs[0] or needs[1]:
        dx_dst = dsts[0] if needs[0] else None
        if name == "l1":
            dx = torch.sign(d, out=dx_dst).mul_(gs)
        elif name == "mse":
            dx = torch.mul(d, 2.0, out=dx_dst).mul_(gs)
        elif name == "smooth_l1":
            dx = torch.div(c, p, out=dx_dst).mul_(gs)
        else:
            dx = torch.mul(c, gs, out=dx_dst)
        grads[0] = dx if needs[0] else None
        grads[1] = _neg_into(dx, dsts[1]) if needs[1] else None
    if not want_loss:
        return None, grads
    if name == "l1":
        loss = torch.abs(d, out=ldst)
    elif name == "mse":
        flat = d.reshape(-1)
        loss = torch.dot(flat, flat) if sum_ok else torch.mul(d, d, out=ldst)
    else:
        loss = torch.sub(d, c, alpha=0.5, out=ldst).mul_(c)
        if name == "smooth_l1":
            loss.div_(p)
    return loss, grads


def _poisson(opts, x, y, gs, want_loss, needs, ldst, dsts):
    """Poisson NLL of one chunk: ``(loss, [dx, dy, None])``."""
    if opts.log_input:
        e = torch.exp(x)
        dx = torch.sub(e, y, out=dsts[0]).mul_(gs) if needs[0] else None
        dy = torch.mul(x, gs, out=dsts[1]).neg_() if needs[1] else None
        loss = torch.sub(e, torch.mul(y, x), out=ldst) if want_loss else None
    else:
        xe = torch.add(x, opts.p)
        dx = torch.div(y, xe, out=dsts[0]).neg_().add_(1.0).mul_(gs) if needs[0] else None
        lx = xe.log_()
        dy = torch.mul(lx, gs, out=dsts[1]).neg_() if needs[1] else None
        loss = torch.sub(x, lx.mul_(y), out=ldst) if want_loss else None
    if opts.full:
        small = y <= 1.0
        ly = torch.log(y)
        if needs[1]:
            s = torch.reciprocal(y).mul_(0.5).add_(ly)
            dy.add_(torch.where(small, s * 0.0, s).mul_(gs))  # 0 * s: NaN where y <= 0, as torch
        if want_loss:
            st = torch.mul(y, 2 * math.pi).log_().mul_(0.5).sub_(y).add_(ly.mul_(y))
            loss.add_(st.masked_fill_(small, 0.0))
    return loss, [dx, dy, None]


def _gaussian(opts, x, y, v, gs, want_loss, needs, ldst, dsts):
    """Gaussian NLL of one chunk, ``v`` a chunk or None (``opts.var``): ``(loss, [dx, dy, dv])``."""
    d = torch.sub(x, y)
    vc = torch.clamp(v, min=opts.p) if v is not None else max(opts.var, opts.p)
    r = torch.div(d, vc)
    dx = torch.mul(r, gs, out=dsts[0]) if needs[0] else None
    dy = torch.mul(r, gs, out=dsts[1]).neg_() if needs[1] else None
    dv = None
    if needs[2]:
        dv = torch.mul(d, r, out=dsts[2]).neg_().add_(1.0).div_(vc).mul_(gs).mul_(0.5)
    if not want_loss:
        return None, [dx, dy, dv]
    loss = torch.mul(d, r, out=ldst)
    loss.add_(torch.log(vc) if v is not None else math.log(vc)).mul_(0.5)
    if opts.full:
        loss.add_(_HALF_LOG_2PI)
    return loss, [dx, dy, dv]


def _math(opts: RegressionOptions, x, y, v, gs, want_loss, reduce, needs, ldst, dsts):
    """One chunk of any regression loss (the interface of ``reference._fused``)."""
    weighted = v is not None and opts.loss != "gaussian"
    if weighted and any(needs):
        gs = v * gs
    if opts.loss == "poisson":
        loss, grads = _poisson(opts, x, y, gs, want_loss, needs, ldst, dsts)
    elif opts.loss == "gaussian":
        loss, grads = _gaussian(opts, x, y, v, gs, want_loss, needs, ldst, dsts)
    elif opts.loss in _NATIVE:
        loss, grads = _native_losses(opts, x, y, gs, want_loss, reduce and not weighted, needs, ldst, dsts)
    else:
        loss, grads = _difference_losses(opts, x, y, gs, want_loss, reduce and not weighted, needs, ldst, dsts)
    if want_loss:
        if weighted:
            loss.mul_(v)
        if reduce and loss.dim():
            loss = loss.sum()
    return loss, grads


def regression_fwd(x, y, v, opts: RegressionOptions, reduce: bool, out_dtype, scale=1.0, g=None, needs=(False,) * 3):
    """The loss ('none') or its partial sums (with ``reduce``, plus the gradients of the reduced loss).

    Same arguments and results as ``kernels.regression.regression_fwd`` (one partial sum per chunk).
    """
    return _fused.forward(functools.partial(_math, opts), [x, y, v], out_dtype, reduce, scale, g, needs)


def regression_bwd(x, y, v, opts: RegressionOptions, g: torch.Tensor, needs):
    """Gradients ``(dx, dy, dv)`` of ``sum(g * loss)`` at the broadcast shape, as ``kernels.regression``'s."""
    return _fused.backward(functools.partial(_math, opts), [x, y, v], g, needs)
