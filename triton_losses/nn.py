"""``torch.nn`` loss modules backed by triton_losses' functions.

Each class subclasses the ``torch.nn`` class of the same name, with the same constructor (class
weights registered as buffers, so ``state_dict`` matches torch's), plus keyword-only extras.
"""

from __future__ import annotations

from .bce import BCELoss, BCEWithLogitsLoss
from .cross_entropy import CrossEntropyLoss, NLLLoss
from .ctc import CTCLoss
from .distill import JSDLoss, KLDivWithLogitsLoss
from .embedding import CosineEmbeddingLoss, TripletMarginLoss, TripletMarginWithDistanceLoss
from .kl_div import KLDivLoss
from .linear_cross_entropy import LinearCrossEntropyLoss
from .margin import HingeEmbeddingLoss, MarginRankingLoss, SoftMarginLoss
from .multi_margin import MultiLabelMarginLoss, MultiLabelSoftMarginLoss, MultiMarginLoss
from .regression import GaussianNLLLoss, HuberLoss, L1Loss, MSELoss, PoissonNLLLoss, SmoothL1Loss
from .softmax import LogSoftmax, Softmax

__all__ = [
    "BCELoss",
    "BCEWithLogitsLoss",
    "CTCLoss",
    "CosineEmbeddingLoss",
    "CrossEntropyLoss",
    "GaussianNLLLoss",
    "HingeEmbeddingLoss",
    "HuberLoss",
    "JSDLoss",
    "KLDivLoss",
    "KLDivWithLogitsLoss",
    "L1Loss",
    "LinearCrossEntropyLoss",
    "LogSoftmax",
    "MSELoss",
    "MarginRankingLoss",
    "MultiLabelMarginLoss",
    "MultiLabelSoftMarginLoss",
    "MultiMarginLoss",
    "NLLLoss",
    "PoissonNLLLoss",
    "SmoothL1Loss",
    "SoftMarginLoss",
    "Softmax",
    "TripletMarginLoss",
    "TripletMarginWithDistanceLoss",
]
