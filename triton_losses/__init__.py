"""triton-losses: fused Triton GPU kernels for PyTorch losses, with a pure-PyTorch fallback.

The functions mirror ``torch.nn.functional``; the modules in :mod:`triton_losses.nn` mirror
``torch.nn``. Nothing is imported from triton, and no device is queried, at import time.
"""

from . import nn
from .binary import binary_cross_entropy, binary_cross_entropy_with_logits
from .cross_entropy import cross_entropy, nll_loss
from .divergence import jsd, kl_div, kl_div_with_logits
from .linear_cross_entropy import linear_cross_entropy
from .softmax import log_softmax, softmax

__version__ = "0.1.0"

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "jsd",
    "kl_div",
    "kl_div_with_logits",
    "linear_cross_entropy",
    "log_softmax",
    "nll_loss",
    "nn",
    "softmax",
]
