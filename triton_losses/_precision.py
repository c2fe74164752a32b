"""The accumulation dtype rule, shared by every layer: fp64 data accumulates in fp64, all else in fp32."""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a loss over ``dtype`` data accumulates and returns its statistics in."""
    return torch.float64 if dtype == torch.float64 else torch.float32
