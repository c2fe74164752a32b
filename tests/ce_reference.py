"""fp64 oracles for the cross-entropy family, composed from ``torch.nn.functional``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ref_cross_entropy(
    x, t, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None
):
    """``F.cross_entropy`` in fp64 on softcapped logits, plus the z-loss as our docstring defines it."""
    x = x.double()
    w = None if weight is None else weight.double()
    prob = t.shape == x.shape
    if prob:
        t = t.double()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    kw = {} if prob else {"ignore_index": ignore_index}
    loss = F.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=label_smoothing, **kw)
    if not z_loss:
        return loss
    cdim = 1 if x.dim() >= 2 else 0
    lse2 = torch.logsumexp(x, cdim) ** 2
    if prob:
        per = z_loss * lse2
        denom = torch.tensor(float(per.numel()), dtype=torch.float64)
    else:
        valid = t != ignore_index
        wt = torch.ones_like(lse2) if w is None else w[t.clamp(0, x.shape[cdim] - 1)]
        wt = torch.where(valid, wt, torch.zeros_like(wt))
        per = z_loss * wt * lse2
        denom = wt.sum()
    if reduction == "none":
        return loss + per
    if reduction == "sum":
        return loss + per.sum()
    return loss + per.sum() / denom
