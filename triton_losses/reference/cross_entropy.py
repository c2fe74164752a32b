"""Pure-PyTorch cross-entropy / NLL with the kernels' interface: the CPU fallback.

It computes what ``kernels.cross_entropy`` computes, with the same formulas, in fp32 (fp64 for
fp64 input), over chunks of rows so that no full-size fp32 intermediate is ever held: the forward
keeps only per-row ``loss`` and ``lse`` (and, given ``grad``, writes the gradient of each chunk
right after its loss, as the fused kernel does); the backward recomputes the softmax chunk by chunk.
Gradients are computed with in-place ops straight into the output where the layout allows (fp32 /
fp64 rows), so a chunk costs no temporaries; ``grad`` may be the logits themselves.
"""

from __future__ import annotations

import torch

from ..spec import CESpec

FUSES_GRAD = True  # ce_fwd(..., grad=buffer) writes the gradient of the reduced loss

# Rows per chunk are chosen so a chunk holds about this many fp32 elements (4 MiB).
CHUNK_ELEMS = 1 << 20


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
    lse = torch.logsumexp(x, 1)
    return lse.masked_fill_(lse == float("inf"), float("nan"))


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
            self.tgt, self.ignored, self.inb, self.tsafe = _targets(t[a0:a1], spec, C)
            ones = torch.ones(self.tgt.shape, dtype=acc, device=x.device)
            self.w_t = ones if self.w is None else self.w[self.tsafe]
        if lse is not None:
            self.lse = lse[a0 * B : a1 * B].to(acc)
        else:
            self.lse = logsumexp(self.x)

    def mask_rows(self, v: torch.Tensor) -> torch.Tensor:
        """0 on ignored rows, NaN on rows whose target is out of range."""
        return _mask_rows(v, self.ignored, self.inb)


def _targets(t: torch.Tensor, spec: CESpec, C: int):
    """Flat index targets: ``(target, ignored, in_range, clamped)``, each ``(R,)``."""
    tt = t.reshape(-1).long()
    ignored = tt == spec.ignore_index
    inb = (tt >= 0) & (tt < C)
    return tt, ignored, inb, torch.where(inb, tt, torch.zeros_like(tt))


def _mask_rows(v: torch.Tensor, ignored: torch.Tensor, inb: torch.Tensor) -> torch.Tensor:
    """0 on ignored rows, NaN on rows whose target is out of range."""
    return v.masked_fill(~inb, float("nan")).masked_fill_(ignored, 0.0)


def ce_fwd(x: torch.Tensor, t: torch.Tensor, spec: CESpec, coef: torch.Tensor, grad=None):
    """Per-row loss and lse, each ``(A * B,)`` fp32 (fp64 for fp64), of logits ``x`` ``(A, C, B)``.

    With ``grad`` (``(A, C, B)``, possibly ``x`` itself), also writes ``coef * dloss/dx`` into it.
    """
    A, C, B = x.shape
    assert grad is None or not spec.logp_input
    acc = acc_dtype(x.dtype)
    if spec.logp_input:  # NLL: one gathered element per row, no pass over the rows
        _, ignored, inb, tsafe = _targets(t, spec, C)
        x_t = x.gather(1, tsafe.view(A, 1, B)).reshape(-1).to(acc)
        w_t = 1.0 if spec.weight is None else spec.weight.to(acc)[tsafe]
        return _mask_rows(-w_t * x_t, ignored, inb), torch.zeros(A * B, dtype=acc, device=x.device)
    loss = torch.empty(A * B, dtype=acc, device=x.device)
    lse = torch.empty(A * B, dtype=acc, device=x.device)
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
            out = ch.w_t * (ch.lse - x_t)
            if eps > 0:
                wx = ch.x.sum(1) if ch.w is None else ch.x @ ch.w
                out = (1.0 - eps) * out + eps / C * (ch.wsum * ch.lse - wx)
            if spec.z_loss:
                out = out + spec.z_loss * ch.w_t * ch.lse * ch.lse
            out = ch.mask_rows(out)
        loss[a0 * B : a1 * B] = out
        lse[a0 * B : a1 * B] = ch.lse
        if grad is not None:
            _grad_chunk(ch, spec, a0, a1, coef.to(acc).expand(ch.x.shape[0]), grad, None)
    return loss, lse


