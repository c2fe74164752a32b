"""The one routing decision: which engine serves a call of a loss family.

Every family has one engine per backend with the same interface: ``reference.<family>`` (plain
PyTorch, the CPU fallback and the oracle's twin) and ``kernels.<family>`` (Triton launchers). Under
``torch.compile`` (or CUDA-graph capture) the kernels are served by ``kernels.<family>.TRACED``: the
same functions as ``torch.library`` custom ops, which dynamo keeps opaque. Public modules ask
``engine(family, ...)`` once per call and never branch on the backend themselves.

``TRITON_LOSSES_BACKEND`` (read at every call) = ``auto`` (default) | ``triton`` | ``torch``:

* ``auto``: CUDA tensors run the Triton kernels; CPU tensors run the PyTorch reference, except
  when ``TRITON_INTERPRET=1`` is set, where CPU tensors run the kernels through Triton's interpreter.
* ``triton``: always the kernels; a call they cannot serve raises ``NotImplementedError``.
* ``torch``: always the PyTorch reference.

The kernel modules are imported with the package (``torch.compile`` cannot trace an import;
importing triton queries no device), so ``TRITON_INTERPRET`` must be set before ``import triton_losses``.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from .reference import bce as _r_bce
from .reference import cross_entropy as _r_cross_entropy
from .reference import ctc as _r_ctc
from .reference import distill as _r_distill
from .reference import embedding as _r_embedding
from .reference import kl_div as _r_kl_div
from .reference import logprobs as _r_logprobs
from .reference import margin as _r_margin
from .reference import multi_margin as _r_multi_margin
from .reference import regression as _r_regression
from .reference import softmax as _r_softmax

# family -> reference engine; one line per family.
_REFERENCE: dict[str, ModuleType] = {
    "bce": _r_bce,
    "cross_entropy": _r_cross_entropy,
    "ctc": _r_ctc,
    "distill": _r_distill,
    "embedding": _r_embedding,
    "kl_div": _r_kl_div,
    "logprobs": _r_logprobs,
    "margin": _r_margin,
    "multi_margin": _r_multi_margin,
    "regression": _r_regression,
    "softmax": _r_softmax,
}

try:
    import triton  # noqa: F401
except ImportError:  # no wheels on some platforms: the reference serves every call
    _KERNELS: dict[str, ModuleType] = {}
else:
    from .kernels import bce as _k_bce
    from .kernels import cross_entropy as _k_cross_entropy
    from .kernels import ctc as _k_ctc
    from .kernels import distill as _k_distill
    from .kernels import embedding as _k_embedding
    from .kernels import kl_div as _k_kl_div
    from .kernels import logprobs as _k_logprobs
    from .kernels import margin as _k_margin
    from .kernels import multi_margin as _k_multi_margin
    from .kernels import regression as _k_regression
    from .kernels import softmax as _k_softmax

    # family -> kernels engine; one line per family.
    _KERNELS = {
        "bce": _k_bce,
        "cross_entropy": _k_cross_entropy,
        "ctc": _k_ctc,
        "distill": _k_distill,
        "embedding": _k_embedding,
        "kl_div": _k_kl_div,
        "logprobs": _k_logprobs,
        "margin": _k_margin,
        "multi_margin": _k_multi_margin,
        "regression": _k_regression,
        "softmax": _k_softmax,
    }

_BACKENDS = ("auto", "triton", "torch")

# op -> element count (of its first tensor) below which torch's own CPU function serves a call that
# the PyTorch reference would otherwise serve. Below these sizes a call is dominated by fixed Python
# cost (argument checks, the autograd Function, the chunk loop: ~0.1-0.2 ms), which torch's C++
# functions do not pay; above them the reference's fused chunked pass is the faster one. Measured on
# the 2-core CPU machine, one thread, fp32, forward + backward with 'mean'
# (``python bench/cpu_crossover.py``: three runs, the largest crossover; bench/results/cpu-crossover.md;
# 2**62: a run found torch's function faster at the largest size measured, 2**24). Tests empty this table
# (tests/conftest.py) so that they exercise the reference at every size.
TORCH_FASTER_BELOW: dict[str, int] = {
    "l1_loss": 2**22,
    "mse_loss": 2**24,
    "smooth_l1_loss": 2**24,
    "huber_loss": 2**62,
    "poisson_nll_loss": 2**18,
    "gaussian_nll_loss": 2**18,
    "hinge_embedding_loss": 2**16,
    "margin_ranking_loss": 2**18,
    "multilabel_soft_margin_loss": 2**18,
    "multi_margin_loss": 2**24,
    "multilabel_margin_loss": 2**24,
    "cosine_embedding_loss": 2**20,
    "triplet_margin_loss": 2**22,
    "triplet_margin_with_distance_loss": 2**22,
    "log_softmax": 2**62,
    "softmax": 2**62,
}


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter (CPU tensors run the kernels)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """Whether ``triton`` could be imported."""
    return bool(_KERNELS)


def tracing() -> bool:
    """True while dynamo traces or a CUDA graph is being captured (no data-dependent host work then)."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def compiling() -> bool:
    """True while dynamo traces: calls then go through the kernels' custom ops, and no forward keeps a
    fused gradient on its autograd context. A CUDA-graph capture is not compiling: it runs the eager
    path (which has no host sync by default) so that the kernels it launches are exactly those the
    eager warm-up compiled (a Triton kernel cannot be compiled and loaded while a stream captures)."""
    return torch.compiler.is_compiling()


