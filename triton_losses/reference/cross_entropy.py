"""Pure-PyTorch cross-entropy / NLL with the kernels' interface: the CPU fallback.

It computes what ``kernels.cross_entropy`` computes, with the same formulas, in fp32 (fp64 for
fp64 input), over chunks of rows so that no full-size fp32 intermediate is ever held: the forward
keeps only per-row ``loss`` and ``lse``, the backward recomputes the softmax chunk by chunk.
"""

from __future__ import annotations

import torch

from ..spec import CESpec

FUSES_GRAD = False  # the forward never writes the gradient; the backward recomputes it

# Rows per chunk are chosen so a chunk holds about this many fp32 elements (16 MiB).
CHUNK_ELEMS = 1 << 22


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(A: int, C: int, B: int):
    step = max(1, CHUNK_ELEMS // max(1, C * B))
    for a0 in range(0, A, step):
        yield a0, min(A, a0 + step)


def _rows(v: torch.Tensor) -> torch.Tensor:
    """``(A', C, B)`` → ``(A' * B, C)`` (a view when B == 1)."""
    return v.permute(0, 2, 1).reshape(-1, v.shape[1])


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else cap * torch.tanh(x / cap)


def logsumexp(x: torch.Tensor) -> torch.Tensor:
    """Row log-sum-exp with torch's log_softmax semantics: +inf or NaN anywhere gives NaN."""
    if x.shape[1] == 0:
        return torch.full(x.shape[:1], float("-inf"), dtype=x.dtype, device=x.device)
    m = x.amax(1)
    shift = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    return m + torch.log(torch.exp(x - shift[:, None]).sum(1))


class _Chunk:
    """The per-row quantities of one chunk of rows, shared by the forward and the backward."""

    def __init__(self, x, t, spec: CESpec, a0: int, a1: int, lse=None):
        _, C, B = x.shape
        acc = acc_dtype(x.dtype)
        self.C = C
        self.x = softcap(_rows(x[a0:a1]).to(acc), spec.softcap)
        self.w = None if spec.weight is None else spec.weight.to(acc)
        self.wsum = float(C) if spec.weight is None else spec.weight_sum.to(acc)
        if spec.prob_target:
            tp = _rows(t[a0:a1]).to(acc)
            if spec.smoothing > 0:
                tp = tp * (1.0 - spec.smoothing) + spec.smoothing / C
            self.tp = tp
            self.wt = tp if self.w is None else tp * self.w
        else:
            tt = t[a0:a1].reshape(-1).long()
            self.tgt = tt
            self.ignored = tt == spec.ignore_index
            self.inb = (tt >= 0) & (tt < C)
            self.tsafe = torch.where(self.inb, tt, torch.zeros_like(tt))
            ones = torch.ones(tt.shape, dtype=acc, device=tt.device)
            self.w_t = ones if self.w is None else self.w[self.tsafe]
        if lse is not None:
            self.lse = lse[a0 * B : a1 * B].to(acc)
        elif spec.logp_input:
            self.lse = torch.zeros(self.x.shape[0], dtype=acc, device=x.device)
        else:
            self.lse = logsumexp(self.x)

    def mask_rows(self, v: torch.Tensor) -> torch.Tensor:
        """0 on ignored rows, NaN on rows whose target is out of range."""
        nan = torch.full_like(v, float("nan"))
        return torch.where(self.ignored, torch.zeros_like(v), torch.where(self.inb, v, nan))


def ce_fwd(x: torch.Tensor, t: torch.Tensor, spec: CESpec, coef: torch.Tensor, grad=None):
    """Per-row loss and lse, each ``(A * B,)`` fp32 (fp64 for fp64), of logits ``x`` ``(A, C, B)``."""
    assert grad is None, "the reference path does not fuse the gradient into the forward"
    A, C, B = x.shape
    loss = torch.empty(A * B, dtype=acc_dtype(x.dtype), device=x.device)
    lse = torch.empty(A * B, dtype=acc_dtype(x.dtype), device=x.device)
    for a0, a1 in _chunks(A, C, B):
        ch = _Chunk(x, t, spec, a0, a1)
        eps = spec.smoothing
        if spec.prob_target:
            S1 = ch.wt.sum(1)
            S2 = (ch.wt * ch.x).sum(1)
            out = ch.lse * S1 - S2
            if spec.z_loss:
                out = out + spec.z_loss * ch.lse * ch.lse
        else:
            x_t = ch.x.gather(1, ch.tsafe[:, None])[:, 0]
            if spec.logp_input:
                out = -ch.w_t * x_t
            else:
                out = ch.w_t * (ch.lse - x_t)
                if eps > 0:
                    wx = ch.x if ch.w is None else ch.x * ch.w
                    out = (1.0 - eps) * out + eps / C * (ch.wsum * ch.lse - wx.sum(1))
                if spec.z_loss:
                    out = out + spec.z_loss * ch.w_t * ch.lse * ch.lse
            out = ch.mask_rows(out)
        loss[a0 * B : a1 * B] = out
        lse[a0 * B : a1 * B] = ch.lse
    return loss, lse


def ce_bwd(x, t, spec: CESpec, lse, gout, coef, grad, tgrad) -> None:
    """Write ``d(sum_r gout_r * coef * loss_r)/dx`` into ``grad`` (and ``/dt`` into ``tgrad``)."""
    A, C, B = x.shape
    acc = acc_dtype(x.dtype)
    scale = gout.to(acc).reshape(-1) * coef.to(acc)
    eps = spec.smoothing
    for a0, a1 in _chunks(A, C, B):
        ch = _Chunk(x, t, spec, a0, a1, lse=lse)
        rs = scale if scale.numel() == 1 else scale[a0 * B : a1 * B]
        rs = rs.expand(ch.x.shape[0])
        if spec.prob_target:
            a_coef = ch.wt.sum(1)
            if spec.z_loss:
                a_coef = a_coef + 2.0 * spec.z_loss * ch.lse
            d = torch.exp(ch.x - ch.lse[:, None]) * a_coef[:, None] - ch.wt
            if tgrad is not None:
                dt = (ch.lse[:, None] - ch.x) * (1.0 - eps) * rs[:, None]
                if ch.w is not None:
                    dt = dt * ch.w
                _rows_view(tgrad[a0:a1]).copy_(dt.view(a1 - a0, B, C))
        else:
            rs = ch.mask_rows(rs)
            own = (1.0 - eps) * ch.w_t if eps > 0 else ch.w_t
            onehot = torch.zeros_like(ch.x).scatter_(1, ch.tsafe[:, None], 1.0)
            if spec.logp_input:
                d = -own[:, None] * onehot
            else:
                a_coef = own + eps * ch.wsum / C if eps > 0 else ch.w_t
                if spec.z_loss:
                    a_coef = a_coef + 2.0 * spec.z_loss * ch.w_t * ch.lse
                d = torch.exp(ch.x - ch.lse[:, None]) * a_coef[:, None] - own[:, None] * onehot
                if eps > 0:
                    d = d - (eps / C) * (1.0 if ch.w is None else ch.w)
        if spec.softcap is not None and not spec.logp_input:
            d = d * (1.0 - (ch.x / spec.softcap) ** 2)
        d = d * rs[:, None]
        _rows_view(grad[a0:a1]).copy_(d.view(a1 - a0, B, C))


def _rows_view(v: torch.Tensor) -> torch.Tensor:
    """``(A', C, B)`` → ``(A', B, C)`` view, to copy row-major chunks into."""
    return v.permute(0, 2, 1)
