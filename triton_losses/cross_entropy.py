"""``cross_entropy`` and ``nll_loss``: validation, the autograd Function, the reduction, and their nn modules."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn as _nn

from . import _dispatch, parallel
from ._checks import (
    FLOAT_DTYPES,
    TorchAccepted,
    autocast_fp32,
    ce_views,
    check_target_range,
    raise_like_torch,
    reduction_string,
)
from ._precision import acc_dtype
from .options import CEOptions, CESpec

__all__ = ["CrossEntropyFunction", "CrossEntropyLoss", "NLLLoss", "cross_entropy", "nll_loss"]


class CrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper of one cross-entropy / NLL call on ``(A, C, B)`` logits.

    The forward returns the reduced loss ('mean', 'sum': 0-d; 'none': ``(A * B,)``). With ``fuse``
    (and an engine that can), the forward also writes the gradient of the reduced loss, and the
    first backward only scales it by the upstream gradient; otherwise the backward recomputes the
    softmax from the saved per-row statistics. Under ``create_graph=True`` the backward is built
    from differentiable torch ops, so second derivatives are exact.
    """

    @staticmethod
    def forward(ctx, x, t, weight, opts: CEOptions, eng, reduction: str, inplace: bool, out_dtype, fuse: bool):
        mean = reduction == "mean"
        spec = CESpec(weight, None, *opts)
        norm = None
        if mean or (weight is not None and opts.smoothing > 0):
            norm = eng.ce_norm(x, t, spec, mean)  # [weight sum, denominator, coefficient]
            spec = spec._replace(weight_sum=norm[0:1] if weight is not None else None)
        coef = norm[2:3] if mean else None
        grad = torch.empty(x.shape, dtype=x.dtype, device=x.device) if fuse and eng.FUSES_GRAD else None
        loss_rows, stats = eng.ce_fwd(x, t, spec, coef, grad)
        out = eng.ce_finish(loss_rows, norm, spec, reduction, out_dtype)
        ctx.save_for_backward(x, t, weight, stats, norm)
        ctx.grad_buf, ctx.opts, ctx.eng = grad, opts, eng
        ctx.reduction, ctx.inplace, ctx.backwards_done = reduction, inplace, 0
        return out

    @staticmethod
    def backward(ctx, gout):
        x, t, weight, stats, norm = ctx.saved_tensors
        nones = (None,) * (len(ctx.needs_input_grad) - 2)
        coef = norm[2:3] if ctx.reduction == "mean" else None
        if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient
            return (*_differentiable_grads(ctx, x, t, weight, coef, gout), *nones)
        first = ctx.backwards_done == 0
        ctx.backwards_done += 1
        if ctx.grad_buf is not None and first:
            grad, ctx.grad_buf = ctx.grad_buf, None
            ctx.eng.scale_(grad, gout.reshape(1))
            return grad, None, *nones
        if ctx.inplace and not first:
            raise RuntimeError(
                "cross_entropy(inplace_backward=True) overwrote the logits with their gradient in the "
                "first backward; it cannot be backpropagated through twice"
            )
        spec = CESpec(weight, norm[0:1] if norm is not None and weight is not None else None, *ctx.opts)
        want_x, want_t = ctx.needs_input_grad[:2]
        buf = x if ctx.inplace and want_x else None
        tbuf = torch.empty(t.shape, dtype=t.dtype, device=t.device) if want_t else None
        grad, tgrad = ctx.eng.ce_bwd(x, t, spec, stats, gout.contiguous(), coef, buf, tbuf)
        return grad if want_x else None, tgrad, *nones


def _loss_rows(x: torch.Tensor, t: torch.Tensor, weight: torch.Tensor | None, opts: CEOptions) -> torch.Tensor:
    """Per-row losses ``(A * B,)`` of ``(A, C, B)`` logits, from differentiable torch ops (double backward)."""
    A, C, B = x.shape
    acc = acc_dtype(x.dtype)
    xs = x.to(acc)
    if opts.softcap is not None:
        xs = opts.softcap * torch.tanh(xs / opts.softcap)
    w = None if weight is None else weight.to(acc)
    eps = opts.smoothing
    if opts.prob_target:
        tt = t.to(acc)
        if eps > 0:
            tt = tt * (1.0 - eps) + eps / C
        wt = tt if w is None else tt * w[None, :, None]
        rows = -(wt * torch.log_softmax(xs, 1)).sum(1)
        if opts.z_loss:
            rows = rows + opts.z_loss * torch.logsumexp(xs, 1) ** 2
        return rows.reshape(-1)
    tl = t.reshape(A, 1, B).long()
    ignored, inb = tl == opts.ignore_index, (tl >= 0) & (tl < C)
    tsafe = torch.where(inb, tl, torch.zeros_like(tl))
    w_t = torch.ones(tsafe.shape, dtype=acc, device=x.device) if w is None else w[tsafe]
    if opts.logp_input:
        rows = -w_t * xs.gather(1, tsafe)
    else:
        lsm = torch.log_softmax(xs, 1)
        rows = -w_t * lsm.gather(1, tsafe)
        if eps > 0:
            smooth = -(lsm if w is None else lsm * w[None, :, None]).sum(1, keepdim=True)
            rows = (1.0 - eps) * rows + eps / C * smooth
        if opts.z_loss:
            rows = rows + opts.z_loss * w_t * torch.logsumexp(xs, 1, keepdim=True) ** 2
    rows = torch.where(inb, rows, torch.full_like(rows, float("nan")))
    return torch.where(ignored, torch.zeros_like(rows), rows).reshape(-1)


