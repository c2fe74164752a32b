"""Shared test utilities: fp64 references and the error-budget comparison of DESIGN.md."""

from __future__ import annotations

import pytest
import torch

# Slack added to the budget, per dtype, relative to the reference's magnitude.
_EPS = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def budget_close(ours: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor | None = None, factor=2.0):
    """Assert ``|ours - ref64| <= factor * |torch_lowp - ref64| + eps * (1 + |ref64|)`` elementwise.

    ``ref64`` is the fp64 reference; ``torch_lowp`` is torch's own result in ``ours``' dtype (its
    error sets the budget). NaN and inf must sit at the same places, with the same signs.
    """
    assert ours.shape == ref64.shape, (ours.shape, ref64.shape)
    o = ours.detach().double().cpu()
    r = ref64.detach().double().cpu()
    nan_o, nan_r = o.isnan(), r.isnan()
    assert torch.equal(nan_o, nan_r), f"NaN positions differ: ours {nan_o.nonzero()[:5]}, ref {nan_r.nonzero()[:5]}"
    inf_o, inf_r = o.isinf(), r.isinf()
    assert torch.equal(inf_o, inf_r), "inf positions differ"
    assert torch.equal(o[inf_o], r[inf_r]), "inf signs differ"
    fin = ~(nan_o | inf_o)
    err = (o - r).abs()[fin]
    allowed = _EPS[ours.dtype] * (1 + r.abs()[fin])
    if torch_lowp is not None:
        allowed = allowed + factor * (torch_lowp.detach().double().cpu() - r).abs()[fin]
    if err.numel():
        worst = (err - allowed).argmax()
        assert bool((err <= allowed).all()), (
            f"error {err[worst].item():.3e} > budget {allowed[worst].item():.3e} "
            f"(ours {o[fin][worst].item():.6e}, ref {r[fin][worst].item():.6e})"
        )


def grads(out: torch.Tensor, inputs, upstream: torch.Tensor | None = None):
    """Gradients of ``out`` w.r.t. ``inputs`` with upstream ``upstream`` (random for non-scalars)."""
    if upstream is None:
        upstream = torch.ones_like(out)
    return torch.autograd.grad(out, inputs, upstream, allow_unused=True)


def same_error(fn_torch, fn_ours, *args, **kwargs):
    """Both calls raise the same exception type with the same message."""
    with pytest.raises(Exception) as e_torch:
        fn_torch(*args, **kwargs)
    with pytest.raises(Exception) as e_ours:
        fn_ours(*args, **kwargs)
    assert type(e_ours.value) is type(e_torch.value), (e_ours.value, e_torch.value)
    assert str(e_ours.value) == str(e_torch.value)
    return e_ours.value
