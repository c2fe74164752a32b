"""The chunked engine of ``linear_token_logprobs``: logits for a block of rows at a time, never N x V.

Per chunk of ``m`` rows (one ``(m, V)`` buffer, allocated once and reused):

* forward: ``logits = x[rows] @ W.T (+ b)`` into the buffer, then the ``logprobs`` engine of the
  backend writes each row's ``logp``, entropy, max and sum of exponentials;
* backward: the logits again, overwritten in place by the engine with their gradient, then
  ``grad_input[rows] = dlogits @ W``, ``grad_W += dlogits.T @ x[rows]``, ``grad_b += dlogits.sum(0)``.

The chunk size, the weight-gradient accumulation dtype and the accumulation itself are
``linear_cross_entropy``'s (``_linear_ce_chunks``), so both heads behave the same. While tracing
(``torch.compile``, CUDA-graph capture) the loops run inside two functional custom ops
(``triton_losses::linear_logprobs_fwd`` / ``_bwd``) that dynamo keeps opaque, since the loop
writes into a reused buffer and the kernels launch on raw pointers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import _dispatch
from ._linear_ce_chunks import add_weight_grad, chunk_rows, weight_grad_dtype
from ._precision import acc_dtype

__all__ = ["Plan", "backward", "chunk_rows", "forward", "weight_grad_dtype"]

_OP = "linear_token_logprobs"


class Plan(NamedTuple):
    """A call's options: temperature, whether the entropy is wanted, rows per chunk, ``grad_W``'s dtype."""

    temperature: float
    entropy: bool
    chunk: int
    wgrad: torch.dtype


def _logits(xc: Tensor, wt: Tensor, b: Tensor | None, buf: Tensor | None) -> Tensor:
    """``xc @ wt (+ b)``, written into ``buf`` when one is given."""
    if b is None:
        return torch.mm(xc, wt, out=buf)
    return torch.addmm(b, xc, wt, out=buf)


def _forward_loop(x: Tensor, w: Tensor, b: Tensor | None, tokens: Tensor, plan: Plan):
    N = x.shape[0]
    V = w.shape[0]
    acc = acc_dtype(x.dtype)
    eng = _dispatch.engine("logprobs", x, op=_OP)
    logp, row_max, row_sum = (torch.empty(N, dtype=acc, device=x.device) for _ in range(3))
    ent = torch.empty(N if plan.entropy else 0, dtype=acc, device=x.device)
    buf = torch.empty(min(plan.chunk, N), V, dtype=x.dtype, device=x.device) if N else None
    wt = w.t()
    for c0 in range(0, N, plan.chunk):
        c1 = min(N, c0 + plan.chunk)
        logits = _logits(x[c0:c1], wt, b, buf[: c1 - c0])
        lp, en, m, s = eng.logprobs_fwd(logits, tokens[c0:c1], plan.temperature, plan.entropy)
        logp[c0:c1], row_max[c0:c1], row_sum[c0:c1] = lp, m, s
        if plan.entropy:
            ent[c0:c1] = en
    return logp, ent, row_max, row_sum


def _backward_loop(x, w, b, tokens, row_max, row_sum, ent, g_logp, g_ent, need, plan: Plan):
    N, H = x.shape
    V = w.shape[0]
    acc = acc_dtype(x.dtype)
    eng = _dispatch.engine("logprobs", x, op=_OP)
    gi = torch.empty(N, H, dtype=x.dtype, device=x.device) if need[0] else None
    gw = torch.zeros(V, H, dtype=plan.wgrad, device=x.device) if need[1] else None
    gb = torch.zeros(V, dtype=acc, device=x.device) if need[2] else None
    buf = torch.empty(min(plan.chunk, N), V, dtype=x.dtype, device=x.device) if N else None
    wt = w.t()
    for c0 in range(0, N, plan.chunk):
        c1 = min(N, c0 + plan.chunk)
        xc = x[c0:c1]
        logits = _logits(xc, wt, b, buf[: c1 - c0])
        glp = None if g_logp is None else g_logp[c0:c1]
        gen = None if g_ent is None else g_ent[c0:c1]
        eng.logprobs_bwd(logits, tokens[c0:c1], row_max[c0:c1], row_sum[c0:c1], ent[c0:c1], glp, gen,
                         plan.temperature, logits)  # fmt: skip
        if gi is not None:
            torch.mm(logits, w, out=gi[c0:c1])
        if gw is not None:
            add_weight_grad(gw, logits, xc)
        if gb is not None:
            gb += logits.sum(0, dtype=acc)
    buf = logits = None  # free the chunk buffer before the accumulators' casts allocate the results
    if gw is not None and gw.dtype != w.dtype:
        gw = gw.to(w.dtype)
    if gb is not None and gb.dtype != b.dtype:
        gb = gb.to(b.dtype)
    return gi, gw, gb


def forward(x: Tensor, w: Tensor, b: Tensor | None, tokens: Tensor, plan: Plan) -> tuple[Tensor, ...]:
    """Per-row ``(logp, ent, row_max, row_sum)`` of ``linear(x, w, b) / T`` for rows ``x`` ``(N, H)``.

    Each output is ``(N,)`` fp32 (fp64 for fp64); ``ent`` is ``(0,)`` unless ``plan.entropy``.
    """
    if _dispatch.tracing():
        return _fwd_op(x, w, b, tokens, plan.temperature, plan.entropy, plan.chunk)
    return _forward_loop(x, w, b, tokens, plan)


def backward(x, w, b, tokens, row_max, row_sum, ent, g_logp, g_ent, need, plan: Plan):
    """Gradients ``(x (N, H), w (V, H), b (V,))`` of ``sum(g_logp * logp + g_ent * ent)``; None where not ``need``."""
    if _dispatch.tracing():
        outs = _bwd_op(x, w, b, tokens, row_max, row_sum, ent, g_logp, g_ent, list(need),
                       plan.temperature, plan.chunk, plan.wgrad)  # fmt: skip
        return tuple(o if n else None for o, n in zip(outs, need))
    return _backward_loop(x, w, b, tokens, row_max, row_sum, ent, g_logp, g_ent, need, plan)


@torch.library.custom_op("triton_losses::linear_logprobs_fwd", mutates_args=())
def _fwd_op(
    x: Tensor, w: Tensor, b: Tensor | None, tokens: Tensor, temperature: float, entropy: bool, chunk: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`forward`'s chunk loop as one functional op."""
    return _forward_loop(x, w, b, tokens, Plan(temperature, entropy, chunk, w.dtype))


