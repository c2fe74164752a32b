"""torch.compile(fullgraph=True) traces the public functions without graph breaks.

On the torch backend the reference is traced; on the triton backend (the interpreter here, the
GPU in ``-m gpu``) the kernels appear as opaque ``triton_losses::*`` custom ops (each family's test
file runs ``torch.library.opcheck`` on its own ops).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import triton_losses as tl_

pytestmark = pytest.mark.slow


def _losses(x, t, p):
    a = tl_.cross_entropy(x, t, label_smoothing=0.1, z_loss=1e-3, softcap=20.0)
    b = tl_.cross_entropy(x, t, reduction="none").sum()
    c = tl_.cross_entropy(x, p, reduction="sum")
    d = tl_.nll_loss(tl_.log_softmax(x, 1), t) + tl_.softmax(x, 1)[:, 0].sum()
    return a + b + c + d


def _reference(x, t, p):
    lse = torch.logsumexp(20.0 * torch.tanh(x / 20.0), 1)
    a = F.cross_entropy(20.0 * torch.tanh(x / 20.0), t, label_smoothing=0.1) + 1e-3 * (lse**2).mean()
    b = F.cross_entropy(x, t, reduction="none").sum()
    c = F.cross_entropy(x, p, reduction="sum")
    d = F.nll_loss(F.log_softmax(x, 1), t) + F.softmax(x, 1)[:, 0].sum()
    return a + b + c + d


def test_fullgraph_compile_matches_eager(backend, device):
    torch._dynamo.reset()
    x = torch.randn(6, 11, device=device, requires_grad=True)
    t = torch.randint(0, 11, (6,), device=device)
    p = torch.rand(6, 11, device=device).softmax(1)
    compiled = torch.compile(_losses, fullgraph=True, backend="aot_eager" if backend == "triton" else "inductor")
    out = compiled(x, t, p)
    (g,) = torch.autograd.grad(out, x)
    xr = x.detach().clone().requires_grad_()
    ref = _reference(xr, t, p)
    (gr,) = torch.autograd.grad(ref, xr)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, gr, rtol=1e-5, atol=1e-5)


def test_compiled_cpu_call_with_an_out_of_range_target_raises(backend, device):
    """No host read while tracing: on the CPU the compiled graph checks the targets itself and raises a
    ``RuntimeError`` when it runs (torch's compiled ``cross_entropy`` raises one too), not a silent NaN."""
    if device != "cpu":
        pytest.skip("CUDA reports a bad target by the kernels' device assert")
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, t: tl_.cross_entropy(x, t), fullgraph=True,
                             backend="aot_eager" if backend == "triton" else "inductor")  # fmt: skip
    x = torch.randn(4, 7, device=device)
    torch.testing.assert_close(
        compiled(x, torch.tensor([0, 6, -100, 3])), F.cross_entropy(x, torch.tensor([0, 6, -100, 3]))
    )
    for bad in ([0, 7, 1, 2], [0, -1, 1, 2]):
        with pytest.raises(RuntimeError, match="out of bounds"):
            compiled(x, torch.tensor(bad))
    torch._dynamo.reset()
    linear = torch.compile(lambda h, w, t: tl_.linear_cross_entropy(h, w, t), fullgraph=True,
                           backend="aot_eager" if backend == "triton" else "inductor")  # fmt: skip
    h, w = torch.randn(4, 3, device=device), torch.randn(7, 3, device=device)
    with pytest.raises(RuntimeError, match="out of bounds"):
        linear(h, w, torch.tensor([0, 7, 1, 2]))


_WARNING_CALLS = {  # each warns in eager (legacy arguments, KL's 'mean', softmax's implicit dim, broadcasting)
    "cross_entropy": lambda x, t, p: tl_.cross_entropy(x, t, size_average=False),
    "nll_loss": lambda x, t, p: tl_.nll_loss(x.log_softmax(1), t, reduce=False).sum(),
    "bce_with_logits": lambda x, t, p: tl_.binary_cross_entropy_with_logits(x, p, size_average=False),
    "kl_div": lambda x, t, p: tl_.nn.KLDivLoss()(x.log_softmax(1), p),
    "kl_div_legacy": lambda x, t, p: tl_.kl_div(x.log_softmax(1), p, reduce=False).sum(),
    "mse_loss": lambda x, t, p: tl_.mse_loss(x, p, size_average=False),
    "mse_broadcast": lambda x, t, p: tl_.mse_loss(x, p[0]),
    "multilabel_soft_margin": lambda x, t, p: tl_.multilabel_soft_margin_loss(x, p.round(), size_average=False),
    "softmax": lambda x, t, p: tl_.nn.Softmax()(x)[:, 0].sum(),
}


@pytest.mark.parametrize("served_by", ["torch", "reference"])
@pytest.mark.parametrize("name", sorted(_WARNING_CALLS))
def test_calls_that_warn_in_eager_compile_with_fullgraph(name, served_by, request):
    """Dynamo cannot trace ``warnings.warn`` nor torch's string-valued ``legacy_get_string``: a compiled
    call skips the warning (torch's own losses warn at trace time); the eager call still warns."""
    if served_by == "torch":  # the shipped table: small CPU calls go to torch's own function
        request.getfixturevalue("shipped_torch_faster_below")
    torch._dynamo.reset()
    x = torch.randn(6, 5, dtype=torch.float64)
    t, p = torch.randint(0, 5, (6,)), torch.rand(6, 5, dtype=torch.float64)
    fn = _WARNING_CALLS[name]
    with pytest.warns(UserWarning):
        ref = fn(x, t, p)
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(x, t, p), ref)
