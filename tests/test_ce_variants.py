"""The cross-entropy forward's variants (``kernels.cross_entropy.VARIANTS``): each exact, and the choice.

``rows`` (one program per block of rows) and ``persistent`` (fewer programs than blocks, taking blocks
in turn; L2 eviction hints) must give the same loss and gradient as the fp64 oracle under every
option, at shapes where the persistent programs each take several blocks (the interpreter's grid is
sized from 4 fake SMs and a 4 MiB L2).
"""

from __future__ import annotations

import pytest
import torch

import triton_losses as tl_
from tests.ce_reference import ref_cross_entropy
from tests.helpers import budget_close

pytest.importorskip("triton")
from triton_losses.kernels import cross_entropy as k

pytestmark = pytest.mark.interpreter

OPTIONS = [
    dict(),
    dict(weight=True, ignore_index=2, label_smoothing=0.1),
    dict(z_loss=1e-3, softcap=20.0),
]


@pytest.mark.parametrize("variant", k.VARIANTS)
@pytest.mark.parametrize("opts", OPTIONS, ids=["plain", "weighted-ignore-smoothing", "zloss-softcap"])
@pytest.mark.parametrize(("N", "C"), [(37, 2048), pytest.param(37, 8192, marks=pytest.mark.slow), (301, 96)])
def test_variant_matches_the_oracle(monkeypatch, device, variant, opts, N, C):
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "triton")
    monkeypatch.setenv(k.VARIANT_ENV, variant)
    opts = dict(opts)
    weight = torch.rand(C, device=device) + 0.5 if opts.pop("weight", False) else None
    x = (torch.randn(N, C, device=device) * 3).requires_grad_()
    t = torch.randint(0, C, (N,), device=device)
    t[::5] = opts.get("ignore_index", -100)
    launched = []
    real = k.persistent_programs
    monkeypatch.setattr(k, "persistent_programs", lambda *a: launched.append(real(*a)) or launched[-1])
    monkeypatch.setattr(k, "sm_count", lambda d: 4)  # a device of 4 SMs (the interpreter's), on a GPU too
    monkeypatch.setattr(k, "_l2_bytes", lambda d: 4 << 20)
    loss = tl_.cross_entropy(x, t, weight=weight, **opts)
    (g,) = torch.autograd.grad(loss, x)
    ref = ref_cross_entropy(x.detach(), t, weight, **opts)
    x64 = x.detach().double().requires_grad_()
    (gref,) = torch.autograd.grad(ref_cross_entropy(x64, t, weight, **opts), x64)
    budget_close(loss, ref)
    budget_close(g, gref)
    if variant == "persistent":
        blocks = -(-N // k.launch_config(C, 4, True)[0])
        assert launched and launched[0] <= blocks
        if N == 37:  # 32 programs (8 per fake SM) for 37 one-row blocks
            assert launched[0] < blocks  # some programs take more than one block


def test_default_variant_table():
    big = k.PERSISTENT_MIN_ROW_BYTES
    assert k.default_variant(big // 2, 2, True, True) == "persistent"
    assert k.default_variant(big // 2 - 1, 2, True, True) == "rows"
    assert k.default_variant(big, 1, True, False) == "rows"  # loss-only: one read per row
    assert k.default_variant(big, 4, False, True) == "rows"  # K-dim rows (classes strided)


def test_variant_override_and_its_error(monkeypatch, device):
    x = torch.randn(2, 4, 1, device=device)
    monkeypatch.setenv(k.VARIANT_ENV, " Persistent ")
    assert k.ce_variant(x, write_grad=False) == "persistent"
    monkeypatch.setenv(k.VARIANT_ENV, "fast")
    with pytest.raises(ValueError, match="TRITON_LOSSES_CE_VARIANT must be one of"):
        k.ce_variant(x, write_grad=True)


def test_persistent_grid_keeps_half_the_l2_in_flight(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(k, "sm_count", lambda d: 132)
    monkeypatch.setattr(k, "_l2_bytes", lambda d: 50 << 20)
    row = 128256 * 2  # a bf16 LM row
    assert k.persistent_programs(cuda, 8192, row) == 132  # 25 MiB / 250 KiB = 102 rows < SMs: one per SM
    assert k.persistent_programs(cuda, 8192, 32 * 1024) == 800  # 800 blocks of 32 KiB in 25 MiB
    assert k.persistent_programs(cuda, 8192, 256) == 132 * 8  # capped at 8 per SM
    assert k.persistent_programs(cuda, 50, 256) == 50  # never more programs than blocks
