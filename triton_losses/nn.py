"""``torch.nn`` loss modules backed by triton_losses' functions.

Each class subclasses the ``torch.nn`` class of the same name, with the same constructor (class
weights registered as buffers, so ``state_dict`` matches torch's), plus keyword-only extras.
"""

from __future__ import annotations

import torch
from torch import nn as _nn

from .cross_entropy import cross_entropy, nll_loss
from .softmax import log_softmax, softmax

__all__ = ["CrossEntropyLoss", "LogSoftmax", "NLLLoss", "Softmax"]


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
