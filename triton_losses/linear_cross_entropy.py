"""``linear_cross_entropy`` and ``LinearCrossEntropyLoss``: cross-entropy of a linear layer's output
without holding its logits.

``linear_cross_entropy(x, W, t)`` equals torch's ``F.linear_cross_entropy(x, W, t)``, i.e.
``cross_entropy(linear(x, W, b), t)``, in loss and in the gradients for ``x``, ``W`` and ``b``, but the
``(N, V)`` logits only ever exist one chunk of rows at a time (see ``_linear_ce_chunks``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn as _nn

from . import _dispatch
from . import _linear_ce_chunks as chunks
from . import _linear_ce_composite as composite
from . import _linear_ce_ops as lce_ops
from . import parallel as _parallel
from ._checks import (
    FLOAT_DTYPES,
    TorchAccepted,
    assert_target_range_traced,
    autocast_linear,
    eager_checks,
    raise_like_torch,
)
from ._precision import acc_dtype
from ._reduce import cast, finish_rows, target_weight_sum
from .options import CESpec

__all__ = ["LinearCrossEntropyFunction", "LinearCrossEntropyLoss", "linear_cross_entropy"]

_OP = "linear_cross_entropy"
# torch >= 2.13 (None before): its options type and its module, which ours subclasses.
_TorchOptions = getattr(_nn, "LinearCrossEntropyOptions", None)
_TorchLinearCrossEntropyLoss = getattr(_nn, "LinearCrossEntropyLoss", None)


class _Layout(NamedTuple):
    """How a call's shapes map onto the chunks: ``C`` classes at each of ``prod(out_features)`` positions."""

    classes: int
    out_features: tuple[int, ...]
    batch: tuple[int, ...]
    prob: bool


class _Plan(NamedTuple):
    """The non-tensor options of one call, as the autograd Function carries them."""

    ignore_index: int
    smoothing: float
    z_loss: float
    softcap: float | None
    prob: bool
    classes: int
    chunk: int
    wgrad: torch.dtype


def _spec(plan: _Plan, weight: torch.Tensor | None, wsum: torch.Tensor | None) -> CESpec:
    return CESpec(weight, wsum, plan.ignore_index, plan.smoothing, plan.z_loss, plan.softcap, plan.prob, False)


def _denominator(t: torch.Tensor, spec: CESpec, C: int, positions: int, acc: torch.dtype) -> torch.Tensor:
    """``(1,)`` 'mean' divisor on the device: summed class weights of non-ignored targets, or the positions."""
    if spec.prob_target:
        return torch.full((1,), float(positions), dtype=acc, device=t.device)
    return target_weight_sum(t, spec.weight, spec.ignore_index, C, acc)


