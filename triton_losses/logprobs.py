"""Per-token log-probabilities and entropy of ``softmax(logits / T)``, for RL policy losses.

``token_logprobs(logits, tokens)`` is ``log_softmax(logits / T, -1).gather(-1, tokens[..., None])``
(and, with ``return_entropy``, the entropy of each row) computed in one pass over each row, never
holding the ``(*, V)`` log-softmax. ``linear_token_logprobs(hidden, W, tokens)`` computes the same
from hidden states a chunk of rows at a time, never holding the ``(N, V)`` logits (see
``_linear_logprobs_chunks``). Both are differentiable w.r.t. every floating input, twice.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _dispatch
from . import _linear_logprobs_chunks as chunks
from ._checks import FLOAT_DTYPES, raise_like_torch
from ._precision import acc_dtype

__all__ = ["LinearTokenLogprobsFunction", "TokenLogprobsFunction", "linear_token_logprobs", "token_logprobs"]

_INDEX_DTYPES = (torch.int64, torch.int32)


def _tokens_in_range(tokens: Tensor, V: int) -> bool:
    """Whether every token is in ``[0, V)``; checked on CPU tensors in eager mode only (no device sync)."""
    if tokens.is_cuda or tokens.numel() == 0 or _dispatch.tracing():
        return True
    return not bool(((tokens < 0) | (tokens >= V)).any())


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return float(temperature)


def _check_tokens(tokens: Tensor, batch: torch.Size, V: int, like: Tensor) -> None:
    """torch's gather errors for a bad dtype, device or value; ValueError for a shape other than ``batch``."""
    probe = like.new_zeros(()).expand(*batch, V)  # a (*, V) view holding one element, for torch's own checks
    if tokens.dtype not in _INDEX_DTYPES or tokens.device != like.device:
        raise_like_torch(torch.gather, probe, -1, tokens.unsqueeze(-1))
    if tokens.shape != batch:
        raise ValueError(
            f"tokens must have shape {tuple(batch)} (the logits' leading dimensions), got {tuple(tokens.shape)}"
        )
    if not _tokens_in_range(tokens, V):
        raise_like_torch(torch.gather, probe, -1, tokens.unsqueeze(-1))


def torch_logprobs(logits: Tensor, tokens: Tensor, temperature: float, entropy: bool) -> tuple[Tensor, Tensor | None]:
    """The formulas in differentiable torch ops, in fp32 (fp64): ``(logp, entropy or None)``, classes last.

    Used for double backward (``create_graph=True``). A term whose probability is 0 adds 0 to the
    entropy (and to its gradient); an out-of-range token gives NaN.
    """
    V = logits.shape[-1]
    logp_all = torch.log_softmax(logits.to(acc_dtype(logits.dtype)) / temperature, -1)
    t = tokens.long()
    inb = (t >= 0) & (t < V)
    idx = torch.where(inb, t, torch.zeros_like(t)).unsqueeze(-1)
    logp = logp_all.gather(-1, idx).squeeze(-1).masked_fill(~inb, float("nan"))
    if not entropy:
        return logp, None
    p = logp_all.exp()
    safe = torch.where(p > 0, logp_all, torch.zeros_like(logp_all))
    return logp, -(p * safe).sum(-1)


