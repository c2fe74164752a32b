"""``torch.nn`` loss modules backed by triton_losses' functions.

Each class subclasses the ``torch.nn`` class of the same name, with the same constructor (class
weights registered as buffers, so ``state_dict`` matches torch's), plus keyword-only extras.
"""

from __future__ import annotations

import torch
from torch import nn as _nn

from .binary import binary_cross_entropy, binary_cross_entropy_with_logits
from .cross_entropy import cross_entropy, nll_loss
from .divergence import jsd, kl_div, kl_div_with_logits
from .linear_cross_entropy import linear_cross_entropy
from .softmax import log_softmax, softmax

__all__ = [
    "BCELoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "JSDLoss",
    "KLDivLoss",
    "KLDivWithLogitsLoss",
    "LinearCrossEntropyLoss",
    "LogSoftmax",
    "NLLLoss",
    "Softmax",
]


class Softmax(_nn.Softmax):
    """``torch.nn.Softmax`` computed by :func:`triton_losses.softmax`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return softmax(input, self.dim, _stacklevel=5)


class LogSoftmax(_nn.LogSoftmax):
    """``torch.nn.LogSoftmax`` computed by :func:`triton_losses.log_softmax`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return log_softmax(input, self.dim, _stacklevel=5)


class NLLLoss(_nn.NLLLoss):
    """``torch.nn.NLLLoss`` computed by :func:`triton_losses.nll_loss`."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nll_loss(input, target, weight=self.weight, ignore_index=self.ignore_index, reduction=self.reduction)


class CrossEntropyLoss(_nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` computed by :func:`triton_losses.cross_entropy`.

    Extra keyword-only arguments: ``z_loss``, ``softcap`` and ``inplace_backward``, as in
    :func:`triton_losses.cross_entropy`.
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
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap
        self.inplace_backward = inplace_backward

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
        )

    def extra_repr(self) -> str:
        extras = []
        if self.z_loss:
            extras.append(f"z_loss={self.z_loss}")
        if self.softcap is not None:
            extras.append(f"softcap={self.softcap}")
        if self.inplace_backward:
            extras.append("inplace_backward=True")
        return ", ".join(extras)


class BCELoss(_nn.BCELoss):
    """``torch.nn.BCELoss`` computed by :func:`triton_losses.binary_cross_entropy` (``weight`` is a buffer)."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return binary_cross_entropy(input, target, weight=self.weight, reduction=self.reduction)


class BCEWithLogitsLoss(_nn.BCEWithLogitsLoss):
    """``torch.nn.BCEWithLogitsLoss`` computed by :func:`triton_losses.binary_cross_entropy_with_logits`.

    ``weight`` and ``pos_weight`` are buffers, as in torch.
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return binary_cross_entropy_with_logits(
            input, target, self.weight, pos_weight=self.pos_weight, reduction=self.reduction
        )


class KLDivLoss(_nn.KLDivLoss):
    """``torch.nn.KLDivLoss`` computed by :func:`triton_losses.kl_div` (same 'mean' warning as torch)."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return kl_div(input, target, reduction=self.reduction, log_target=self.log_target)