def _differentiable_grads(ctx, x, t, weight, coef, gout) -> tuple:
    """``(dx, dt)`` of the call from :func:`_loss_rows`, with a graph (for a second backward)."""
    want = ctx.needs_input_grad[:2]
    inputs = [v for v, need in zip((x, t), want) if need]
    with torch.enable_grad():
        rows = _loss_rows(x, t, weight, ctx.opts)
        scale = gout.reshape(-1).to(rows.dtype)
        if coef is not None:
            scale = scale * coef.to(rows.dtype)
        found = torch.autograd.grad(rows, inputs, scale.expand(rows.shape), create_graph=True, allow_unused=True)
    it = iter(found)
    grads = [next(it) if need else None for need in want]
    if grads[0] is not None and not grads[0].requires_grad:  # NLL: linear in x, so its gradient has no graph;
        grads[0] = _ConstantIn.apply(grads[0], x)  # torch's still depends on x (with derivative 0)
    return tuple(grads)


class _ConstantIn(torch.autograd.Function):
    """``g`` as a function of ``x`` with zero derivative: a gradient that does not depend on the logits (NLL's)
    is still differentiable w.r.t. them, as torch's ``nll_loss`` double backward is (it gives zeros)."""

    @staticmethod
    def forward(ctx, g, x):
        ctx.x_meta = (x.shape, x.dtype, x.device)
        return g.clone()

    @staticmethod
    def backward(ctx, gg):
        shape, dtype, device = ctx.x_meta
        return gg, torch.zeros(shape, dtype=dtype, device=device)


def _ce_unsupported(input, target, weight, ignore_index, label_smoothing, nll: bool) -> bool:
    """True when the call is not one this module models (torch decides what then happens)."""
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        return True
    if weight is not None and not isinstance(weight, torch.Tensor):
        return True
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        return True
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        return True
    if input.dtype not in FLOAT_DTYPES or input.dim() == 0:
        return True
    if target.device != input.device or (weight is not None and weight.device != input.device):
        return True
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        return True
    C = input.shape[1] if input.dim() >= 2 else input.shape[0]
    if C == 0:  # torch's error depends on the rank ("size mismatch" or "out of bounds")
        return True
    if weight is not None and (weight.dim() != 1 or weight.numel() != C):
        return True
    if label_smoothing > 1.0:
        return True
    if not nll and target.shape == input.shape:
        return not target.dtype.is_floating_point or ignore_index >= 0 or target.dtype not in FLOAT_DTYPES
    if target.dtype not in (torch.int64, torch.uint8):
        return True
    if weight is not None and weight.dtype != input.dtype:
        return True
    if input.dim() == 1:
        return target.dim() != 0
    return tuple(target.shape) != (input.shape[0], *input.shape[2:])


def _reads_16bit(op: str, input, target, weight, upcast: bool = False) -> bool:
    """Whether 16-bit logits are read as they are where torch would copy them to fp32 first.

    Inside an autocast region (or with ``upcast``: the caller asked for the loss of ``input.float()``)
    torch computes on an fp32 copy of the logits (at N = 8192, V = 128256 a 4.2 GB copy of 2.1 GB of
    bf16 logits) and returns an fp32 loss. The kernels compute in fp32 whatever they read, so on them
    the 16-bit logits give the same fp32 loss, and the gradient the cast's backward would round to 16
    bits is rounded once, the same way, when stored: the same values without the copy. Index
    targets, no class weights (whose fp32 cast would meet 16-bit logits), kernels serving the call;
    anything else takes torch's cast.
    """
    if not (upcast or torch.is_autocast_enabled(input.device.type)) or weight is not None:
        return False
    if input.dtype not in (torch.float16, torch.bfloat16) or target.dtype.is_floating_point:
        return False
    try:
        return _dispatch.backend(input, target, op=op) == "triton"
    except NotImplementedError:  # the error, if any, is raised where the call is dispatched
        return False