def _finish(loss: torch.Tensor, reduction: str, denom: torch.Tensor, smoothing: float, out_dtype) -> torch.Tensor:
    """The reduced loss; 'mean' with label smoothing and a zero denominator is NaN, as torch's
    ``(1 - eps) * nll_sum / 0 + eps / C * smooth_sum / 0`` (its first term is ``0 / 0``)."""
    out = finish_rows(loss, reduction, denom, loss.dtype)
    if reduction == "mean" and smoothing > 0:
        out = torch.where(denom[0] == 0, torch.full_like(out, float("nan")), out)
    return cast(out, out_dtype)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper of one chunked linear cross-entropy on rows ``x`` ``(N, H)``, ``w`` ``(C * D, H)``.

    'mean' / 'sum': the forward computes the loss and, for the operands that need them, the
    gradients in the same pass over the chunks; the first backward only scales them by the upstream
    gradient (a device-side no-op for the usual 1.0). 'none' (and any later backward): the forward
    keeps each position's softmax statistics, and the backward recomputes the chunks' logits. With
    ``create_graph=True`` the backward builds the gradients from differentiable torch ops.
    """

    @staticmethod
    def forward(ctx, x, w, b, t, weight, eng, plan: _Plan, rows, reduction: str, out_dtype):
        acc = acc_dtype(x.dtype)
        wsum = None if weight is None else weight.sum(dtype=acc).reshape(1)
        spec = _spec(plan, weight, wsum)
        n = x.shape[0] if rows is None else rows.shape[0]
        p = chunks.Problem(x, w, b, t, spec, plan.classes, rows, n, plan.chunk, plan.wgrad)
        if reduction == "mean":
            denom = _denominator(t, spec, plan.classes, x.shape[0] * (w.shape[0] // plan.classes), acc)
            coef = 1.0 / denom
        else:
            denom = coef = torch.ones(1, dtype=acc, device=x.device)
        need = tuple(ctx.needs_input_grad[:3])
        fuse = reduction != "none" and any(need)
        res = lce_ops.forward(eng, p, coef, need if fuse else (False, False, False), reduction == "none")
        loss = res.rows_loss if reduction == "none" else res.total.reshape(1)
        ctx.save_for_backward(x, w, b, t, weight, wsum, rows, res.stats, coef)
        ctx.fused = res.grads if fuse else None
        ctx.eng, ctx.plan, ctx.reduction = eng, plan, reduction
        return _finish(loss, reduction, denom, plan.smoothing, out_dtype)

    @staticmethod
    def backward(ctx, gout):
        x, w, b, t, weight, wsum, rows, stats, coef = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:3])
        rest = (None,) * 7
        if not any(need):
            return (None, None, None, *rest)
        plan, reduction = ctx.plan, ctx.reduction
        if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
            return (*composite.differentiable_grads(x, w, b, t, weight, plan, reduction, coef, gout, need), *rest)
        if ctx.fused is not None:
            grads, ctx.fused = ctx.fused, None
            return (*lce_ops.scale(ctx.eng, grads, gout), *rest)
        g = gout.reshape(-1).to(acc_dtype(x.dtype))
        if reduction == "none" and rows is not None:
            g = g.view(x.shape[0], -1).index_select(0, rows).reshape(-1)
        n = x.shape[0] if rows is None else rows.shape[0]
        p = chunks.Problem(x, w, b, t, _spec(plan, weight, wsum), plan.classes, rows, n, plan.chunk, plan.wgrad)
        return (*lce_ops.backward(ctx.eng, p, coef, need, stats, g.contiguous()), *rest)


def _layout(input, w, target, b) -> _Layout | str:
    """The call's shapes as the chunks see them, or why they are not ones the chunks model."""
    if input.dtype not in FLOAT_DTYPES or input.dim() == 0:
        return "this input"
    if w.dim() < 2 or w.shape[-1] != input.shape[-1]:
        return "this linear_weight shape"
    C, out_features = w.shape[0], tuple(w.shape[1:-1])
    if out_features and input.dim() != 2:
        return "a K-dimensional linear_weight with this input"
    if math.prod(out_features, start=C) == 0:
        return "an empty class dimension"
    if b is not None and tuple(b.shape) != (C, *out_features):
        return "this linear_bias shape"
    batch = tuple(input.shape[:-1])
    if tuple(target.shape) == (*batch, C, *out_features):
        return _Layout(C, out_features, batch, True)
    if tuple(target.shape) == (*batch, *out_features):
        return _Layout(C, out_features, batch, False)
    return "this target shape"


def _unsupported(input, w, target, b, weight, reduction, ignore_index, label_smoothing, options, lay) -> str | None:
    """Why the chunks cannot serve this call (torch then decides what happens), or None."""
    if w.dtype != input.dtype or (b is not None and b.dtype != input.dtype):
        return "mixed dtypes"
    if len({v.device for v in (input, w, target, b, weight) if v is not None}) != 1:
        return "tensors on different devices"
    if reduction not in ("none", "mean", "sum") or not label_smoothing <= 1.0:
        return f"reduction={reduction!r}, label_smoothing={label_smoothing!r}"
    if options is not None and (_TorchOptions is None or not isinstance(options, _TorchOptions)):
        return "these options"
    grad_on = torch.is_grad_enabled()
    if weight is not None:
        if weight.dim() != 1 or weight.numel() != lay.classes or weight.dtype != input.dtype:
            return "this class weight"
        if weight.requires_grad and grad_on:
            return "a class weight that requires grad"
    if not lay.prob:
        return None if target.dtype in (torch.int64, torch.uint8) else "this target dtype"
    if target.dtype not in FLOAT_DTYPES or ignore_index is not None:
        return "this probability target"
    if target.requires_grad and grad_on:
        return "a probability target that requires grad"
    return None


def _fallback(input, w, target, b, weight, reduction, ignore_index, label_smoothing, options, z_loss, softcap):
    """The call with its logits materialised: torch's own function where it exists and applies."""
    if composite.TORCH_LINEAR_CE is not None and not z_loss and softcap is None and input.dim() <= 2:
        return composite.TORCH_LINEAR_CE(
            input, w, target, linear_bias=b, weight=weight, reduction=reduction, ignore_index=ignore_index,
            label_smoothing=label_smoothing, options=options,
        )  # fmt: skip
    return composite.linear_cross_entropy(input, w, target, b, weight, reduction, ignore_index, label_smoothing,
                                          z_loss, softcap)  # fmt: skip