@_fwd_op.register_fake
def _(x, w, b, tokens, temperature, entropy, chunk):
    N = x.shape[0]
    acc = acc_dtype(x.dtype)
    rows = [x.new_empty(N, dtype=acc) for _ in range(3)]
    return rows[0], x.new_empty(N if entropy else 0, dtype=acc), rows[1], rows[2]


@torch.library.custom_op("triton_losses::linear_logprobs_bwd", mutates_args=())
def _bwd_op(
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    tokens: Tensor,
    row_max: Tensor,
    row_sum: Tensor,
    ent: Tensor,
    g_logp: Tensor | None,
    g_ent: Tensor | None,
    need: list[bool],
    temperature: float,
    chunk: int,
    wgrad: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`backward`'s chunk loop as one functional op; gradients not needed come back empty."""
    grads = _backward_loop(x, w, b, tokens, row_max, row_sum, ent, g_logp, g_ent, need,
                           Plan(temperature, bool(ent.numel()), chunk, wgrad))  # fmt: skip
    dtypes = (x.dtype, w.dtype, x.dtype if b is None else b.dtype)
    return tuple(x.new_empty(0, dtype=d) if g is None else g for g, d in zip(grads, dtypes))


@_bwd_op.register_fake
def _(x, w, b, tokens, row_max, row_sum, ent, g_logp, g_ent, need, temperature, chunk, wgrad):
    shapes = (x.shape, w.shape, (w.shape[0],))
    dtypes = (x.dtype, w.dtype, x.dtype if b is None else b.dtype)
    return tuple(x.new_empty(s if n else (0,), dtype=d) for s, d, n in zip(shapes, dtypes, need))