class TokenLogprobsFunction(torch.autograd.Function):
    """Autograd wrapper of the per-row log-prob / entropy engine on logits rows ``(R, V)``.

    The forward keeps each row's max and sum of exponentials (and entropy); the backward reads the
    logits once more and writes their gradient for both outputs in one pass. With grad mode on in
    the backward (``create_graph=True``) the gradient is built from differentiable torch ops.
    """

    @staticmethod
    def forward(ctx, x, tokens, temperature: float, entropy: bool, eng):
        logp, ent, row_max, row_sum = eng.logprobs_fwd(x, tokens, temperature, entropy)
        ctx.save_for_backward(x, tokens, row_max, row_sum, ent)
        ctx.temperature, ctx.entropy, ctx.eng = temperature, entropy, eng
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        x, tokens, row_max, row_sum, ent = ctx.saved_tensors
        if not ctx.entropy:
            g_ent = None
        if not ctx.needs_input_grad[0] or (g_logp is None and g_ent is None):
            return None, None, None, None, None
        if torch.is_grad_enabled():
            logp, h = torch_logprobs(x, tokens, ctx.temperature, ctx.entropy)
            outs, grads = zip(*[(o, g) for o, g in ((logp, g_logp), (h, g_ent)) if g is not None])
            (dx,) = torch.autograd.grad(outs, x, grads, create_graph=True)
            return dx, None, None, None, None
        g_logp = None if g_logp is None else g_logp.contiguous()
        g_ent = None if g_ent is None else g_ent.contiguous()
        dx = ctx.eng.logprobs_bwd(x, tokens, row_max, row_sum, ent, g_logp, g_ent, ctx.temperature)
        return dx, None, None, None, None


def token_logprobs(
    logits: Tensor, tokens: Tensor, *, temperature: float = 1.0, return_entropy: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probability of each token under ``softmax(logits / temperature)``, and the entropy.

    Equals ``torch.log_softmax(logits.float() / T, -1).gather(-1, tokens[..., None])[..., 0]`` and
    ``-(p * log p).sum(-1)`` with ``p = softmax(logits.float() / T, -1)`` (a term with ``p = 0`` adds 0),
    computed in one pass over each row without an ``(*, V)`` intermediate. Both outputs are
    differentiable w.r.t. ``logits`` (twice, with ``create_graph=True``).

    Args:
        logits: ``(*, V)``, floating dtype, any strides.
        tokens: ``(*)`` int64 or int32 indices in ``[0, V)``. On CPU tensors an out-of-range token
            raises torch's ``gather`` error; on CUDA it is a device-side assert (with
            ``TRITON_DEBUG=1``) and a NaN result, never an out-of-bounds read.
        temperature: ``T > 0``.
        return_entropy: also return the entropy of each row.

    Returns:
        ``logp`` of shape ``(*)`` in fp32 (fp64 for fp64 logits), or ``(logp, entropy)``.
    """
    temperature = _check_temperature(temperature)
    if logits.dtype not in FLOAT_DTYPES:
        raise_like_torch(torch.log_softmax, logits, -1)
    if logits.dim() == 0:
        raise ValueError("token_logprobs: logits must have shape (*, V) with at least one dimension, got a 0-d tensor")
    V = logits.shape[-1]
    _check_tokens(tokens, logits.shape[:-1], V, logits)
    eng = _dispatch.engine("logprobs", logits, tokens, op="token_logprobs")
    x = logits.reshape(-1, V)
    logp, ent = TokenLogprobsFunction.apply(x, tokens.reshape(-1), temperature, bool(return_entropy), eng)
    logp = logp.view(tokens.shape)
    return (logp, ent.view(tokens.shape)) if return_entropy else logp


class LinearTokenLogprobsFunction(torch.autograd.Function):
    """Autograd wrapper of the chunked engine on hidden rows ``x`` ``(N, H)`` and a head ``w`` ``(V, H)``.

    The forward keeps each row's max, sum of exponentials and entropy; the backward recomputes each
    chunk's logits, turns them into their gradient in place, and accumulates the three matmul
    gradients. With grad mode on in the backward it differentiates the torch formulas instead.
    """

    @staticmethod
    def forward(ctx, x, w, b, tokens, temperature: float, entropy: bool, chunk: int, wgrad):
        plan = chunks.Plan(temperature, entropy, chunk, wgrad)
        logp, ent, row_max, row_sum = chunks.forward(x, w, b, tokens, plan)
        ctx.save_for_backward(x, w, b, tokens, row_max, row_sum, ent)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        x, w, b, tokens, row_max, row_sum, ent = ctx.saved_tensors
        plan = ctx.plan
        if not plan.entropy:
            g_ent = None
        need = tuple(ctx.needs_input_grad[:3])
        nones = (None,) * 5
        if not any(need) or (g_logp is None and g_ent is None):
            return (None, None, None, *nones)
        if torch.is_grad_enabled():
            logp, h = torch_logprobs(F.linear(x, w, b), tokens, plan.temperature, plan.entropy)
            outs, grads = zip(*[(o, g) for o, g in ((logp, g_logp), (h, g_ent)) if g is not None])
            wanted = [v for v, n in zip((x, w, b), need) if n]
            got = iter(torch.autograd.grad(outs, wanted, grads, create_graph=True))
            return (*(next(got) if n else None for n in need), *nones)
        g_logp = None if g_logp is None else g_logp.contiguous()
        g_ent = None if g_ent is None else g_ent.contiguous()
        grads = chunks.backward(x, w, b, tokens, row_max, row_sum, ent, g_logp, g_ent, need, plan)
        return (*grads, *nones)


def _linear_checks(input: Tensor, w: Tensor, b: Tensor | None) -> None:
    """torch's own errors for operands ``F.linear`` would refuse; ValueError for what it would accept."""
    ok = (
        input.dtype in FLOAT_DTYPES
        and input.dim() >= 1
        and w.dim() == 2
        and w.shape[1] == input.shape[-1]
        and w.dtype == input.dtype
        and w.device == input.device
        and (b is None or (b.shape == (w.shape[0],) and b.dtype == input.dtype and b.device == input.device))
    )
    if not ok:
        raise_like_torch(F.linear, input, w, b)