def _live_rows(t: torch.Tensor, ignore_index: int, C: int) -> tuple[torch.Tensor | None, int]:
    """The target check, and the rows of ``t`` ``(N, D)`` with a non-ignored target, in one host read.

    Where the check runs (``_checks.eager_checks``: CPU tensors in eager mode; CUDA tensors only with
    ``TRITON_LOSSES_CHECK_TARGETS=1``), the same device-to-host transfer that gives the out-of-range
    count gives the live-row count, so skipping the ignored rows costs no extra sync. Elsewhere
    (CUDA by default, tracing) nothing is read back and every row is computed: ignored rows cost
    matmul work but contribute exactly 0, and an out-of-range target trips the kernels' device
    assert (NaN where asserts are off).

    Returns:
        ``(rows, n)``: the ``(n,)`` int64 indices of the rows to compute, in order, or ``(None, N)``.
    """
    N = t.shape[0]
    if N == 0 or not eager_checks(t.device):
        assert_target_range_traced(t, C, ignore_index)  # traced CPU calls: a check the compiled graph runs
        return None, N
    tl = t.long()  # compare as int64: a uint8 target must not wrap ignore_index=-100 to 156
    valid = tl != ignore_index
    bad = valid & ((tl < 0) | (tl >= C))
    live = valid.any(1)
    n_live, n_bad = torch.stack((live.sum(), bad.sum())).tolist()
    if n_bad:
        raise IndexError(f"Target {int(tl[bad][0])} is out of bounds.")
    if n_live == N:
        return None, N
    # A stable sort puts the live rows first, in order, without a second sync for the output size.
    return torch.argsort(live.logical_not().to(torch.int8), stable=True)[:n_live], n_live


def _check_extras(z_loss, softcap, chunk_size, fp32_weight_grad) -> None:
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    if not math.isfinite(float(z_loss)):
        raise ValueError(f"z_loss must be finite, got {z_loss!r}")
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if fp32_weight_grad not in (None, True, False):
        raise ValueError(f"fp32_weight_grad must be True, False or None, got {fp32_weight_grad!r}")