def ce_bwd(x, t, spec: CESpec, lse, gout, coef, grad, tgrad) -> None:
    """Write ``d(sum_r gout_r * coef * loss_r)/dx`` into ``grad`` (and ``/dt`` into ``tgrad``).

    ``grad`` may be ``x`` itself (the same object; ``inplace_backward``): each chunk is read before it is written.
    """
    A, C, B = x.shape
    acc = acc_dtype(x.dtype)
    scale = gout.to(acc).reshape(-1) * coef.to(acc)
    if spec.logp_input:  # NLL: zeros with one value per row
        _, ignored, inb, tsafe = _targets(t, spec, C)
        own = 1.0 if spec.weight is None else spec.weight.to(acc)[tsafe]
        vals = _mask_rows(-own * scale.expand(A * B), ignored, inb)
        grad.zero_().scatter_(1, tsafe.view(A, 1, B), vals.view(A, 1, B).to(grad.dtype))
        return
    for a0, a1 in _chunks(A, C, B):
        ch = _Chunk(x, t, spec, a0, a1, lse=lse)
        rs = scale if scale.numel() == 1 else scale[a0 * B : a1 * B]
        _grad_chunk(ch, spec, a0, a1, rs.expand(ch.x.shape[0]), grad, tgrad)


def _grad_chunk(ch: _Chunk, spec: CESpec, a0: int, a1: int, rs, grad, tgrad) -> None:
    """Write ``rs * dloss/dx`` of one chunk of rows into ``grad[a0:a1]`` (and ``dloss/dt`` into ``tgrad``)."""
    rows, C = ch.x.shape
    B = grad.shape[2]
    eps = spec.smoothing
    gview = _rows_view(grad[a0:a1])
    # Compute straight into the gradient when its rows are the chunk's rows in the compute dtype;
    # if ``grad`` is the logits, ``ch.x`` is that same memory and is not read after this point.
    direct = B == 1 and grad.dtype == ch.x.dtype
    if spec.prob_target and tgrad is not None:
        dt = (ch.lse[:, None] - ch.x).mul_((1.0 - eps) * rs[:, None])
        if ch.w is not None:
            dt.mul_(ch.w)
        _rows_view(tgrad[a0:a1]).copy_(dt.view(a1 - a0, B, C))
    d = torch.sub(ch.x, ch.lse[:, None], out=gview.view(rows, C) if direct else None).exp_()
    if spec.prob_target:
        a_coef = ch.wt.sum(1)
        if spec.z_loss:
            a_coef = a_coef + 2.0 * spec.z_loss * ch.lse
        d.mul_(a_coef[:, None]).sub_(ch.wt)
    else:
        rs = ch.mask_rows(rs)
        own = (1.0 - eps) * ch.w_t if eps > 0 else ch.w_t
        a_coef = own + eps * ch.wsum / C if eps > 0 else ch.w_t
        if spec.z_loss:
            a_coef = a_coef + 2.0 * spec.z_loss * ch.w_t * ch.lse
        d.mul_(a_coef[:, None])
        d.scatter_add_(1, ch.tsafe[:, None], -own[:, None])
        if eps > 0:
            if ch.w is None:
                d.sub_(eps / C)
            else:
                d.sub_((eps / C) * ch.w)
    if spec.softcap is not None:
        d.mul_(torch.square(ch.x / spec.softcap).neg_().add_(1.0))
    d.mul_(rs[:, None])
    if not direct:
        gview.copy_(d.view(a1 - a0, B, C))


def scale_(g: torch.Tensor, factor: torch.Tensor) -> None:
    """``g *= factor`` in place (skipped when ``factor == 1``; a CPU read, not a device sync)."""
    if g.is_cuda or float(factor.reshape(-1)[0]) != 1.0:
        g.mul_(factor.reshape(-1)[0].to(g.dtype))


def _rows_view(v: torch.Tensor) -> torch.Tensor:
    """``(A', C, B)`` → ``(A', B, C)`` view, to copy row-major chunks into."""
    return v.permute(0, 2, 1)
