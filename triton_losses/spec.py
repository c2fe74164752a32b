"""The options of one cross-entropy / NLL call, as every implementation layer sees them."""

from __future__ import annotations

from typing import NamedTuple

import torch


class CESpec(NamedTuple):
    """Options of a cross-entropy family call, after validation and normalisation.

    Attributes:
        weight: class weights ``(C,)`` in the input's dtype, or None.
        weight_sum: ``(1,)`` fp32/fp64 sum of ``weight`` (on the device), or None.
        ignore_index: target value whose rows contribute nothing (index targets).
        smoothing: label smoothing in ``[0, 1]`` (negative values are normalised to 0, as torch does).
        z_loss: coefficient of ``lse**2`` added per non-ignored row.
        softcap: ``c`` in ``c * tanh(x / c)`` applied to the logits, or None.
        prob_target: targets are class probabilities of the input's shape.
        logp_input: the input already holds log-probabilities (``nll_loss``).
    """

    weight: torch.Tensor | None = None
    weight_sum: torch.Tensor | None = None
    ignore_index: int = -100
    smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    prob_target: bool = False
    logp_input: bool = False