def _run(op, torch_fn, torch_args, input, target, weight, reduction, opts: CEOptions, inplace, unsupported,
         loss_dtype=None):  # fmt: skip
    """Validate, dispatch and run one CE-family call; shared by ``cross_entropy`` and ``nll_loss``.

    ``loss_dtype``: the loss's dtype when it is not the input's (16-bit logits read under autocast)."""
    if unsupported:
        try:
            raise_like_torch(torch_fn, *torch_args)
        except TorchAccepted as accepted:
            _dispatch.backend(input, op=op, unsupported="this combination of arguments")
            return accepted.result
    C = input.shape[1] if input.dim() >= 2 else input.shape[0]
    if not opts.prob_target:
        check_target_range(target, C, opts.ignore_index)
    eng = _dispatch.engine("cross_entropy", input, target, weight, op=op)
    x, t = ce_views(input, target, opts.prob_target)
    if opts.prob_target:
        out_dtype = torch.promote_types(input.dtype, target.dtype)
        if weight is not None:
            out_dtype = torch.promote_types(out_dtype, weight.dtype)
    else:
        out_dtype = loss_dtype or input.dtype
    fuse = (
        torch.is_grad_enabled()
        and input.requires_grad
        and not (opts.prob_target and target.requires_grad)
        and reduction != "none"
        and not inplace
        and not opts.logp_input
    )
    out = CrossEntropyFunction.apply(x, t, weight, opts, eng, reduction, inplace, out_dtype, fuse)
    if reduction == "none":
        out = out.reshape(input.shape[:1] + input.shape[2:] if input.dim() >= 2 else ())
    return out


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average=None,
    ignore_index: int = -100,
    reduce=None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    inplace_backward: bool = False,
    process_group=None,
) -> torch.Tensor:
    """Cross-entropy between logits and targets, as ``torch.nn.functional.cross_entropy``.

    Args:
        input: logits ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``, any floating dtype.
        target: class indices ``()``, ``(N,)`` or ``(N, d1, ..., dk)`` (int64 or uint8), or class
            probabilities of ``input``'s shape (floating).
        weight: class weights ``(C,)`` (any stride), or None.
        size_average: deprecated, mapped as torch maps it.
        ignore_index: index target whose positions contribute nothing (index targets only).
        reduce: deprecated, mapped as torch maps it.
        reduction: ``'none'`` (shape of the target's batch/spatial dims) | ``'mean'`` | ``'sum'``.
        label_smoothing: ``eps`` in ``[0, 1]``: mixes the target with the uniform distribution.
        z_loss: ``>= 0``; adds ``z_loss * lse**2`` per non-ignored position (weighted like its NLL
            term) inside the same reduction; ``lse`` is the logits' log-sum-exp.
        softcap: if set, logits become ``softcap * tanh(logits / softcap)`` before the softmax.
        inplace_backward: let the backward write the gradient into ``input``'s memory (saves one
            logits-sized buffer; ``input`` holds the gradient afterwards).
        process_group: a ``torch.distributed`` ``ProcessGroup`` over which the classes are split:
            ``input`` is then this rank's contiguous slice of the class dimension (slices in rank
            order, any sizes), ``target`` holds global indices (or this rank's slice of
            probabilities), ``weight`` is the global ``(C,)`` tensor, and every rank returns the
            loss of the concatenated logits (see :mod:`triton_losses.parallel`). A ``DTensor``
            input placed ``Shard(class_dim)`` runs the same way without it. None: one device.

    Returns:
        The loss in the input's dtype (promoted with a probability target's dtype; fp32 for 16-bit
        input under autocast, as torch): 0-d for 'mean' / 'sum', ``(N, d1, ..., dk)`` for 'none'.

    Raises:
        ValueError: ``z_loss`` negative or not finite, ``softcap`` not positive, or torch's errors.
    """
    reduction = reduction_string(size_average, reduce, reduction)
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    if not (math.isfinite(float(z_loss)) and z_loss >= 0):
        raise ValueError(f"z_loss must be finite and non-negative, got {z_loss!r}")
    loss_dtype = None
    sharded = process_group is not None or parallel.is_class_sharded(input)
    if isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor):
        if not sharded and _reads_16bit("cross_entropy", input, target, weight):
            loss_dtype = torch.float32  # torch's autocast result, without its fp32 copy of the logits
        else:
            input, target, weight = autocast_fp32(input, target, weight)  # on torch's fp32 list on every device
    if sharded:
        return parallel.cross_entropy(
            input, target, weight, ignore_index, reduction, label_smoothing, z_loss=z_loss, softcap=softcap,
            inplace_backward=inplace_backward, process_group=process_group,
        )  # fmt: skip
    unsupported = _ce_unsupported(input, target, weight, ignore_index, label_smoothing, nll=False)
    torch_args = (input, target, weight, None, ignore_index, None, reduction, label_smoothing)
    prob = not unsupported and target.shape == input.shape
    opts = CEOptions(
        ignore_index=ignore_index,
        smoothing=max(float(label_smoothing), 0.0) if not unsupported else 0.0,
        z_loss=float(z_loss),
        softcap=None if softcap is None else float(softcap),
        prob_target=prob,
    )
    return _run(
        "cross_entropy", F.cross_entropy, torch_args, input, target, weight, reduction, opts,
        inplace_backward, unsupported, loss_dtype,
    )  # fmt: skip


