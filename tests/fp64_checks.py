"""Compare one of our losses with its fp64 oracle: loss and gradients, within the error budget.

Used by the binary / divergence / distillation tests. ``ours`` runs in the tested dtype,
``oracle`` in fp64 on the same values; for fp32/fp16/bf16 the oracle evaluated in the tested
dtype (torch's own error there) sets the budget, as ``tests.helpers.budget_close`` defines it.
"""

from __future__ import annotations

import torch

from tests.helpers import budget_close


def check_against_fp64(ours, oracle, tensors: dict, grad_names=(), dtype=torch.float64, lowp_oracle=True, up=None):
    """Run ``ours(**tensors)`` in ``dtype`` and ``oracle(**tensors)`` in fp64; compare loss and gradients.

    Args:
        ours: our function, called with keyword tensors.
        oracle: the fp64 reference, same keywords.
        tensors: name -> tensor (float tensors are cast to ``dtype`` / fp64; others passed as is).
        grad_names: names of the tensors whose gradients are compared.
        dtype: the dtype our function runs in.
        lowp_oracle: also run ``oracle`` in ``dtype`` to set the error budget (not for fp64).
        up: upstream gradient (fp64); default random for non-scalar outputs, 1.7 for scalars.

    Returns:
        ``(out, ref)``: our output and the fp64 oracle's.
    """

    def cast(d):
        out = {}
        for k, v in tensors.items():
            if isinstance(v, torch.Tensor) and v.dtype.is_floating_point:
                v = v.detach().to(d)
                if k in grad_names:
                    v.requires_grad_()
            out[k] = v
        return out

    mine, ref_in = cast(dtype), cast(torch.float64)
    out = ours(**mine)
    ref = oracle(**ref_in)
    assert out.dtype == dtype, (out.dtype, dtype)
    if up is None:
        up = torch.randn(ref.shape, dtype=torch.float64, device=ref.device) if ref.dim() else torch.tensor(1.7)
    up = up.to(ref.device)
    low = None
    if lowp_oracle and dtype != torch.float64:
        low_in = cast(dtype)
        low = oracle(**low_in)
    budget_close(out, ref, low)
    if grad_names:
        g_out = torch.autograd.grad(out, [mine[k] for k in grad_names], up.to(out.dtype))
        g_ref = torch.autograd.grad(ref, [ref_in[k] for k in grad_names], up)
        g_low = [None] * len(grad_names)
        if low is not None:
            g_low = torch.autograd.grad(low, [low_in[k] for k in grad_names], up.to(low.dtype))
        for name, a, b, c in zip(grad_names, g_out, g_ref, g_low):
            assert a.shape == b.shape and a.dtype == dtype, (name, a.shape, b.shape, a.dtype)
            try:
                budget_close(a, b, c)
            except AssertionError as e:
                raise AssertionError(f"gradient w.r.t. {name}: {e}") from e
    return out, ref
