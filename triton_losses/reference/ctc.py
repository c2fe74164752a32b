"""CTC loss in plain PyTorch, with the kernels' interface: the CPU fallback.

Two implementations of the same semantics (torch's, gradient included: see ``kernels/ctc.py``):

* torch's own ``aten._ctc_loss`` / ``aten._ctc_loss_backward`` for fp32 / fp64 in eager mode when
  the per-step work is small: its scalar C++ loop has no per-op overhead there;
* a batch-vectorised log-space recursion (one step of torch ops over all sequences and states per
  time step), fp32 math for fp16 / bf16 (one time step upcast at a time) and fp64 for fp64. It is
  also the only form ``torch.compile`` can trace (torch's op has a data-dependent output shape).

Measured on the 2-core machine (shared, loaded), one torch thread, fp32, ``F.ctc_loss`` forward +
backward ('mean'), medians of interleaved runs, ms::

    (T, N, C, S)             torch eager    vectorised    torch's op via this module
    (200, 4, 64, 40)              10.7         51.9          7.9
    (200, 32, 64, 40)             47.9         83.4         55.2
    (200, 32, 64, 100)           120.7        122.9        110.2
    (200, 64, 64, 100)           275.8        229.9        219.0
    (200, 64, 256, 200)          477.9        360.5        417.8
    (1000, 32, 1024, 200)       2493         1433 (chosen)
    (300, 64, 10000, 80)        3850         1946 (chosen)
    (100, 8, 32, 20)               4.1          -            4.7 (chosen; the checks and length reads)

so torch's op serves calls below ``NATIVE_MAX_WORK`` (next to it). Memory: alpha ``(N, T, 2S + 3)``
and the gradient; torch holds alpha, beta (both ``(N, T, 2S + 1)``) and the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._precision import acc_dtype
from .cross_entropy import scale_

__all__ = ["FUSES_GRAD", "ctc_bwd", "ctc_fwd", "ctc_nll_differentiable", "max_target_length", "scale_"]

FUSES_GRAD = True  # ctc_fwd(..., fuse=True) returns the gradient of the reduced loss with the loss

# torch's own op is used (fp32 / fp64, eager) while N * (W + C / 4) < NATIVE_MAX_WORK: a step of
# the vectorised recursion costs ~0.3 ms of per-op overhead, torch's scalar loop ~35 ns per state
# and ~8 ns per class of each frame (the module docstring's measurements fit this).
NATIVE_MAX_WORK = 8192

_NEG_INF = float("-inf")


def max_target_length(dtype: torch.dtype) -> int:
    """No limit: the longest target (labels) the reference takes."""
    return 1 << 62


def _native(lp: Tensor, max_len: int) -> bool:
    """Whether torch's own op serves this call (see the module docstring)."""
    if torch.compiler.is_compiling() or lp.dtype not in (torch.float32, torch.float64):
        return False
    _, N, C = lp.shape
    return N * (2 * max_len + 1 + C // 4) < NATIVE_MAX_WORK


def _padded(targets: Tensor, off: Tensor, tl_: Tensor, blank: int, C: int, L: int) -> Tensor:
    """``(N, L)`` int64 targets of each sequence, clamped to ``[0, C)``, blank past its length."""
    n = targets.numel()
    j = torch.arange(L, device=off.device)
    if n == 0 or L == 0:
        return torch.full((off.shape[0], L), blank, dtype=torch.int64, device=off.device)
    t = targets.reshape(-1)[(off[:, None] + j).clamp_(0, n - 1)].clamp_(0, C - 1)
    return torch.where(j < tl_[:, None], t, torch.full_like(t, blank))


class _States:
    """The extended states of every sequence: class ``(N, W)``, validity, and the allowed skips."""

    def __init__(self, targets, off, il, tl_, blank: int, C: int, L: int, T: int) -> None:
        N, W = off.shape[0], 2 * L + 1
        dev = off.device
        self.il = il.clamp(0, T)
        self.tl = tl_.clamp(0, L)
        tp = _padded(targets, off, self.tl, blank, C, L)
        self.cls = torch.full((N, W), blank, dtype=torch.int64, device=dev)
        self.cls[:, 1::2] = tp
        s = torch.arange(W, device=dev)
        self.valid = s < 2 * self.tl[:, None] + 1
        self.skip = torch.zeros((N, W), dtype=torch.bool, device=dev)
        if L > 1:
            self.skip[:, 3::2] = tp[:, 1:] != tp[:, :-1]
        self.skip &= self.valid
        self.last = self.valid & ((s == 2 * self.tl[:, None]) | (s == 2 * self.tl[:, None] - 1))


def _steps(lp: Tensor, il: Tensor) -> int:
    """Time steps to run: the longest input (read on the host), or all of them while tracing."""
    T = lp.shape[0]
    if torch.compiler.is_compiling() or il.numel() == 0:
        return T if il.numel() else 0
    return int(il.max().clamp(0, T))


def _logaddexp_into(out: Tensor, a: Tensor, b: Tensor) -> None:
    """``out = logaddexp(a, b)`` (two fused passes beat the shifted three-term form 2-3x on the CPU);
    dynamo traces no ``out=`` into a view, so a copy while compiling."""
    if torch.compiler.is_compiling():
        out.copy_(torch.logaddexp(a, b))
    else:
        torch.logaddexp(a, b, out=out)


def _alpha(lp: Tensor, st: _States, acc, steps: int) -> Tensor:
    """Forward variables ``(N, T, W)`` in ``acc``, a view of a buffer with two ``-inf`` states in front
    (the shifted operands of each step are views of it); rows ``t >= steps`` are unset."""
    T, N, _ = lp.shape
    W = st.cls.shape[1]
    buf = torch.empty((N, T, W + 2), dtype=acc, device=lp.device)
    buf[:, :, :2] = _NEG_INF
    if steps == 0:
        return buf[:, :, 2:]
    first = st.valid & (torch.arange(W, device=lp.device) < 2)
    buf[:, 0, 2:] = lp[0].gather(1, st.cls).to(acc).masked_fill_(~first, _NEG_INF)
    neg = torch.full((N, W), _NEG_INF, dtype=acc, device=lp.device)
    invalid = ~st.valid
    for t in range(1, steps):
        prev, new = buf[:, t - 1], buf[:, t, 2:]
        _logaddexp_into(new, prev[:, 2:], prev[:, 1:-1])
        _logaddexp_into(new, new, torch.where(st.skip, prev[:, :-2], neg))
        new.add_(lp[t].gather(1, st.cls).to(acc)).masked_fill_(invalid, _NEG_INF)
    return buf[:, :, 2:]


def _nll(alpha: Tensor, st: _States) -> Tensor:
    """``-log p`` per sequence from the alphas at its last input step (torch's conventions for empty inputs)."""
    N = alpha.shape[0]
    n = torch.arange(N, device=alpha.device)
    if alpha.shape[1] == 0:
        return torch.where(st.tl == 0, 0.0, float("inf")).to(alpha.dtype)
    at = alpha[n, (st.il - 1).clamp(min=0)]
    l1 = at.gather(1, (2 * st.tl)[:, None])[:, 0]
    l2 = at.gather(1, (2 * st.tl - 1).clamp(min=0)[:, None])[:, 0]
    l2 = torch.where(st.tl > 0, l2, torch.full_like(l2, _NEG_INF))
    ll = torch.logaddexp(l1, l2)
    empty = torch.where(st.tl == 0, 0.0, _NEG_INF).to(alpha.dtype)
    return -torch.where(st.il > 0, ll, empty)


def ctc_fwd(
    lp: Tensor, targets: Tensor, off: Tensor, il: Tensor, tl_: Tensor, blank: int, max_len: int,
    zero_infinity: bool, gscale: Tensor | None, fuse: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:  # fmt: skip
    """Loss per sequence, the saved alpha, and with ``fuse`` the gradient; as ``kernels.ctc.ctc_fwd``."""
    if _native(lp, max_len):
        nll, alpha = torch.ops.aten._ctc_loss.Tensor(lp, targets, il, tl_, blank, zero_infinity)
        grad = _native_bwd(lp, targets, il, tl_, blank, zero_infinity, nll, alpha, gscale) if fuse else None
        return nll, alpha, grad
    T, _, C = lp.shape
    st = _States(targets, off, il, tl_, blank, C, max_len, T)
    steps = _steps(lp, st.il)
    alpha = _alpha(lp, st, acc_dtype(lp.dtype), steps)
    nll = _nll(alpha, st)
    grad = _gradient(lp, st, alpha, nll, gscale, zero_infinity, blank, steps) if fuse else None
    return nll, alpha, grad


def ctc_bwd(
    lp: Tensor, targets: Tensor, off: Tensor, il: Tensor, tl_: Tensor, blank: int, max_len: int,
    zero_infinity: bool, nll: Tensor, alpha: Tensor, gscale: Tensor,
) -> Tensor:  # fmt: skip
    """torch's CTC gradient ``(T, N, C)`` in ``lp``'s dtype; as ``kernels.ctc.ctc_bwd``."""
    if _native(lp, max_len):
        return _native_bwd(lp, targets, il, tl_, blank, zero_infinity, nll, alpha, gscale)
    T, _, C = lp.shape
    st = _States(targets, off, il, tl_, blank, C, max_len, T)
    return _gradient(lp, st, alpha, nll, gscale, zero_infinity, blank, _steps(lp, st.il))


def _native_bwd(lp, targets, il, tl_, blank, zero_infinity, nll, alpha, gscale) -> Tensor:
    g = gscale.to(lp.dtype).reshape(-1)
    return torch.ops.aten._ctc_loss_backward.Tensor(g, lp, targets, il, tl_, nll, alpha, blank, zero_infinity)


def _gradient(lp, st: _States, alpha, nll, gscale, zero_infinity: bool, blank: int, steps: int) -> Tensor:
    """Beta recursion backwards in time; each step's gradient row ``(N, C)`` is written as it is reached.

    ``grad[t] = (exp(lp[t]) - Q_t) * g`` with ``Q_t[c]`` the summed path fractions
    ``exp(alpha + beta - lp + nll)`` of the states of class ``c`` (``scatter_add_``: a fixed order on
    the CPU); NaN where torch's formula gives NaN (``lp = -inf``, or an infinite / NaN loss).
    """
    T, N, C = lp.shape
    acc = acc_dtype(lp.dtype)
    W = st.cls.shape[1]
    grad = torch.empty((T, N, C), dtype=lp.dtype, device=lp.device)
    grad[steps:] = 0.0
    if grad.numel() == 0 or steps == 0:
        return grad
    hosted = not torch.compiler.is_compiling()  # host reads are allowed: skip masks nothing needs
    il_host = st.il.tolist() if hosted else None
    gs = gscale.to(acc).reshape(N, 1)
    bad = (nll.isnan() | (nll == float("inf")))[:, None]  # torch's formula is NaN on these rows
    zero = (nll == float("inf"))[:, None] if zero_infinity else torch.zeros_like(bad)
    any_bad = not hosted or bool(bad.any())
    neg_inf_lp = not hosted or bool(lp.amin() == _NEG_INF) if lp.numel() else False
    s = torch.arange(W, device=lp.device)
    # torch's CPU kernel sets (not adds) the last label's term at t = il - 1, so a last target equal
    # to the blank drops the final blank state's term there; mirrored for equal gradients.
    last_lab = st.cls.gather(1, (2 * st.tl - 1).clamp(min=0)[:, None])
    quirk = (st.tl[:, None] > 0) & (last_lab == blank) & (s == 2 * st.tl[:, None])
    skip_next = torch.zeros_like(st.skip)
    skip_next[:, :-2] = st.skip[:, 2:]
    neg = torch.full((N, W), _NEG_INF, dtype=acc, device=lp.device)
    invalid = ~st.valid
    bp = torch.full((N, W + 2), _NEG_INF, dtype=acc, device=lp.device)  # two -inf states after the last
    bn = bp.clone()
    for t in range(steps - 1, -1, -1):
        x = lp[t].gather(1, st.cls).to(acc)
        beta = bn[:, :W]
        _logaddexp_into(beta, bp[:, :W], bp[:, 1 : W + 1])
        _logaddexp_into(beta, beta, torch.where(skip_next, bp[:, 2:], neg))
        beta.add_(x)
        starts = not hosted or (t + 1) in il_host
        if starts:
            start = (st.il == t + 1)[:, None]
            beta.copy_(torch.where(start, torch.where(st.last, x, neg), beta))
        beta.masked_fill_(invalid, _NEG_INF)
        bp, bn = bn, bp
        live = st.valid & (t < st.il)[:, None]
        if starts:
            live &= ~(start & quirk)
        q = (alpha[:, t] + beta).sub_(x).add_(nll[:, None]).exp_()
        q = torch.where(live, q, torch.zeros_like(q))
        _gradient_row(grad[t], lp[t], st.cls, q, gs, bad if any_bad else None, neg_inf_lp)
        if zero_infinity or not hosted or min(il_host) <= t:
            grad[t].masked_fill_(zero | (t >= st.il)[:, None], 0.0)
    return grad


def _gradient_row(out: Tensor, lpt: Tensor, cls: Tensor, q: Tensor, gs: Tensor, bad, neg_inf_lp: bool) -> None:
    """``out = (exp(lp_t) - Q_t) * g`` ``(N, C)``, computed in ``out`` itself when it is in the compute dtype."""
    acc = q.dtype
    direct = out.dtype == acc and not torch.compiler.is_compiling()
    row = torch.exp(lpt, out=out) if direct else lpt.to(acc).exp()
    row.scatter_add_(1, cls, q.neg_())
    if neg_inf_lp:
        row.masked_fill_(lpt == _NEG_INF, float("nan"))
    if bad is not None:
        row.masked_fill_(bad, float("nan"))
    row.mul_(gs)
    if row is not out:
        out.copy_(row)


def ctc_nll_differentiable(lp: Tensor, targets: Tensor, off: Tensor, il: Tensor, tl_: Tensor, blank: int,
                           max_len: int) -> Tensor:  # fmt: skip
    """``(N,)`` losses from out-of-place torch ops (differentiable, twice), in ``lp``'s accumulation dtype.

    For double backward: torch's CTC gradient is ``exp(lp) * g`` plus the true derivative of this.
    """
    T, N, C = lp.shape
    acc = acc_dtype(lp.dtype)
    st = _States(targets, off, il, tl_, blank, C, max_len, T)
    W = st.cls.shape[1]
    if T == 0:
        return torch.where(st.tl == 0, 0.0, float("inf")).to(acc)
    neg = torch.full((N, W), _NEG_INF, dtype=acc, device=lp.device)
    pad = torch.full((N, 2), _NEG_INF, dtype=acc, device=lp.device)
    s = torch.arange(W, device=lp.device)
    alpha = torch.where(st.valid & (s < 2), lp[0].gather(1, st.cls).to(acc), neg)
    ends = [alpha]
    for t in range(1, T):
        p = torch.cat([pad, alpha], 1)
        a = torch.stack([alpha, p[:, 1:-1], torch.where(st.skip, p[:, :-2], neg)])
        alpha = torch.where(st.valid, _logsumexp0(a) + lp[t].gather(1, st.cls).to(acc), neg)
        ends.append(alpha)
    at = torch.stack(ends, 1)[torch.arange(N, device=lp.device), (st.il - 1).clamp(min=0)]
    l1 = at.gather(1, (2 * st.tl)[:, None])[:, 0]
    l2 = torch.where(st.tl > 0, at.gather(1, (2 * st.tl - 1).clamp(min=0)[:, None])[:, 0], _NEG_INF)
    ll = _logsumexp0(torch.stack([l1, l2]))
    return -torch.where(st.il > 0, ll, torch.where(st.tl == 0, 0.0, _NEG_INF).to(acc))


def _logsumexp0(a: Tensor) -> Tensor:
    """``logsumexp(a, 0)`` whose gradient is 0 (not NaN) where every term is ``-inf``."""
    none = (a == _NEG_INF).all(0)
    out = torch.logsumexp(torch.where(none, 0.0, a), 0)
    return torch.where(none, _NEG_INF, out)