def cross_entropy_fp32(input: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """``cross_entropy(input.float(), target, ...)`` (transformers upcasts the logits before its loss).

    On the kernels, 16-bit logits with index targets are read as they are: the kernels compute in
    fp32 whatever they read, so the fp32 loss and the gradient (rounded once to the logits' dtype,
    where ``.float()``'s backward would round it) are the same, without an fp32 copy of the logits
    and its fp32 gradient (at N = 8192, V = 128256 bf16: 8.4 GB). Anything else is upcast first.
    """
    if not parallel.is_class_sharded(input) and _reads_16bit("cross_entropy", input, target, None, upcast=True):
        C = input.shape[1] if input.dim() >= 2 else input.shape[0]
        if not _ce_unsupported(input, target, None, ignore_index, 0.0, nll=False) and C > 0:
            opts = CEOptions(ignore_index=ignore_index)
            args = (input, target, None, None, ignore_index, None, reduction, 0.0)
            return _run("cross_entropy", F.cross_entropy, args, input, target, None, reduction, opts, False, False,
                        torch.float32)  # fmt: skip
    return cross_entropy(input.float(), target, ignore_index=ignore_index, reduction=reduction)


def nll_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average=None,
    ignore_index: int = -100,
    reduce=None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Negative log-likelihood of log-probabilities, as ``torch.nn.functional.nll_loss``.

    Args:
        input: log-probabilities ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``.
        target: class indices ``()``, ``(N,)`` or ``(N, d1, ..., dk)`` (int64 or uint8).
        weight: class weights ``(C,)`` (any stride), or None.
        size_average: deprecated, mapped as torch maps it.
        ignore_index: target value whose positions contribute nothing.
        reduce: deprecated, mapped as torch maps it.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``.

    Returns:
        The loss in the input's dtype (fp32 for 16-bit input under autocast, as torch): 0-d, or
        ``(N, d1, ..., dk)`` for 'none'.
    """
    reduction = reduction_string(size_average, reduce, reduction)
    loss_dtype = None
    if isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor):
        if _reads_16bit("nll_loss", input, target, weight):
            loss_dtype = torch.float32  # torch's autocast result, without its fp32 copy of the input
        else:
            input, target, weight = autocast_fp32(input, target, weight)  # on torch's fp32 list on every device
    unsupported = _ce_unsupported(input, target, weight, ignore_index, 0.0, nll=True)
    torch_args = (input, target, weight, None, ignore_index, None, reduction)
    opts = CEOptions(ignore_index=ignore_index, logp_input=True)
    return _run("nll_loss", F.nll_loss, torch_args, input, target, weight, reduction, opts, False, unsupported,
                loss_dtype)  # fmt: skip


class NLLLoss(_nn.NLLLoss):
    """``torch.nn.NLLLoss`` computed by :func:`nll_loss`; same constructor (``weight`` is a buffer).

    ``forward(input, target)``: log-probabilities ``(N, C)`` / ``(N, C, d1..dk)`` / ``(C,)`` and
    class indices ``(N,)`` / ``(N, d1..dk)`` / ``()``.
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nll_loss(input, target, weight=self.weight, ignore_index=self.ignore_index, reduction=self.reduction)


class CrossEntropyLoss(_nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` computed by :func:`cross_entropy`; same constructor.

    ``forward(input, target)``: logits ``(N, C)`` / ``(N, C, d1..dk)`` / ``(C,)`` and class indices
    ``(N,)`` / ``(N, d1..dk)`` / ``()`` or probabilities of the logits' shape. Extra keyword-only
    arguments: ``z_loss``, ``softcap``, ``inplace_backward`` and ``process_group`` (the logits are this
    rank's slice of the classes; not part of the ``state_dict``), as in :func:`cross_entropy`.
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        inplace_backward: bool = False,
        process_group=None,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap
        self.inplace_backward = inplace_backward
        self.process_group = process_group

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            inplace_backward=self.inplace_backward,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        extras = []
        if self.z_loss:
            extras.append(f"z_loss={self.z_loss}")
        if self.softcap is not None:
            extras.append(f"softcap={self.softcap}")
        if self.inplace_backward:
            extras.append("inplace_backward=True")
        if self.process_group is not None:
            extras.append("process_group=...")
        return ", ".join(extras)
