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
from .softmax import log_softmax, softmax

__all__ = [
    "BCELoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "JSDLoss",
    "KLDivLoss",
    "KLDivWithLogitsLoss",
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
