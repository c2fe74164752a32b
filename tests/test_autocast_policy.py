"""torch's autocast policy for the losses beyond cross-entropy, BCE and KL (their own files test theirs).

On torch's fp32 list (multi_margin, multilabel_margin, cosine_embedding, triplet_margin, and ctc on
the CPU): 16-bit operands are computed in fp32 and the loss is fp32, as torch's. Composites that
autocast meets op by op (gaussian_nll, multilabel_soft_margin, triplet_margin_with_distance): torch
serves the call, for its values to the bit (``TRITON_LOSSES_BACKEND=triton`` says the kernels do not).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import triton_losses as tl_


def _operands(device):
    bf = torch.bfloat16
    x = torch.randn(8, 5, device=device, dtype=bf)
    multilabel = torch.full((8, 5), -1, device=device)
    multilabel[:, 0], multilabel[:, 1] = 1, 3
    T, N, C = 12, 2, 6
    lp = torch.randn(T, N, C, device=device, dtype=bf).log_softmax(2)
    ctc = (lp, torch.randint(1, C, (N, 4), device=device), torch.full((N,), T), torch.full((N,), 4))
    return x, multilabel, ctc


FP32_LIST = {
    "multi_margin_loss": lambda m, x, ml, ctc: m.multi_margin_loss(x, torch.arange(8, device=x.device) % 5),
    "multilabel_margin_loss": lambda m, x, ml, ctc: m.multilabel_margin_loss(x, ml),
    "cosine_embedding_loss": lambda m, x, ml, ctc: m.cosine_embedding_loss(
        x, x.flip(0), torch.where(torch.arange(8, device=x.device) % 2 == 0, 1.0, -1.0).to(x.device)
    ),
    "triplet_margin_loss": lambda m, x, ml, ctc: m.triplet_margin_loss(x, x.flip(0), -x, swap=True),
    "ctc_loss": lambda m, x, ml, ctc: m.ctc_loss(*ctc),
}

COMPOSITES = {
    "gaussian_nll_loss": lambda m, x, ml, ctc: m.gaussian_nll_loss(x, x.flip(0), x.abs() + 0.1),
    "multilabel_soft_margin_loss": lambda m, x, ml, ctc: m.multilabel_soft_margin_loss(x, (ml > 0).float()),
    "triplet_margin_with_distance_loss": lambda m, x, ml, ctc: m.triplet_margin_with_distance_loss(x, x.flip(0), -x),
}


@pytest.mark.parametrize("name", sorted(FP32_LIST))
def test_fp32_list_losses_compute_in_fp32_under_autocast(backend, device, name):
    if name == "ctc_loss" and device != "cpu":
        pytest.skip("ctc_loss is on torch's CPU autocast list only")
    x, ml, ctc = _operands(device)
    fn = FP32_LIST[name]
    with torch.autocast(device, dtype=torch.bfloat16):
        ours, ref = fn(tl_, x, ml, ctc), fn(F, x, ml, ctc)
    assert ours.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)  # both fp32 computations of the same bf16 values
    x.requires_grad_()
    ctc[0].requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        ours = fn(tl_, x, ml, ctc)
    grads = torch.autograd.grad(ours, ctc[0] if name == "ctc_loss" else x)
    assert grads[0].dtype == torch.bfloat16  # back through the cast, in the operand's dtype


@pytest.mark.parametrize("name", sorted(COMPOSITES))
def test_composites_under_autocast_are_torchs(backend, device, name):
    x, ml, ctc = _operands(device)
    fn = COMPOSITES[name]
    with torch.autocast(device, dtype=torch.bfloat16):
        if backend == "triton":
            with pytest.raises(NotImplementedError, match="do not support"):
                fn(tl_, x, ml, ctc)
            return
        ours, ref = fn(tl_, x, ml, ctc), fn(F, x, ml, ctc)
    assert ours.dtype == ref.dtype
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
