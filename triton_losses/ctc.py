"""``ctc_loss`` and ``nn.CTCLoss``: validation, the autograd Function, and the reduction.

Semantics are torch's (``torch.nn.functional.ctc_loss``, its CPU kernel's gradient included): see
``kernels/ctc.py`` for the gradient formula. Lengths are read on the host in eager mode, as torch
reads them (it copies length tensors to the CPU): to give torch's errors for bad lengths and to size
the state vector by the longest target. Under ``torch.compile`` / CUDA-graph capture nothing is read:
the state vector is sized by the targets' shape and the kernels clamp every length and target.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch import nn as _nn

from . import _dispatch
from ._checks import FLOAT_DTYPES, TorchAccepted, autocast_fp32, plain, raise_like_torch, reduction_string
from ._precision import acc_dtype
from ._reduce import cast

__all__ = ["CTCLoss", "CTCLossFunction", "ctc_loss"]


class CTCLossFunction(torch.autograd.Function):
    """Autograd wrapper of one CTC call on ``(T, N, C)`` log-probabilities.

    Returns the reduced loss (0-d) for 'mean' / 'sum', the ``(N,)`` losses for 'none'. For 'mean' /
    'sum' with a gradient needed the engine computes the gradient in the forward (when it can), and
    the backward only scales it by the upstream gradient (a device-side no-op when that is 1).
    """

    @staticmethod
    def forward(ctx, lp, targets, off, il, tl_, blank, max_len, zero_infinity, reduction, out_dtype, eng):
        N = lp.shape[1]
        gscale = _gscale(tl_, N, reduction, acc_dtype(lp.dtype))
        # (a traced graph keeps no gradient on ctx between its forward and backward: never fused there)
        fuse = eng.FUSES_GRAD and gscale is not None and ctx.needs_input_grad[0] and not _dispatch.compiling()
        nll, alpha, grad = eng.ctc_fwd(lp, targets, off, il, tl_, blank, max_len, zero_infinity, gscale, fuse)
        ctx.save_for_backward(lp, targets, off, il, tl_, nll, None if fuse else alpha, gscale)
        ctx.grad, ctx.eng = grad, eng
        ctx.options = (blank, max_len, zero_infinity)
        return _reduce(nll, tl_, reduction, zero_infinity, out_dtype)

    @staticmethod
    def backward(ctx, gout):
        lp, targets, off, il, tl_, nll, alpha, gscale = ctx.saved_tensors
        blank, max_len, zero_infinity = ctx.options
        nones = (None,) * 10
        if not ctx.needs_input_grad[0]:
            return (None, *nones)
        acc = acc_dtype(lp.dtype)
        gs = gout.reshape(-1).to(acc) if gscale is None else gscale * gout.reshape(()).to(acc)
        if torch.is_grad_enabled():
            grad = _grad_from_torch_ops(lp, targets, off, il, tl_, blank, max_len, zero_infinity, nll, gs)
            return (grad, *nones)
        eng = ctx.eng
        if ctx.grad is not None:
            grad, ctx.grad = ctx.grad, None
            eng.scale_(grad, gout.reshape(1))
            return (grad, *nones)
        if alpha is None:  # a second backward of a fused call: recompute the forward variables
            _, alpha, _ = eng.ctc_fwd(lp, targets, off, il, tl_, blank, max_len, zero_infinity, None, False)
        grad = eng.ctc_bwd(lp, targets, off, il, tl_, blank, max_len, zero_infinity, nll, alpha, gs.contiguous())
        return (grad, *nones)


def _grad_from_torch_ops(lp, targets, off, il, tl_, blank, max_len, zero_infinity, nll, gs) -> Tensor:
    """torch's gradient ``exp(lp) * g + d(nll)/d(lp) * g`` from differentiable ops (double backward)."""
    ref = _dispatch.reference("ctc")
    with torch.enable_grad():
        x = lp if lp.requires_grad else lp.detach().requires_grad_()
        loss = ref.ctc_nll_differentiable(x, targets, off, il, tl_, blank, max_len)
        (d,) = torch.autograd.grad(loss, x, gs.to(loss.dtype), create_graph=True)
    T = lp.shape[0]
    keep = torch.arange(T, device=lp.device)[:, None] < il.clamp(0, T)[None, :]
    if zero_infinity:
        keep = keep & (nll != float("inf"))[None, :]
    g = lp.to(d.dtype).exp() * gs.to(d.dtype)[None, :, None] + d
    return torch.where(keep[:, :, None], g, torch.zeros_like(g)).to(lp.dtype)