def _flatten(input, w, b, target, lay: _Layout):
    """The operands as the chunks take them: ``(N, H)``, ``(C * D, H)``, ``(C * D,)``, ``(N, D)`` / ``(N, C, D)``."""
    H, D = input.shape[-1], math.prod(lay.out_features)
    N = math.prod(lay.batch)
    V = lay.classes * D
    t = target.reshape(N, lay.classes, D) if lay.prob else target.reshape(N, D)
    return input.reshape(N, H), w.reshape(V, H), None if b is None else b.reshape(V), t


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options=None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    fp32_weight_grad: bool | None = None,
    process_group=None,
) -> torch.Tensor:
    """Cross-entropy of ``linear(input, linear_weight, linear_bias)``, never holding the logits.

    ``torch.nn.functional.linear_cross_entropy``'s signature, defaults and errors: computes
    ``cross_entropy(linear(input, W, b).reshape(*batch, C, *out_features), target, ...)`` and its
    gradients for ``input``, ``W`` and ``b``, one chunk of rows at a time: peak working memory is one
    ``(chunk, C * prod(out_features))`` buffer. Rows whose targets are all ``ignore_index`` cost no
    matmul work where the eager target check runs (the CPU; CUDA with ``TRITON_LOSSES_CHECK_TARGETS=1``),
    since its host read gives their count too; elsewhere they are computed and contribute 0. The
    gradient of ``b`` is accumulated over the chunks in fp32 (fp64 for fp64); that of ``W`` too,
    unless ``fp32_weight_grad`` says otherwise.

    Args:
        input: hidden states ``(H,)`` or ``(N, H)`` (also ``(..., H)`` with a 2-D weight), floating.
        linear_weight: ``(C, H)``, or ``(C, d1, ..., dK, H)`` for a K-dimensional loss (with ``(N, H)``
            input), in ``input``'s dtype.
        target: class indices ``(*batch, d1, ..., dK)`` (int64 or uint8), or class probabilities
            ``(*batch, C, d1, ..., dK)`` (floating; no gradient flows to them).
        linear_bias: ``(C, d1, ..., dK)`` or None.
        weight: class weights ``(C,)`` in ``input``'s dtype, or None.
        reduction: ``'none'`` (loss of shape ``(*batch, d1, ..., dK)``) | ``'mean'`` | ``'sum'``.
        ignore_index: index target whose positions contribute nothing; None (torch's default) means
            -100. Giving one with probability targets raises torch's ``RuntimeError``.
        label_smoothing: ``eps`` in ``[0, 1]``, as in ``cross_entropy``.
        options: a ``torch.nn.LinearCrossEntropyOptions`` or None, accepted as torch accepts it; the
            chunking is ours either way: only its ``batch_chunk_size`` is used (as ``chunk_size``).
        z_loss: adds ``z_loss * lse**2`` per non-ignored position, as in :func:`triton_losses.cross_entropy`.
        softcap: if set, logits become ``softcap * tanh(logits / softcap)`` before the softmax.
        chunk_size: rows per chunk; None picks it from the logits-buffer budget (see
            ``_linear_ce_chunks.chunk_rows``).
        fp32_weight_grad: for a 16-bit ``W``: accumulate its gradient over the chunks in an fp32
            ``(V, H)`` buffer (True; 4 bytes per weight element of extra memory), or in ``W``'s dtype
            (False; each chunk's GEMM sums in fp32, then rounds once when adding to the running
            gradient, so one rounding per chunk). None: fp32 when that buffer fits in
            ``_linear_ce_chunks.WGRAD_FP32_BYTES`` (256 MiB), else ``W``'s dtype.
        process_group: a ``ProcessGroup`` over which the vocabulary is split: ``linear_weight`` /
            ``linear_bias`` are this rank's rows (``(V_local, H)``), ``target`` holds global indices,
            every rank gets the full loss and ``input``'s full gradient (see :mod:`triton_losses.parallel`).
            A ``DTensor`` weight placed ``Shard(0)`` runs the same way without it.

    Returns:
        The loss in ``input``'s dtype (promoted with a probability target's dtype): 0-d for
        'mean' / 'sum', ``(*batch, d1, ..., dK)`` for 'none'. In an autocast region (``options=None``)
        torch's composite: the logits in the region's dtype and an fp32 loss.
    """
    _check_extras(z_loss, softcap, chunk_size, fp32_weight_grad)
    autocast = False
    if options is None:  # torch's composite; its chunked op (options given) is not autocast
        input, linear_weight, linear_bias, autocast = autocast_linear(input, linear_weight, linear_bias)
    if process_group is not None or _parallel.is_row_sharded(linear_weight):
        return _parallel.linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight, reduction=reduction,
            ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
            chunk_size=options.batch_chunk_size if chunk_size is None and options is not None else chunk_size,
            fp32_weight_grad=fp32_weight_grad, process_group=process_group,
        )  # fmt: skip
    lay = _layout(input, linear_weight, target, linear_bias)
    args = (linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing, options)
    why = lay if isinstance(lay, str) else _unsupported(input, *args, lay)
    if why is not None:
        try:
            raise_like_torch(_fallback, input, *args, z_loss, softcap)
        except TorchAccepted as accepted:
            _dispatch.backend(input, op=_OP, unsupported=why)  # TRITON_LOSSES_BACKEND=triton refuses
            return accepted.result
    eng = _dispatch.engine("cross_entropy", input, linear_weight, target, op=_OP)
    x, w, b, t = _flatten(input, linear_weight, linear_bias, target, lay)
    ii = -100 if ignore_index is None else int(ignore_index)
    rows, n = (None, x.shape[0]) if lay.prob else _live_rows(t, ii, lay.classes)
    if chunk_size is None and options is not None:
        chunk_size = options.batch_chunk_size
    plan = _Plan(ii, max(float(label_smoothing), 0.0), float(z_loss), None if softcap is None else float(softcap),
                 lay.prob, lay.classes, chunks.chunk_rows(n, w.shape[0], x.element_size(), x.device, chunk_size),
                 chunks.weight_grad_dtype(w, fp32_weight_grad))  # fmt: skip
    out_dtype = torch.promote_types(x.dtype, target.dtype) if lay.prob else x.dtype
    if autocast:  # cross_entropy's autocast policy: an fp32 loss (of the 16-bit logits)
        out_dtype = torch.promote_types(out_dtype, torch.float32)
    out = LinearCrossEntropyFunction.apply(x, w, b, t, weight, eng, plan, rows, reduction, out_dtype)
    return out.reshape((*lay.batch, *lay.out_features)) if reduction == "none" else out


