"""triton-losses: fused Triton GPU kernels for PyTorch losses, with a pure-PyTorch fallback.

The functions mirror ``torch.nn.functional``; the modules in :mod:`triton_losses.nn` mirror
``torch.nn``. Importing the package imports torch and, where triton is installed, triton and
every kernel module (so that ``torch.compile`` can trace calls into them; their ``torch.library``
custom ops are registered then). It queries no device and compiles no kernel: kernels compile on
their first launch. ``TRITON_INTERPRET=1`` (Triton's interpreter for CPU tensors) must therefore be
set before the import.
"""

from . import nn
from .bce import binary_cross_entropy, binary_cross_entropy_with_logits
from .cross_entropy import cross_entropy, nll_loss
from .ctc import ctc_loss
from .distill import jsd, kl_div_with_logits
from .embedding import cosine_embedding_loss, triplet_margin_loss, triplet_margin_with_distance_loss
from .kl_div import kl_div
from .linear_cross_entropy import linear_cross_entropy
from .logprobs import linear_token_logprobs, token_logprobs
from .margin import hinge_embedding_loss, margin_ranking_loss, soft_margin_loss
from .multi_margin import multi_margin_loss, multilabel_margin_loss, multilabel_soft_margin_loss
from .regression import gaussian_nll_loss, huber_loss, l1_loss, mse_loss, poisson_nll_loss, smooth_l1_loss
from .softmax import log_softmax, softmax

__version__ = "0.1.0"

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cosine_embedding_loss",
    "cross_entropy",
    "ctc_loss",
    "gaussian_nll_loss",
    "hinge_embedding_loss",
    "huber_loss",
    "jsd",
    "kl_div",
    "kl_div_with_logits",
    "l1_loss",
    "linear_cross_entropy",
    "linear_token_logprobs",
    "log_softmax",
    "margin_ranking_loss",
    "mse_loss",
    "multi_margin_loss",
    "multilabel_margin_loss",
    "multilabel_soft_margin_loss",
    "nll_loss",
    "nn",
    "poisson_nll_loss",
    "smooth_l1_loss",
    "soft_margin_loss",
    "softmax",
    "token_logprobs",
    "triplet_margin_loss",
    "triplet_margin_with_distance_loss",
]
