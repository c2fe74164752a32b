"""Pure-PyTorch cross-entropy / NLL with the kernels' interface: the CPU fallback.

It computes what ``kernels.cross_entropy`` computes, with the same formulas, in fp32 (fp64 for
fp64 input), over chunks of rows so that no full-size fp32 intermediate is ever held: the forward
keeps only per-row ``loss`` and statistics (and, given ``grad``, writes the gradient of each chunk
right after its loss, as the fused kernel does); the backward recomputes the softmax chunk by chunk.
Gradients are computed with in-place ops straight into the output where the layout allows (fp32 /
fp64 rows), so a chunk costs no temporaries; ``grad`` may be the logits themselves.

Per-row statistics ``stats`` ``(R, 2)``: column 0 the row maximum ``m`` of the (softcapped)
logits, column 1 ``sum(exp(x - m))``. They are kept apart, never rounded into one log-sum-exp:
the softmax is ``exp(x - m) / sum`` and the loss ``(m - x_t) + log(sum)``, so fp32 accuracy does
not fall with the logits' magnitude (at 300 * randn logits a log-sum-exp rounded to fp32 put a
relative error of 2e-5 on every probability).
"""

from __future__ import annotations

import torch

from .._precision import acc_dtype
from .._reduce import cast, target_weight_sum
from ..options import CESpec, host_slice

FUSES_GRAD = True  # ce_fwd(..., grad=buffer) writes the gradient of the reduced loss

# Columns of ``ce_partial``'s per-row sums of a vocabulary slice (see there).
PARTIAL_COLUMNS = 8

# Rows per chunk are chosen so a chunk holds about this many fp32 elements (4 MiB).
CHUNK_ELEMS = 1 << 20