class JSDLoss(_nn.Module):
    """Generalised Jensen-Shannon divergence between rows of log-probabilities: :func:`triton_losses.jsd`.

    ``forward(input, target, labels=None)``: student and teacher log-probabilities ``(*, V)``,
    optional ``(*)`` labels masking rows equal to ``ignore_index``.
    """

    def __init__(self, beta: float = 0.5, ignore_index: int = -100, reduction: str = "batchmean") -> None:
        super().__init__()
        self.beta, self.ignore_index, self.reduction = beta, ignore_index, reduction

    def forward(self, input: torch.Tensor, target: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return jsd(
            input, target, beta=self.beta, ignore_index=self.ignore_index, labels=labels, reduction=self.reduction
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"


class KLDivWithLogitsLoss(_nn.Module):
    """Distillation KL from logits: :func:`triton_losses.kl_div_with_logits`.

    ``KL(softmax(teacher / T) || softmax(student / T))`` per row, masked and reduced.

    ``forward(student_logits, teacher_logits, labels=None)``: logits ``(*, V)``, optional ``(*)``
    labels masking rows equal to ``ignore_index``.
    """

    def __init__(self, temperature: float = 1.0, ignore_index: int = -100, reduction: str = "batchmean") -> None:
        super().__init__()
        self.temperature, self.ignore_index, self.reduction = temperature, ignore_index, reduction

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        return kl_div_with_logits(
            student_logits,
            teacher_logits,
            temperature=self.temperature,
            ignore_index=self.ignore_index,
            labels=labels,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"


_TorchLinearCrossEntropyLoss = getattr(_nn, "LinearCrossEntropyLoss", None)  # torch >= 2.13


class LinearCrossEntropyLoss(_TorchLinearCrossEntropyLoss or _nn.modules.loss._WeightedLoss):
    """Cross-entropy of a linear layer's output, by :func:`triton_losses.linear_cross_entropy`.

    Built from options only, it owns nothing but them (class weights are a buffer) and is called
    as ``loss(input, linear_weight, target, linear_bias=None)``, so the caller's ``lm_head``
    weight is passed in and no ``(N, V)`` logits are ever held.

    Subclasses ``torch.nn.LinearCrossEntropyLoss`` where torch has it (>= 2.13), and built like it,
    ``LinearCrossEntropyLoss(in_features, num_classes, bias=..., device=..., dtype=...)``, it is a
    drop-in for it: it owns ``self.linear`` (same ``state_dict``) and is called as ``loss(input, target)``.
    K-dimensional ``out_features`` are not supported.

    Extra keyword-only arguments: ``z_loss``, ``softcap``, ``chunk_size`` and ``fp32_weight_grad``,
    as in the function.
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
        ignore_index: int | None = -100,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
        fp32_weight_grad: bool | None = None,
    ) -> None:
        if (in_features is None) != (num_classes is None):
            raise TypeError("LinearCrossEntropyLoss: give both in_features and num_classes, or neither")
        if tuple(out_features):
            raise NotImplementedError("LinearCrossEntropyLoss: K-dimensional out_features are not supported")
        if in_features is not None and _TorchLinearCrossEntropyLoss is not None:
            _TorchLinearCrossEntropyLoss.__init__(
                self, in_features, num_classes, bias=bias, device=device, dtype=dtype, reduction=reduction,
                weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
            )  # fmt: skip
        else:
            _nn.modules.loss._WeightedLoss.__init__(self, weight, None, None, reduction)
            self.num_classes, self.out_features, self.options = num_classes, (), None
            self.ignore_index, self.label_smoothing = ignore_index, label_smoothing
            if in_features is not None:
                self.linear = _nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
            else:
                self.linear = None
        self.z_loss, self.softcap, self.chunk_size = z_loss, softcap, chunk_size
        self.fp32_weight_grad = fp32_weight_grad

    def forward(self, input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``(input, linear_weight, target, linear_bias=None)``, or ``(input, target)`` when built with a layer."""
        if self.linear is None:
            return self._loss(input, *args, **kwargs)
        return self._loss(input, self.linear.weight, *args, linear_bias=self.linear.bias, **kwargs)

    def _loss(
        self,
        input: torch.Tensor,
        linear_weight: torch.Tensor,
        target: torch.Tensor,
        linear_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return linear_cross_entropy(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=-100 if self.ignore_index is None else self.ignore_index,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            chunk_size=self.chunk_size,
            fp32_weight_grad=self.fp32_weight_grad,
        )

    def extra_repr(self) -> str:
        parts = []
        if self.linear is not None:
            parts.append(f"in_features={self.linear.in_features}, num_classes={self.num_classes}")
            parts.append(f"bias={self.linear.bias is not None}")
        parts.append(f"reduction={self.reduction!r}, ignore_index={self.ignore_index}")
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if self.z_loss:
            parts.append(f"z_loss={self.z_loss}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap}")
        if self.chunk_size is not None:
            parts.append(f"chunk_size={self.chunk_size}")
        if self.fp32_weight_grad is not None:
            parts.append(f"fp32_weight_grad={self.fp32_weight_grad}")
        return ", ".join(parts)