class LinearCrossEntropyLoss(_TorchLinearCrossEntropyLoss or _nn.modules.loss._WeightedLoss):
    """Cross-entropy of a linear layer's output, by :func:`linear_cross_entropy`.

    Built like ``torch.nn.LinearCrossEntropyLoss(in_features, num_classes, *, out_features=(),
    bias=False, ...)`` (which it subclasses where torch has it, >= 2.13) it is a drop-in for it: it
    owns ``self.linear`` (``(C * prod(out_features), in_features)``, torch's ``state_dict``) and is
    called as ``loss(input, target)`` with ``input`` ``(N, in_features)`` and ``target``
    ``(N, *out_features)`` indices or ``(N, C, *out_features)`` probabilities.

    Built from options only (no sizes), it owns nothing but them (class weights are a buffer) and is
    called as ``loss(input, linear_weight, target, linear_bias=None)``, so the caller's ``lm_head``
    weight is passed in and no ``(N, V)`` logits are ever held.

    Extra keyword-only arguments: ``z_loss``, ``softcap``, ``chunk_size``, ``fp32_weight_grad`` and,
    for the options-only form, ``process_group`` (the ``linear_weight`` passed in is this rank's rows
    of the lm_head), as in the function.
    """

    def __init__(
        self,
        in_features: int | None = None,
        num_classes: int | None = None,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: torch.Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        options=None,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
        fp32_weight_grad: bool | None = None,
        process_group=None,
    ) -> None:
        if process_group is not None and in_features is not None:
            raise TypeError(
                "LinearCrossEntropyLoss: process_group needs the options-only form (pass this rank's "
                "lm_head rows to forward), not in_features / num_classes"
            )
        if (in_features is None) != (num_classes is None):
            raise TypeError("LinearCrossEntropyLoss: give both in_features and num_classes, or neither")
        if in_features is None and tuple(out_features):
            raise TypeError("LinearCrossEntropyLoss: out_features needs in_features and num_classes")
        kw = dict(reduction=reduction, weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing)
        if in_features is not None and _TorchLinearCrossEntropyLoss is not None:
            _TorchLinearCrossEntropyLoss.__init__(
                self, in_features, num_classes, out_features=out_features, bias=bias, device=device, dtype=dtype,
                options=options, **kw,
            )  # fmt: skip
        else:
            self._init_like_torch(in_features, num_classes, tuple(out_features), bias, device, dtype, options, **kw)
        self.z_loss, self.softcap, self.chunk_size = z_loss, softcap, chunk_size
        self.fp32_weight_grad = fp32_weight_grad
        self.process_group = process_group

    def _init_like_torch(self, in_features, num_classes, out_features, bias, device, dtype, options, *,
                         reduction, weight, ignore_index, label_smoothing) -> None:  # fmt: skip
        """torch 2.13's constructor (its checks and attributes), for torch without the class or no sizes."""
        if weight is not None and num_classes is not None and weight.shape != (num_classes,):
            raise RuntimeError(f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}")
        if label_smoothing < 0 or label_smoothing > 1.0:
            raise RuntimeError(f"expected label_smoothing to be in range [0, 1], got {label_smoothing}")
        _nn.modules.loss._WeightedLoss.__init__(self, weight, None, None, reduction)
        self.num_classes, self.out_features, self.options = num_classes, out_features, options
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing
        self.linear = None
        if in_features is not None:
            V = math.prod(out_features, start=num_classes)
            self.linear = _nn.Linear(in_features, V, bias=bias, device=device, dtype=dtype)

    def forward(self, input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``(input, target)`` when built with sizes, else ``(input, linear_weight, target, linear_bias=None)``."""
        if self.linear is None:
            return self._loss(input, *args, **kwargs)
        shape = (self.num_classes, *self.out_features)
        w = self.linear.weight.reshape(*shape, self.linear.in_features)
        b = None if self.linear.bias is None else self.linear.bias.reshape(shape)
        return self._loss(input, w, *args, linear_bias=b, **kwargs)

    def _loss(self, input, linear_weight, target, linear_bias=None) -> torch.Tensor:
        return linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=self.weight, reduction=self.reduction,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing, options=self.options,
            z_loss=self.z_loss, softcap=self.softcap, chunk_size=self.chunk_size,
            fp32_weight_grad=self.fp32_weight_grad, process_group=self.process_group,
        )  # fmt: skip

    def extra_repr(self) -> str:
        parts = []
        if self.linear is not None:
            parts.append(f"in_features={self.linear.in_features}, num_classes={self.num_classes}")
            parts.append(f"out_features={self.out_features}, bias={self.linear.bias is not None}")
        parts.append(f"reduction={self.reduction}, ignore_index={self.ignore_index}")
        parts.append(f"label_smoothing={self.label_smoothing}, options={self.options}")
        extras = dict(z_loss=self.z_loss or None, softcap=self.softcap, chunk_size=self.chunk_size,
                      fp32_weight_grad=self.fp32_weight_grad)  # fmt: skip
        parts += [f"{k}={v}" for k, v in extras.items() if v is not None]
        if self.process_group is not None:
            parts.append("process_group=...")
        return ", ".join(parts)