def _mode_value() -> str:
    """``TRITON_LOSSES_BACKEND`` as written (normalised, not checked)."""
    return os.environ.get("TRITON_LOSSES_BACKEND", "auto").strip().lower() or "auto"


def _mode() -> str:
    mode = _mode_value()
    if mode not in _BACKENDS:
        raise ValueError(f"TRITON_LOSSES_BACKEND must be one of {_BACKENDS}, got {mode!r}")
    return mode


def torch_serves(op: str, x) -> bool:
    """Whether torch's own function serves this call of ``op`` outright (public functions ask first).

    True for a non-empty fp32 / fp64 CPU tensor ``x`` (the call's first tensor; the dtypes measured,
    and 0-element calls stay ours: torch's CPU multi-margin losses return an uninitialised 'mean'
    there) that the PyTorch reference would serve, smaller than ``TORCH_FASTER_BELOW[op]`` elements.
    Ops whose results differ from torch's by design (``soft_margin_loss``: finite where torch
    overflows) are not in the table. Never raises: anything else is left to the usual path.
    """
    below = TORCH_FASTER_BELOW.get(op)
    if below is None or not isinstance(x, torch.Tensor) or x.device.type != "cpu":
        return False
    if x.dtype not in (torch.float32, torch.float64) or not 0 < x.numel() < below:
        return False
    mode = _mode_value()
    return mode == "torch" or (mode == "auto" and not (interpreting() and triton_available()))


def backend(*tensors: torch.Tensor | None, op: str, unsupported: str | None = None) -> str:
    """``"triton"`` or ``"torch"`` for a call of ``op`` on ``tensors``.

    Args:
        tensors: the call's tensors (None entries are skipped); the first decides the device.
        op: the public function's name, for error messages.
        unsupported: why the kernels cannot serve this call, or None when they can.

    Raises:
        NotImplementedError: ``TRITON_LOSSES_BACKEND=triton`` and the kernels cannot serve the call.
    """
    mode = _mode()
    if mode == "torch":
        return "torch"
    x = next(t for t in tensors if t is not None)
    device_ok = x.is_cuda or (x.device.type == "cpu" and interpreting())
    if mode == "auto":
        return "triton" if device_ok and unsupported is None and triton_available() else "torch"
    if unsupported is not None:
        raise NotImplementedError(f"triton_losses.{op}: the Triton kernels do not support {unsupported}")
    if not triton_available():
        raise NotImplementedError(f"triton_losses.{op}: TRITON_LOSSES_BACKEND=triton but triton is not installed")
    if not device_ok:
        raise NotImplementedError(
            f"triton_losses.{op}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU "
            f"tensors), got a tensor on {x.device}"
        )
    return "triton"


def engine(family: str, *tensors: torch.Tensor | None, op: str, unsupported: str | None = None):
    """The engine serving this call of ``family``: the reference module, the kernels module, or
    the kernels' custom ops (``kernels.<family>.TRACED``) while dynamo traces. See :func:`backend`."""
    if backend(*tensors, op=op, unsupported=unsupported) == "torch":
        return _REFERENCE[family]
    kernels = _KERNELS[family]
    return kernels.TRACED if compiling() else kernels


def reference(family: str) -> ModuleType:
    """The reference engine of ``family`` (for callers that must stay on the PyTorch path)."""
    return _REFERENCE[family]
