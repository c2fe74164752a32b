"""torch.compile(fullgraph=True) traces BCE / KL / JSD / distillation-KL; their custom ops pass opcheck.

On the torch backend the reference is traced; on the triton backend (the interpreter here, the
GPU in ``-m gpu``) the kernels appear as opaque ``triton_losses::*`` custom ops.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import triton_losses as tl_

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")]


def _losses(x, t, p, lp, s, labels):
    a = tl_.binary_cross_entropy_with_logits(x, t, weight=t[0], pos_weight=torch.full_like(t[0], 2.0))
    b = tl_.binary_cross_entropy(p, t, reduction="none").sum()
    c = tl_.kl_div(lp[:1], t, reduction="batchmean") + tl_.kl_div(lp, lp.detach(), reduction="sum", log_target=True)
    d = tl_.jsd(lp, lp.detach().flip(0), beta=0.3, labels=labels)
    e = tl_.kl_div_with_logits(s, s.detach() * 2, temperature=2.0, labels=labels, reduction="none").sum()
    return a + b + c + d + e


def _reference(x, t, p, lp, s, labels):
    keep = labels != -100
    a = F.binary_cross_entropy_with_logits(x, t, weight=t[0], pos_weight=torch.full_like(t[0], 2.0))
    b = F.binary_cross_entropy(p, t, reduction="none").sum()
    c = F.kl_div(lp[:1], t, reduction="sum") / 1 + F.kl_div(lp, lp.detach(), reduction="sum", log_target=True)
    log_m = torch.log(0.3 * lp.detach().flip(0).exp() + 0.7 * lp.exp())
    kl = lambda log_a, log_b: F.kl_div(log_b, log_a, reduction="none", log_target=True).sum(-1)
    d = ((0.3 * kl(lp.detach().flip(0), log_m) + 0.7 * kl(lp, log_m)) * keep).sum() / keep.sum()
    rows = kl(F.log_softmax(s.detach(), -1), F.log_softmax(s / 2, -1))
    return a + b + c + d + (rows * keep).sum()


def test_fullgraph_compile_matches_eager(backend, device):
    torch._dynamo.reset()
    x = torch.randn(4, 5, device=device, requires_grad=True)
    t = torch.rand(4, 5, device=device)
    p = (torch.rand(4, 5, device=device) * 0.9 + 0.05).requires_grad_()
    lp = torch.randn(4, 5, device=device).log_softmax(1).requires_grad_()
    s = torch.randn(4, 5, device=device, requires_grad=True)
    labels = torch.tensor([1, -100, 3, 0], device=device)
    compiled = torch.compile(_losses, fullgraph=True, backend="aot_eager" if backend == "triton" else "inductor")
    out = compiled(x, t, p, lp, s, labels)
    grads = torch.autograd.grad(out, (x, p, lp, s))
    ref = _reference(x, t, p, lp, s, labels)
    ref_grads = torch.autograd.grad(ref, (x, p, lp, s))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
def test_custom_ops_pass_opcheck(device):
    pytest.importorskip("triton")
    from triton_losses.kernels import ops_losses as ops

    x, y = torch.randn(3, 4, device=device), torch.rand(3, 4, device=device)
    w, pw = torch.rand(4, device=device).expand(3, 4), torch.rand(3, 1, device=device).expand(3, 4)
    g = torch.ones((), device=device).expand(3, 4)
    torch.library.opcheck(ops._bce_fwd_op, (x, y, w, pw, True, True))
    torch.library.opcheck(ops._bce_fwd_op, (x.sigmoid(), y, None, None, False, False))
    torch.library.opcheck(ops._bce_bwd_op, (x, y, w, pw, True, g, True, True))
    torch.library.opcheck(ops._kl_fwd_op, (x, y, False, False))
    torch.library.opcheck(ops._kl_bwd_op, (x, y, True, g, True, False))
    a3, b3 = x.log_softmax(1).view(1, 3, 4), y.log_softmax(1).view(1, 3, 4)
    labels = torch.tensor([[0, -100, 2]], device=device)
    gscale = torch.full((1,), 0.5, device=device)
    torch.library.opcheck(ops._jsd_fwd_op, (a3, b3, labels, 0.3, -100))
    torch.library.opcheck(ops._jsd_bwd_op, (a3, b3, None, 0.0, -100, gscale, True, True))
    stats = ops._kd_fwd_op(a3, b3, labels, 0.5, -100)
    torch.library.opcheck(ops._kd_fwd_op, (a3, b3, labels, 0.5, -100))
    torch.library.opcheck(ops._kd_bwd_op, (a3, b3, labels, 0.5, -100, stats, gscale, True, False))


def test_aot_cases_cover_every_launch_configuration():
    """Tier 3 compiles the block shapes ``aot_cases`` lists: every shape a launcher can choose must be there."""
    pytest.importorskip("triton")
    from triton_losses.kernels import _elementwise, binary, divergence, kl_logits
    from triton_losses.kernels._common import launch_config

    for itemsize in (2, 4, 8):
        tile = _elementwise.tile_for(itemsize)
        blocks = set(_elementwise.reachable_blocks(tile))
        assert {_elementwise.block_config(d, tile) for d in range(1, 20000)} <= blocks
    names = {repr(c).split("[")[0] for m in (binary, divergence, kl_logits) for c in m.aot_cases()}
    assert names == {"_bce_fwd_kernel", "_bce_bwd_kernel", "_kl_fwd_kernel", "_kl_bwd_kernel", "_jsd_kernel",
                     "_kd_kernel", "_scale_kernel"}  # fmt: skip
    for itemsize in (2, 4, 8):
        rows = set(divergence.row_configs(itemsize))
        vocab = [*range(1, 5000), 32000, 50257, 128256, 151936, 262144, 300000]
        assert {launch_config(v, itemsize, True) for v in vocab} <= rows
        listed = {(c.constexprs["BLOCK_R"], c.constexprs["BLOCK_C"], c.num_warps) for c in kl_logits.aot_cases()}
        assert rows <= listed
