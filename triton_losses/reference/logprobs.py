"""Token log-probabilities and entropy in plain PyTorch with the kernels' interface: the CPU fallback.

The same formulas as ``kernels.logprobs``, in fp32 (fp64 for fp64 logits), over chunks of rows so
that only a chunk's two fp32 temporaries exist at a time (never an ``(R, V)`` fp32 log-softmax):
per row the max ``m`` of ``z = x / T``, ``S = sum exp(z - m)``, ``logp = (z_tok - m) - log S`` and
``entropy = log S - sum exp(z - m) * (z - m) / S`` (a term whose probability is 0 adds 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._precision import acc_dtype
from ._chunks import row_chunks

# Elements of a chunk of rows (fp32: 512 KiB per temporary). Measured forward+backward, one torch
# thread, T = 0.8, median ms logp-only / with entropy, on the shared 2-core machine under load
# (~9, so +-20% noise): 1024x4096: 2^15 60/74, 2^17 39/48, 2^19 43/54, 2^21 40/56;
# 256x32000: 2^15 113/185, 2^17 89/110, 2^19 71/102, 2^21 94/129. 2^15 pays per-op overhead;
# from 2^17 on the differences are within the noise, and 2^17 keeps the temporaries in L2.
CHUNK_ELEMS = 1 << 17


def _shifted(x: Tensor, row_max: Tensor, temperature: float) -> Tensor:
    """``x / T - row_max`` in ``row_max``'s dtype, one pass: a new tensor the caller may modify."""
    return torch.add(row_max.neg().unsqueeze(1), x, alpha=1.0 / temperature)


def _tokens(tokens: Tensor, V: int) -> tuple[Tensor, Tensor]:
    """``(clamped (R, 1) int64 index, in-range mask (R,))``: an out-of-range token reads column 0."""
    t = tokens.long()
    inb = (t >= 0) & (t < V)
    return torch.where(inb, t, torch.zeros_like(t)).unsqueeze(1), inb


def logprobs_fwd(x: Tensor, tokens: Tensor, temperature: float, entropy: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row ``log softmax(x / T)[token]`` and (if ``entropy``) entropy of rows ``x`` ``(R, V)``.

    Returns:
        ``(logp, ent, row_max, row_sum)``, ``(R,)`` each in fp32 (fp64 for fp64), ``ent`` ``(0,)`` unless
        ``entropy``. An out-of-range token gives a NaN ``logp``.
    """
    R, V = x.shape
    acc = acc_dtype(x.dtype)
    logp, row_max, row_sum = (torch.empty(R, dtype=acc, device=x.device) for _ in range(3))
    ent = torch.empty(R if entropy else 0, dtype=acc, device=x.device)
    idx, inb = _tokens(tokens, V)
    for a0, a1 in row_chunks(R, V, CHUNK_ELEMS):
        xc = x[a0:a1]
        if V:  # max(x / T) = max(x) / T: the scaled maximum element, rounded once
            row_max[a0:a1] = xc.amax(1).to(acc).div_(temperature)
        else:
            row_max[a0:a1] = float("-inf")
        lz = _shifted(xc, row_max[a0:a1], temperature)
        e = torch.exp(lz)
        s = torch.sum(e, 1, out=row_sum[a0:a1])
        log_s = s.log()
        z_t = lz.gather(1, idx[a0:a1])[:, 0] if V else torch.zeros(a1 - a0, dtype=acc, device=x.device)
        torch.sub(z_t, log_s, out=logp[a0:a1])
        if entropy:
            lz.clamp_(min=torch.finfo(acc).min)  # exp(-inf) * -inf would be NaN; the term is 0
            ent[a0:a1] = log_s - e.mul_(lz).sum(1) / s
    # Out of place: under torch.compile, torch 2.11's dynamo gives an autograd.Function output made
    # by an in-place op on the returned tensor itself (which returns that tensor) a zero upstream
    # gradient, as with a no-op ``.to()`` (see ``_reduce.cast``); torch 2.13 is not affected.
    logp = logp.masked_fill(~inb, float("nan"))
    return logp, ent, row_max, row_sum


def logprobs_bwd(
    x: Tensor,
    tokens: Tensor,
    row_max: Tensor,
    row_sum: Tensor,
    ent: Tensor,
    g_logp: Tensor | None,
    g_ent: Tensor | None,
    temperature: float,
    grad: Tensor | None = None,
) -> Tensor:
    """The gradient w.r.t. ``x`` ``(R, V)`` of ``sum(g_logp * logp + g_ent * ent)``, chunk by chunk.

    ``grad`` (``(R, V)``, may be ``x`` itself) receives it, or a new tensor in ``x``'s dtype does.
    """
    R, V = x.shape
    acc = acc_dtype(x.dtype)
    if grad is None:
        grad = torch.empty((R, V), dtype=x.dtype, device=x.device)
    idx, inb = _tokens(tokens, V)
    # Per row: d = (g_logp * onehot - p * (g_logp + g_ent * (log p + H))) / T, NaN for a bad token;
    # p * (...) = q * (a + g_ent * (x / T - max)) with q = exp(x / T - max) and a = g_logp + g_ent * (H - log S).
    scale = torch.full((R,), -1.0 / temperature, dtype=acc, device=x.device).masked_fill_(~inb, float("nan"))
    scale.div_(row_sum.to(acc))
    for a0, a1 in row_chunks(R, V, CHUNK_ELEMS):
        lz = _shifted(x[a0:a1], row_max[a0:a1].to(acc), temperature)
        dst = grad[a0:a1] if grad.dtype == acc else None
        q = torch.exp(lz, out=dst)
        q.mul_(scale[a0:a1, None])
        if g_ent is not None:
            gent = g_ent[a0:a1, None].to(acc)
            a = (ent[a0:a1, None].to(acc) - row_sum[a0:a1, None].to(acc).log()).mul_(gent)
            if g_logp is not None:
                a.add_(g_logp[a0:a1, None].to(acc))
            lz.clamp_(min=-1e4)  # q is 0 there; keeps g_ent * lz finite so that 0 * it stays 0
            q.mul_(torch.addcmul(a, lz, gent, out=lz))
        elif g_logp is not None:
            q.mul_(g_logp[a0:a1, None].to(acc))
        if g_logp is not None:
            q.scatter_add_(1, idx[a0:a1], (g_logp[a0:a1] / temperature).to(acc)[:, None])
        if dst is None:
            grad[a0:a1].copy_(q)
    return grad