def linear_token_logprobs(
    input: Tensor,
    linear_weight: Tensor,
    tokens: Tensor,
    *,
    linear_bias: Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    fp32_weight_grad: bool | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`token_logprobs` of ``linear(input, linear_weight, linear_bias)``, never holding the logits.

    The ``(N, V)`` logits exist one ``(chunk, V)`` buffer at a time (as in ``linear_cross_entropy``):
    per chunk one matmul, then the log-prob / entropy engine on the buffer; the backward recomputes
    each chunk's logits and overwrites them with their gradient before the two matmuls of the
    input and weight gradients. Differentiable w.r.t. ``input``, ``linear_weight`` and ``linear_bias``.

    Args:
        input: hidden states ``(*, H)``, floating dtype.
        linear_weight: ``(V, H)``, ``input``'s dtype.
        tokens: ``(*)`` int64 or int32 indices in ``[0, V)`` (errors as in :func:`token_logprobs`).
        linear_bias: ``(V,)`` or None.
        temperature: ``T > 0``; the logits are divided by it.
        return_entropy: also return the entropy of each row.
        chunk_size: rows per chunk; None picks it from the logits-buffer budget
            (``_linear_ce_chunks.chunk_rows``, shared with ``linear_cross_entropy``).
        fp32_weight_grad: how a 16-bit weight's gradient is accumulated over the chunks, as in
            :func:`triton_losses.linear_cross_entropy`.

    Returns:
        ``logp`` of shape ``(*)`` in fp32 (fp64 for fp64 input), or ``(logp, entropy)``.
    """
    temperature = _check_temperature(temperature)
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if fp32_weight_grad not in (None, True, False):
        raise ValueError(f"fp32_weight_grad must be True, False or None, got {fp32_weight_grad!r}")
    _linear_checks(input, linear_weight, linear_bias)
    V, H = linear_weight.shape
    batch = input.shape[:-1]
    _check_tokens(tokens, batch, V, input)
    x = input.reshape(-1, H)
    chunk = chunks.chunk_rows(x.shape[0], V, input.element_size(), input.device, chunk_size)
    wgrad = chunks.weight_grad_dtype(linear_weight, fp32_weight_grad)
    logp, ent = LinearTokenLogprobsFunction.apply(
        x, linear_weight, linear_bias, tokens.reshape(-1), temperature, bool(return_entropy), chunk, wgrad
    )
    logp = logp.view(batch)
    return (logp, ent.view(batch)) if return_entropy else logp