def _host_lengths(lengths) -> list[int] | None:
    """Lengths as host ints (a tensor is read on the host, as torch reads it), or None while tracing."""
    if isinstance(lengths, Tensor):
        return None if _dispatch.tracing() else lengths.reshape(-1).tolist()
    return list(lengths)


def _lengths_ok(lengths) -> bool:
    """Whether ``lengths`` is a form torch takes: an integral tensor, or a list / tuple of ints."""
    if isinstance(lengths, Tensor):
        return not lengths.dtype.is_floating_point and not lengths.dtype.is_complex and lengths.dtype != torch.bool
    return isinstance(lengths, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in lengths)


def _structure_ok(lp, targets, il, tl_, blank, zi) -> bool:
    """The checks on metadata alone; a False hands the call to torch (its exception, or its result)."""
    if not isinstance(lp, Tensor) or not isinstance(targets, Tensor):
        return False
    if lp.dtype not in FLOAT_DTYPES or lp.dim() not in (2, 3) or lp.numel() == 0:
        return False
    if targets.dim() not in (1, 2) or targets.dtype.is_complex:
        return False
    if not (_lengths_ok(il) and _lengths_ok(tl_)) or isinstance(il, Tensor) != isinstance(tl_, Tensor):
        return False
    if isinstance(blank, bool) or not isinstance(blank, int) or not 0 <= blank < lp.shape[-1] or not plain(bools=(zi,)):
        return False
    N = lp.shape[1] if lp.dim() == 3 else 1
    n_il = il.numel() if isinstance(il, Tensor) else len(il)
    n_tl = tl_.numel() if isinstance(tl_, Tensor) else len(tl_)
    if n_il != N or n_tl != N:
        return False
    return targets.dim() == 1 or targets.shape[0] == N


def _values_ok(T: int, targets: Tensor, il: list[int], tl_: list[int]) -> bool:
    """torch's checks on the length values (host ints)."""
    if any(v < 0 or v > T for v in il) or any(v < 0 for v in tl_):
        return False
    if targets.dim() == 1:
        return targets.shape[0] == sum(tl_)
    return targets.shape[1] >= max(tl_, default=0)


def _check_target_values(targets: Tensor, off: Tensor, tl_: Tensor, C: int, L: int) -> None:
    """``IndexError`` for a target outside ``[0, C)`` among the used positions (eager mode only).

    torch reads such a target out of bounds (an arbitrary result); here it is an error, like
    ``cross_entropy``'s, and on CUDA one more device read. Kernels clamp it under tracing.
    """
    if L == 0 or targets.numel() == 0 or _dispatch.tracing():
        return
    j = torch.arange(L, device=off.device)
    used = j < tl_[:, None]
    t = targets.reshape(-1)[(off[:, None] + j).clamp(0, targets.numel() - 1)]
    bad = used & ((t < 0) | (t >= C))
    if bool(bad.any()):
        raise IndexError(f"Target {int(t[bad][0])} is out of bounds.")


def _as_device_lengths(lengths, host: list[int] | None, device) -> Tensor:
    if isinstance(lengths, Tensor):
        return lengths.reshape(-1).to(device=device, dtype=torch.int64)
    return torch.tensor(host, dtype=torch.int64, device=device)


def _reduce(nll: Tensor, tl_: Tensor, reduction: str, zero_infinity: bool, out_dtype) -> Tensor:
    """torch's reduction of the ``(N,)`` losses: 'mean' divides each by its clamped target length."""
    loss = torch.where(nll == float("inf"), torch.zeros_like(nll), nll) if zero_infinity else nll
    if reduction == "mean":
        return cast((loss / tl_.clamp(min=1).to(loss.dtype)).mean(), out_dtype)
    if reduction == "sum":
        return cast(loss.sum(), out_dtype)
    return cast(loss, out_dtype)


def _gscale(tl_: Tensor, N: int, reduction: str, acc) -> Tensor | None:
    """d(reduced loss)/d(loss of each sequence) for 'mean' / 'sum', on the device; None for 'none'."""
    if reduction == "sum":
        return torch.ones(N, dtype=acc, device=tl_.device)
    if reduction == "mean":
        return 1.0 / N / tl_.clamp(min=1).to(acc)
    return None


def _torch_decides(torch_args: tuple, lp) -> Tensor:
    """Hand a call our checks refuse to torch: its exception, or (``auto``) its result."""
    try:
        raise_like_torch(F.ctc_loss, *torch_args)
    except TorchAccepted as accepted:
        _dispatch.backend(lp, op="ctc_loss", unsupported="this combination of arguments")
        return accepted.result