def _chunks(A: int, C: int, B: int):
    step = max(1, CHUNK_ELEMS // max(1, C * B))
    for a0 in range(0, A, step):
        yield a0, min(A, a0 + step)


def _rows(v: torch.Tensor) -> torch.Tensor:
    """``(A', C, B)`` → ``(A' * B, C)`` (a view when B == 1)."""
    return v.permute(0, 2, 1).reshape(v.shape[0] * v.shape[2], v.shape[1])


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else cap * torch.tanh(x / cap)


def row_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, sum(exp(x - m)))`` of rows ``x`` ``(R, C)``, each ``(R,)``.

    torch's log_softmax semantics: ``+inf`` or NaN in a row gives a NaN sum; an all ``-inf`` row
    gives ``m = -inf`` and sum 0 (its loss is NaN, as torch's).
    """
    m = x.amax(1) if x.shape[1] else torch.full(x.shape[:1], float("-inf"), dtype=x.dtype, device=x.device)
    return m, torch.sub(x, shift_of(m)[:, None]).exp_().sum(1)


class _Chunk:
    """The per-row quantities of one chunk of rows, shared by the forward and the backward.

    With ``spec.num_classes`` the logits are the classes ``[class_offset, class_offset + C)`` of
    ``num_classes``: ``self.C`` is the global count, ``self.w`` the local slice of the weights,
    ``w_t`` the weight of the global target and ``hit`` marks targets inside the local slice.
    """

    def __init__(self, x, t, spec: CESpec, a0: int, a1: int, stats=None):
        _, C, B = x.shape
        acc = acc_dtype(x.dtype)
        off, self.C = spec.class_offset, spec.num_classes or C
        self.x = softcap(_rows(x[a0:a1]).to(acc), spec.softcap)
        w_all = None if spec.weight is None else spec.weight.to(acc)
        self.w = None if w_all is None else w_all[off : off + C]
        self.wsum = float(self.C) if spec.weight is None else spec.weight_sum  # given when smoothing needs it
        if spec.prob_target:
            tp = _rows(t[a0:a1]).to(acc)
            if spec.smoothing > 0:
                tp = tp * (1.0 - spec.smoothing) + spec.smoothing / self.C
            self.tp = tp
            self.wt = tp if self.w is None else tp * self.w
        else:
            self.tgt, self.ignored, self.inb, self.tsafe = _targets(t[a0:a1], spec, self.C)
            ones = torch.ones(self.tgt.shape, dtype=acc, device=x.device)
            self.w_t = ones if w_all is None else w_all[self.tsafe]
            tloc = self.tsafe - off
            self.hit = (tloc >= 0) & (tloc < C)
            self.tloc = torch.where(self.hit, tloc, torch.zeros_like(tloc))
        self.S1 = None
        if stats is not None:
            st = stats[a0 * B : a1 * B].to(acc)
            self.m, self.s = st[:, 0], st[:, 1]
            if spec.num_classes and spec.prob_target:
                self.S1 = st[:, 2]  # the global smoothed sum_c w_c t_c
        else:
            self.m, self.s = row_stats(self.x)
        self.logs = torch.log(self.s)
        self.lse = self.m + self.logs

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


def ce_norm(x: torch.Tensor, t: torch.Tensor, spec: CESpec, mean: bool) -> torch.Tensor:
    """``(3,)`` fp32 (fp64) ``[sum of the class weights, 'mean' denominator, gradient coefficient]``.

    Args:
        x: logits ``(A, C, B)`` (only their shape, dtype and device are read).
        t: index targets ``(A, B)`` or probability targets ``(A, C, B)``.
        spec: the options; ``spec.weight_sum`` is not read.
        mean: the coefficient is ``1 / denominator`` when True, else 1.

    The class-weight sum is ``C`` without weights; the denominator is the summed class weights
    of the non-ignored index targets (their count without weights), or the row count for
    probability targets.
    """
    A, C, B = x.shape
    acc = acc_dtype(x.dtype)
    w = spec.weight
    wsum = w.sum(dtype=acc).reshape(1) if w is not None else torch.full((1,), float(C), dtype=acc, device=x.device)
    if spec.prob_target:
        denom = torch.full((1,), float(A * B), dtype=acc, device=x.device)
    else:
        denom = target_weight_sum(t, w, spec.ignore_index, C, acc)
    coef = 1.0 / denom if mean else torch.ones_like(denom)
    return torch.cat([wsum, denom, coef])


def ce_finish(loss: torch.Tensor, norm: torch.Tensor, spec: CESpec, reduction: str, out_dtype) -> torch.Tensor:
    """The reduced loss in ``out_dtype`` from per-row losses ``(R,)`` and :func:`ce_norm`'s ``norm``.

    'mean' divides by ``norm[1]``; with label smoothing a zero denominator gives NaN, as torch's
    ``(1 - eps) * nll_sum / 0 + eps / C * smooth_sum / 0`` does (its first term is ``0 / 0``).
    """
    if reduction == "none":
        return cast(loss, out_dtype)
    total = loss.sum()
    if reduction == "mean":
        denom = norm[1]
        total = total / denom
        if spec.smoothing > 0:
            total = torch.where(denom == 0, torch.full_like(total, float("nan")), total)
    return cast(total, out_dtype)


def ce_fwd(x: torch.Tensor, t: torch.Tensor, spec: CESpec, coef: torch.Tensor | None, grad=None):
    """Per-row loss ``(A * B,)`` and statistics ``(A * B, 2)`` (fp32; fp64 for fp64) of logits ``x`` ``(A, C, B)``.

    With ``grad`` (``(A, C, B)``, possibly ``x`` itself), also writes ``coef * dloss/dx`` into it
    (``coef`` ``(1,)``; None means 1).
    """
    A, C, B = x.shape
    assert grad is None or not spec.logp_input
    acc = acc_dtype(x.dtype)
    if spec.logp_input:  # NLL: one gathered element per row, no pass over the rows
        _, ignored, inb, tsafe = _targets(t, spec, C)
        x_t = x.gather(1, tsafe.view(A, 1, B)).reshape(-1).to(acc) if C else torch.zeros(A * B, dtype=acc)
        w_t = 1.0 if spec.weight is None else spec.weight.to(acc)[tsafe]
        return _mask_rows(-w_t * x_t, ignored, inb), torch.zeros(A * B, 2, dtype=acc, device=x.device)
    loss = torch.empty(A * B, dtype=acc, device=x.device)
    stats = torch.empty(A * B, 2, dtype=acc, device=x.device)
    for a0, a1 in _chunks(A, C, B):
        ch = _Chunk(x, t, spec, a0, a1)
        loss[a0 * B : a1 * B] = _chunk_loss(ch, spec)
        stats[a0 * B : a1 * B, 0] = ch.m
        stats[a0 * B : a1 * B, 1] = ch.s
        if grad is not None:
            rs = torch.ones(1, dtype=acc, device=x.device) if coef is None else coef.to(acc)
            _grad_chunk(ch, spec, a0, a1, rs.expand(ch.x.shape[0]), grad, None)
    return loss, stats


def shift_of(m: torch.Tensor) -> torch.Tensor:
    """The rows' max ``m``, 0 where it is ``-inf``: what their exponents and weighted sums are taken from."""
    return m.masked_fill(m == float("-inf"), 0.0)


def weighted_sum_from(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """``sum_c w_c (x_c - r)`` per row (``w``: ``(C,)``, ``(R, C)`` or None for ones).

    The sums of ``w x`` that the smoothing and probability-target losses need are taken relative to
    the row's max (``r = shift_of(m)``), never from 0: ``m * S1 - sum w x`` cancels two terms of the
    logits' magnitude, and at 30 + 2 randn logits that cost 4x torch's fp32 error (30x at 300).
    """
    xr = x - r[:, None]
    if w is None:
        return xr.sum(1)
    if w.dim() == 1:
        with torch.autocast(x.device.type, enabled=False):  # an autocast region would run it in 16 bits
            return xr @ w
    return (w * xr).sum(1)


def _chunk_loss(ch: _Chunk, spec: CESpec) -> torch.Tensor:
    """Per-row loss of one chunk: ``w_t * ((m - x_t) + log(sum))`` plus the smoothing and z terms.

    The smoothing and probability-target sums are relative to ``r = shift_of(m)``:
    ``sum w (m - x) = W (m - r) - sum w (x - r)``, with ``m - r`` 0 (``-inf`` for an all ``-inf`` row).
    """
    C, eps = ch.C, spec.smoothing
    if spec.prob_target:
        r = shift_of(ch.m)
        S1 = ch.wt.sum(1)
        out = ((ch.m - r) * S1 - weighted_sum_from(ch.x, r, ch.wt)) + ch.logs * S1
        if spec.z_loss:
            out = out + spec.z_loss * ch.lse * ch.lse
        return out
    x_t = ch.x.gather(1, ch.tloc[:, None])[:, 0]
    out = ch.w_t * ((ch.m - x_t) + ch.logs)
    if eps > 0:
        r = shift_of(ch.m)
        wx = weighted_sum_from(ch.x, r, ch.w)
        out = (1.0 - eps) * out + eps / C * ((ch.wsum * (ch.m - r) - wx) + ch.wsum * ch.logs)
    if spec.z_loss:
        out = out + spec.z_loss * ch.w_t * ch.lse * ch.lse
    return ch.mask_rows(out)


def ce_bwd(x, t, spec: CESpec, stats, gout, coef, grad=None, tgrad=None):
    """``d(sum_r gout_r * coef * loss_r)/dx`` into ``grad`` (and ``/dt`` into ``tgrad``); returns both.

    Args:
        x: logits ``(A, C, B)``; t: targets ``(A, B)`` or ``(A, C, B)``; spec: the options.
        stats: the forward's ``(A * B, 2)`` statistics.
        gout: upstream gradient ``(A * B,)`` or one value for every row.
        coef: ``(1,)`` extra scale, or None for 1.
        grad: ``(A, C, B)`` buffer to write (may be ``x`` itself: each chunk is read before it is
            written), or None to allocate one.
        tgrad: ``(A, C, B)`` buffer for the probability-target gradient, or None to skip it.
    """
    spec = host_slice(spec)
    A, C, B = x.shape
    acc = acc_dtype(x.dtype)
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device) if grad is None else grad
    scale = gout.to(acc).reshape(-1)
    if coef is not None:
        scale = scale * coef.to(acc)
    if spec.logp_input:  # NLL: zeros with one value per row
        if C:
            _, ignored, inb, tsafe = _targets(t, spec, C)
            own = 1.0 if spec.weight is None else spec.weight.to(acc)[tsafe]
            vals = _mask_rows(-own * scale.expand(A * B), ignored, inb)
            grad.zero_().scatter_(1, tsafe.view(A, 1, B), vals.view(A, 1, B).to(grad.dtype))
        return grad, tgrad
    if C == 0:  # an empty slice of the classes (vocabulary parallel): nothing to write
        return grad, tgrad
    for a0, a1 in _chunks(A, C, B):
        ch = _Chunk(x, t, spec, a0, a1, stats=stats)
        rs = scale if scale.numel() == 1 else scale[a0 * B : a1 * B]
        _grad_chunk(ch, spec, a0, a1, rs.expand(ch.x.shape[0]), grad, tgrad)
    return grad, tgrad


def _grad_chunk(ch: _Chunk, spec: CESpec, a0: int, a1: int, rs, grad, tgrad) -> None:
    """Write ``rs * dloss/dx`` of one chunk of rows into ``grad[a0:a1]`` (and ``dloss/dt`` into ``tgrad``).

    Index targets: ``d = p * (own * rs + (eps * wsum / C + 2 z w_t lse) * rs) - own * rs * onehot
    - (eps / C) * w * rs``, with ``p = exp(x - m) / sum``: a NaN ``own * rs`` (a zero class weight
    times the infinite 'mean' coefficient of an all-zero denominator) makes the whole row NaN, as
    torch's log_softmax backward of its NaN ``nll`` gradient does.
    """
    rows, C = ch.x.shape[0], ch.C  # C: the global class count
    B = grad.shape[2]
    eps = spec.smoothing
    gview = _rows_view(grad[a0:a1])
    # Compute straight into the gradient when its rows are the chunk's rows in the compute dtype;
    # if ``grad`` is the logits, ``ch.x`` is that same memory and is not read after this point.
    direct = B == 1 and grad.dtype == ch.x.dtype
    if spec.prob_target and tgrad is not None:
        dt = torch.sub(ch.m[:, None], ch.x).add_(ch.logs[:, None]).mul_((1.0 - eps) * rs[:, None])  # -log p
        if ch.w is not None:
            dt.mul_(ch.w)
        _rows_view(tgrad[a0:a1]).copy_(dt.view(a1 - a0, B, ch.x.shape[1]))
    d = torch.sub(ch.x, ch.m[:, None], out=gview.view(rows, ch.x.shape[1]) if direct else None).exp_()
    inv_sum = 1.0 / ch.s
    if spec.prob_target:
        a_coef = ch.wt.sum(1) if ch.S1 is None else ch.S1
        if spec.z_loss:
            a_coef = a_coef + 2.0 * spec.z_loss * ch.lse
        d.mul_((a_coef * inv_sum)[:, None]).sub_(ch.wt)
        if spec.softcap is not None:
            d.mul_(torch.square(ch.x / spec.softcap).neg_().add_(1.0))
        d.mul_(rs[:, None])
    else:
        rs = ch.mask_rows(rs)
        own = (1.0 - eps) * ch.w_t if eps > 0 else ch.w_t
        own_rs = own * rs
        a_rs = own_rs
        if eps > 0:
            a_rs = a_rs + (eps * ch.wsum / C) * rs
        if spec.z_loss:
            a_rs = a_rs + (2.0 * spec.z_loss) * ch.w_t * ch.lse * rs
        d.mul_((a_rs * inv_sum)[:, None])
        own_hit = -own_rs if spec.num_classes == 0 else torch.where(ch.hit, -own_rs, torch.zeros_like(own_rs))
        d.scatter_add_(1, ch.tloc[:, None], own_hit[:, None])
        if eps > 0:
            if ch.w is None:
                d.sub_((eps / C) * rs[:, None])
            else:
                d.sub_((eps / C) * rs[:, None] * ch.w)
        if spec.softcap is not None:
            d.mul_(torch.square(ch.x / spec.softcap).neg_().add_(1.0))
    if not direct:
        gview.copy_(d.view(a1 - a0, B, ch.x.shape[1]))


def ce_partial(x: torch.Tensor, t: torch.Tensor, spec: CESpec) -> torch.Tensor:
    """This slice's per-row partial sums ``(A * B, 8)`` (fp32; fp64 for fp64) for vocabulary-parallel CE.

    Args:
        x: logits ``(A, C, B)``: the classes ``[spec.class_offset, spec.class_offset + C)`` of
            ``spec.num_classes``.
        t: global index targets ``(A, B)``, or this slice's probability targets ``(A, C, B)``.
        spec: the options; ``weight`` is the global ``(C,)`` tensor.

    Returns:
        Columns: 0 the local max ``m`` of the (softcapped) logits, 1 ``sum(exp(x - m))``, 2 the
        target logit (0 when the target is outside the slice), 3 ``sum_c w_c (x_c - r)`` (with
        smoothing, else 0), 4 ``sum_c w_c t_c`` and 5 ``sum_c w_c t_c (x_c - r)`` (probability
        targets, else 0; raw, unsmoothed probabilities), 6 ``r = shift_of(m)`` (the local max, 0
        where it is ``-inf``), 7 ``sum_c w_c`` over the slice (with smoothing, else 0). Rebased on
        the global max ``g`` as ``col + (r - g) * weight mass`` before they are summed over the
        ranks, the sums never cancel terms of the logits' magnitude (``weighted_sum_from``).
    """
    spec = host_slice(spec)
    A, C, B = x.shape
    acc = acc_dtype(x.dtype)
    out = torch.zeros(A * B, PARTIAL_COLUMNS, dtype=acc, device=x.device)
    plain = spec._replace(smoothing=0.0)
    for a0, a1 in _chunks(A, C, B):
        ch = _Chunk(x, t, plain, a0, a1)
        o = out[a0 * B : a1 * B]
        o[:, 0], o[:, 1] = ch.m, ch.s
        r = shift_of(ch.m)
        o[:, 6] = r
        if spec.smoothing > 0:
            o[:, 3] = weighted_sum_from(ch.x, r, ch.w)
            o[:, 7] = float(C) if ch.w is None else ch.w.sum()
        if spec.prob_target:
            o[:, 4] = ch.wt.sum(1)
            o[:, 5] = weighted_sum_from(ch.x, r, ch.wt)
        elif C:
            o[:, 2] = torch.where(ch.hit, ch.x.gather(1, ch.tloc[:, None])[:, 0], 0.0)
    return out


def scale_(g: torch.Tensor, factor: torch.Tensor) -> None:
    """``g *= factor`` in place (skipped when ``factor == 1``: a CPU read, not a device sync; never
    skipped for CUDA tensors or while tracing, where reading the value would sync or break the graph)."""
    if g.is_cuda or torch.compiler.is_compiling() or float(factor.reshape(-1)[0]) != 1.0:
        g.mul_(factor.reshape(-1)[0].to(g.dtype))


def _rows_view(v: torch.Tensor) -> torch.Tensor:
    """``(A', C, B)`` → ``(A', B, C)`` view, to copy row-major chunks into."""
    return v.permute(0, 2, 1)
