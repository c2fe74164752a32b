"""Each family's options as named tuples, as every layer sees them.

The bottom layer: it imports nothing of the package.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class CEOptions(NamedTuple):
    """The scalar options of a cross-entropy / NLL call, after validation and normalisation.

    Attributes:
        ignore_index: target value whose rows contribute nothing (index targets).
        smoothing: label smoothing in ``[0, 1]`` (negative values are normalised to 0, as torch does).
        z_loss: coefficient (``>= 0``) of ``lse**2`` added per non-ignored row.
        softcap: ``c`` in ``c * tanh(x / c)`` applied to the logits, or None.
        prob_target: targets are class probabilities of the input's shape.
        logp_input: the input already holds log-probabilities (``nll_loss``).
    """

    ignore_index: int = -100
    smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    prob_target: bool = False
    logp_input: bool = False


class CESpec(NamedTuple):
    """Options of a cross-entropy family call as the engines take them: ``CESpec(weight, wsum, *CEOptions)``.

    Attributes:
        weight: class weights ``(C,)`` in the input's dtype (any stride), or None.
        weight_sum: ``(1,)`` fp32/fp64 sum of ``weight`` (on the device), or None.
        ignore_index, smoothing, z_loss, softcap, prob_target, logp_input: as in :class:`CEOptions`.
        class_offset: global index of the logits' first class (vocabulary-parallel slices), else 0.
        num_classes: the global class count when the logits are one slice of the classes (then
            ``weight`` is the global ``(C,)`` tensor, ``weight_sum`` its global sum, targets are
            global indices, and the backward's statistics are the global ``(R, 3)`` = max, sum-exp,
            smoothed ``sum_c w_c t_c``); 0 when the logits hold every class.
        bounds: the slice as a ``(2,)`` int64 device tensor ``[class_offset, num_classes]``, in place
            of the two integers (then both stay 0): what a vocabulary-parallel call over a plain
            process group has without reading the ranks' class counts back to the host. Only the
            kernels take it; the reference engine is given the integers.
    """

    weight: torch.Tensor | None = None
    weight_sum: torch.Tensor | None = None
    ignore_index: int = -100
    smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    prob_target: bool = False
    logp_input: bool = False
    class_offset: int = 0
    num_classes: int = 0
    bounds: torch.Tensor | None = None


def is_slice(spec: CESpec) -> bool:
    """Whether ``spec``'s logits are one slice of the classes (vocabulary parallel)."""
    return spec.num_classes > 0 or spec.bounds is not None


def host_slice(spec: CESpec) -> CESpec:
    """``spec`` with device ``bounds`` read back into ``class_offset`` / ``num_classes`` (a host read)."""
    if spec.bounds is None:
        return spec
    offset, total = (int(v) for v in spec.bounds.tolist())
    return spec._replace(class_offset=offset, num_classes=total, bounds=None)


class RegressionOptions(NamedTuple):
    """Options of a regression family call (``l1_loss`` ... ``gaussian_nll_loss``), as its engines take them.

    Attributes:
        loss: ``'l1'``, ``'mse'``, ``'smooth_l1'``, ``'huber'``, ``'poisson'`` or ``'gaussian'``.
        p: beta (smooth_l1, > 0: beta 0 is ``'l1'``), delta (huber) or eps (poisson, gaussian); else 0.
        var: gaussian's variance when the caller gave a number (the third operand is then None).
        full: poisson's Stirling term, gaussian's ``0.5 * log(2 * pi)``.
        log_input: poisson's input holds log-rates.
    """

    loss: str
    p: float = 0.0
    var: float = 0.0
    full: bool = False
    log_input: bool = True


class MarginOptions(NamedTuple):
    """Options of a margin family call (``soft_margin_loss``, ``hinge_embedding_loss``, ``margin_ranking_loss``).

    Attributes:
        loss: ``'soft_margin'``, ``'hinge'`` or ``'ranking'``.
        margin: the margin (hinge, ranking); 0 for soft_margin.
    """

    loss: str
    margin: float = 0.0