def ctc_loss(
    log_probs: Tensor,
    targets: Tensor,
    input_lengths: Tensor | Sequence[int],
    target_lengths: Tensor | Sequence[int],
    blank: int = 0,
    reduction: str = "mean",
    zero_infinity: bool = False,
) -> Tensor:
    """Connectionist Temporal Classification loss, as ``torch.nn.functional.ctc_loss``.

    Args:
        log_probs: ``(T, N, C)`` or unbatched ``(T, C)`` log-probabilities (e.g. a ``log_softmax``
            output), fp16 / bf16 / fp32 / fp64 (fp16 / bf16 are computed in fp32; torch's CPU op
            refuses them).
        targets: padded ``(N, S)`` or concatenated ``(sum(target_lengths),)`` class indices (any
            dtype torch converts to int64); no used target may be outside ``[0, C)`` (IndexError).
        input_lengths: ``(N,)`` (or ``()`` unbatched) integer tensor, or a list / tuple of ``N`` ints,
            each in ``[0, T]``.
        target_lengths: the same form, each ``>= 0`` (and ``<= S`` for padded targets).
        blank: the blank class, in ``[0, C)``.
        reduction: ``'none'`` (``(N,)``, or ``()`` unbatched) | ``'mean'`` (each loss divided by its
            target length clamped to 1, then the batch mean) | ``'sum'``.
        zero_infinity: infinite losses (impossible alignments) and their gradients become 0.

    Returns:
        The loss in ``log_probs``' dtype. Its gradient w.r.t. ``log_probs`` is torch's: the
        derivative plus ``exp(log_probs) * upstream`` for ``t < input_length`` (the log-softmax
        convention of torch's kernels; 0 for ``t >= input_length``).
    """
    reduction = reduction_string(None, None, reduction)
    if isinstance(log_probs, Tensor) and log_probs.device.type == "cpu":  # on torch's CPU autocast fp32 list only
        (log_probs,) = autocast_fp32(log_probs)
    torch_args = (log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity)
    if not _structure_ok(log_probs, targets, input_lengths, target_lengths, blank, zero_infinity):
        return _torch_decides(torch_args, log_probs)
    batched = log_probs.dim() == 3
    lp = log_probs if batched else log_probs.unsqueeze(1)
    T, N, C = lp.shape
    il_host, tl_host = _host_lengths(input_lengths), _host_lengths(target_lengths)
    if il_host is not None and tl_host is not None and not _values_ok(T, targets, il_host, tl_host):
        return _torch_decides(torch_args, log_probs)
    device = lp.device
    t64 = targets.to(device=device, dtype=torch.int64).contiguous()
    il = _as_device_lengths(input_lengths, il_host, device)
    tl_ = _as_device_lengths(target_lengths, tl_host, device)
    if targets.dim() == 2:
        off = torch.arange(N, device=device) * targets.shape[1]
        bound = targets.shape[1]
    else:
        off = torch.cumsum(tl_, 0) - tl_
        bound = targets.shape[0]
    max_len = max(tl_host, default=0) if tl_host is not None else bound
    _check_target_values(t64, off, tl_, C, max_len)
    eng = _dispatch.engine("ctc", lp, op="ctc_loss")
    if max_len > eng.max_target_length(lp.dtype):
        why = f"target lengths above {eng.max_target_length(lp.dtype)} for {lp.dtype}"
        eng = _dispatch.engine("ctc", lp, op="ctc_loss", unsupported=why)
    out = CTCLossFunction.apply(lp, t64, off, il, tl_, blank, max_len, bool(zero_infinity), reduction, lp.dtype, eng)
    return out.squeeze(0) if reduction == "none" and not batched else out


class CTCLoss(_nn.CTCLoss):
    """``torch.nn.CTCLoss`` computed by :func:`triton_losses.ctc_loss`.

    ``forward(log_probs, targets, input_lengths, target_lengths)``: log-probabilities ``(T, N, C)``
    or ``(T, C)``; targets ``(N, S)`` or ``(sum(target_lengths),)``; lengths ``(N,)`` tensors or
    lists (or ``()`` tensors unbatched). Returns a 0-d loss, or ``(N,)`` for ``reduction='none'``.
    """

    def forward(self, log_probs: Tensor, targets: Tensor, input_lengths, target_lengths) -> Tensor:
        return ctc_loss(
            log_probs, targets, input_lengths, target_lengths, self.blank, self.reduction, self.zero_infinity
        )
