"""``token_logprobs`` and ``linear_token_logprobs`` against plain torch, on both backends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import triton_losses
from tests.helpers import budget_close, same_error


def torch_logprobs(logits: torch.Tensor, tokens: torch.Tensor, T: float, dtype=None):
    """Plain torch: ``log_softmax(logits / T)[tokens]`` and ``-(p * log p).sum(-1)`` (0 where p = 0)."""
    z = logits if dtype is None else logits.to(dtype)
    logp_all = torch.log_softmax(z / T, -1)
    logp = logp_all.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    ent = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
    return logp, ent


def _upstream(like: torch.Tensor) -> torch.Tensor:
    return torch.randn(like.shape, dtype=like.dtype)


def _check_token(logits, tokens, T, entropy, lowp=False):
    """Forward and backward (random upstream on both outputs) against fp64 torch (and torch in low precision)."""
    x = logits.detach().requires_grad_()
    out = triton_losses.token_logprobs(x, tokens, temperature=T, return_entropy=entropy)
    outs = out if entropy else (out,)
    ups = [_upstream(o) for o in outs]
    (gx,) = torch.autograd.grad(outs, x, ups)
    x64 = logits.detach().double().requires_grad_()
    ref = torch_logprobs(x64, tokens, T)[: len(outs)]
    (g64,) = torch.autograd.grad(ref, x64, [u.double() for u in ups])
    low = glow = None
    if lowp:  # torch's own result in the logits' dtype sets the budget
        xl = logits.detach().requires_grad_()
        low = torch_logprobs(xl, tokens, T)[: len(outs)]
        (glow,) = torch.autograd.grad(low, xl, [u.to(xl.dtype) for u in ups])
    for i, (o, r) in enumerate(zip(outs, ref)):
        assert o.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
        assert o.shape == tokens.shape
        budget_close(o, r, None if low is None else low[i].float())
    assert gx.dtype == logits.dtype
    budget_close(gx, g64, glow)


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize(
    "shape,V,T",
    [((5,), 37, 1.0), ((2, 3), 300, 0.7), ((2,), 2500, 1.3), ((), 19, 2.0)],
    ids=["2d", "3d-T0.7", "online-loop", "1d"],
)
def test_token_logprobs_fp64(backend, shape, V, T, entropy):
    logits = torch.randn(*shape, V, dtype=torch.float64) * 3
    tokens = torch.randint(0, V, shape)
    _check_token(logits, tokens, T, entropy)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_token_logprobs_low_precision_budget(backend, dtype):
    logits = (torch.randn(6, 200) * 4).to(dtype)
    tokens = torch.randint(0, 200, (6,))
    _check_token(logits, tokens, 0.9, True, lowp=True)


def test_strided_logits_and_int32_tokens(backend):
    base = torch.randn(40, 9, dtype=torch.float64)
    logits = base.t()[:, ::2]  # (9, 20), columns strided
    tokens = torch.randint(0, 20, (9,), dtype=torch.int32)
    _check_token(logits, tokens, 1.0, True)


def test_non_finite_logits(backend):
    logits = torch.randn(4, 16, dtype=torch.float64)
    logits[0, 3] = float("-inf")  # a -inf class: its probability term is 0
    logits[1, :] = float("-inf")  # every class -inf: NaN, as torch's log_softmax
    logits[2, 5] = float("nan")
    logits[3, 7] = float("-inf")
    tokens = torch.tensor([1, 2, 0, 7])  # row 3's token is the -inf class: logp = -inf
    x = logits.requires_grad_()
    lp, ent = triton_losses.token_logprobs(x, tokens, return_entropy=True)
    ref_lp, ref_ent = torch_logprobs(logits.detach(), tokens, 1.0)
    budget_close(lp, ref_lp)
    budget_close(ent, ref_ent)
    assert lp[3] == float("-inf") and torch.isfinite(ent[[0, 3]]).all()
    (g,) = torch.autograd.grad(ent[0], x)  # the -inf class gets a zero gradient, not NaN
    assert g[0, 3] == 0 and torch.isfinite(g[0]).all()


def test_empty(backend):
    x = torch.randn(0, 7, requires_grad=True)
    lp, ent = triton_losses.token_logprobs(x, torch.zeros(0, dtype=torch.long), return_entropy=True)
    assert lp.shape == ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert x.grad.shape == (0, 7)


def test_only_one_output_differentiated(backend):
    logits = torch.randn(3, 50, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 50, (3,))
    lp, ent = triton_losses.token_logprobs(logits, tokens, temperature=1.5, return_entropy=True)
    ref_lp, ref_ent = torch_logprobs(logits, tokens, 1.5)
    for ours, ref in ((lp, ref_lp), (ent, ref_ent)):
        up = torch.randn(3, dtype=torch.float64)
        (g,) = torch.autograd.grad(ours, logits, up, retain_graph=True)
        (gr,) = torch.autograd.grad(ref, logits, up, retain_graph=True)
        budget_close(g, gr)


def test_double_backward(backend):
    logits = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 6, (3,))

    def fn(x):
        lp, ent = triton_losses.token_logprobs(x, tokens, temperature=0.8, return_entropy=True)
        return lp, ent

    assert torch.autograd.gradgradcheck(fn, (logits,))


def test_errors_match_torch(backend):
    x = torch.randn(3, 5)
    bad = torch.tensor([1, 5, 2])
    same_error(lambda: torch.log_softmax(x, -1).gather(-1, bad[:, None]), lambda: triton_losses.token_logprobs(x, bad))
    neg = torch.tensor([0, -1, 2])
    same_error(lambda: torch.log_softmax(x, -1).gather(-1, neg[:, None]), lambda: triton_losses.token_logprobs(x, neg))
    flt = torch.tensor([1.0, 2.0, 0.0])
    same_error(lambda: torch.log_softmax(x, -1).gather(-1, flt[:, None]), lambda: triton_losses.token_logprobs(x, flt))
    ints = torch.ones(3, 5, dtype=torch.long)
    same_error(lambda: torch.log_softmax(ints, -1), lambda: triton_losses.token_logprobs(ints, bad))
    with pytest.raises(ValueError, match="tokens must have shape"):
        triton_losses.token_logprobs(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="temperature"):
        triton_losses.token_logprobs(x, torch.tensor([1, 2, 3]), temperature=0.0)
    with pytest.raises(ValueError, match="0-d"):
        triton_losses.token_logprobs(torch.tensor(1.0), torch.tensor(0))


# ---- linear_token_logprobs --------------------------------------------------------------------


def _check_linear(x, w, b, tokens, T, entropy, chunk, lowp=False):
    ins = [v.detach().requires_grad_() for v in (x, w, b) if v is not None]
    xb = ins[2] if b is not None else None
    out = triton_losses.linear_token_logprobs(ins[0], ins[1], tokens, linear_bias=xb, temperature=T,
                                              return_entropy=entropy, chunk_size=chunk)  # fmt: skip
    outs = out if entropy else (out,)
    ups = [_upstream(o) for o in outs]
    grads = torch.autograd.grad(outs, ins, ups)
    ins64 = [v.detach().double().requires_grad_() for v in ins]
    logits64 = F.linear(ins64[0], ins64[1], ins64[2] if b is not None else None)
    ref = torch_logprobs(logits64, tokens, T)[: len(outs)]
    grads64 = torch.autograd.grad(ref, ins64, [u.double() for u in ups])
    low = glow = [None] * len(ins)
    if lowp:  # torch's usual low-precision path: 16-bit logits, log-softmax in fp32
        insl = [v.detach().requires_grad_() for v in ins]
        logits = F.linear(insl[0], insl[1], insl[2] if b is not None else None)
        low = torch_logprobs(logits, tokens, T, dtype=torch.float32)[: len(outs)]
        glow = torch.autograd.grad(low, insl, ups)
    for o, r, lo in zip(outs, ref, low):
        assert o.shape == tokens.shape
        budget_close(o, r, lo)
    for g, r, lo in zip(grads, grads64, glow):
        assert g.dtype == x.dtype
        budget_close(g, r, lo)


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [None, 5])
def test_linear_token_logprobs_fp64(backend, entropy, bias, chunk):
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    w = torch.randn(70, 16, dtype=torch.float64) * 0.5
    b = torch.randn(70, dtype=torch.float64) if bias else None
    tokens = torch.randint(0, 70, (2, 9))
    _check_linear(x, w, b, tokens, 0.8, entropy, chunk)


def test_linear_token_logprobs_bf16_budget(backend):
    x = torch.randn(12, 32).to(torch.bfloat16)
    w = (torch.randn(96, 32) * 0.3).to(torch.bfloat16)
    b = torch.randn(96).to(torch.bfloat16)
    tokens = torch.randint(0, 96, (12,))
    _check_linear(x, w, b, tokens, 1.0, True, 4, lowp=True)


def test_linear_double_backward(backend):
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 5, (4,))

    def fn(x, w, b):
        return triton_losses.linear_token_logprobs(x, w, tokens, linear_bias=b, return_entropy=True, chunk_size=3)

    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_linear_errors_match_torch(backend):
    x, w = torch.randn(4, 8), torch.randn(10, 8)
    same_error(
        lambda: F.linear(x, torch.randn(10, 7)),
        lambda: triton_losses.linear_token_logprobs(x, torch.randn(10, 7), torch.zeros(4, dtype=torch.long)),
    )
    same_error(
        lambda: F.linear(x, w.double()),
        lambda: triton_losses.linear_token_logprobs(x, w.double(), torch.zeros(4, dtype=torch.long)),
    )
    bad = torch.tensor([0, 10, 1, 2])
    same_error(lambda: F.linear(x, w).gather(-1, bad[:, None]), lambda: triton_losses.linear_token_logprobs(x, w, bad))
    with pytest.raises(ValueError, match="chunk_size"):
        triton_losses.linear_token_logprobs(x, w, torch.zeros(4, dtype=torch.long), chunk_size=0)


# ---- tracing ------------------------------------------------------------------------------------


def _rl_step(x, h, w, b, t_x, t_h):
    lp, ent = triton_losses.token_logprobs(x, t_x, temperature=0.8, return_entropy=True)
    lp2, ent2 = triton_losses.linear_token_logprobs(h, w, t_h, linear_bias=b, return_entropy=True, chunk_size=4)
    adv = torch.linspace(-1, 1, lp.numel(), dtype=lp.dtype)
    return -(adv * lp).sum() - 0.01 * ent.sum() - lp2.sum() + ent2.mean()


def test_fullgraph_compile_matches_eager(backend):
    torch._dynamo.reset()
    x = torch.randn(6, 11, requires_grad=True)
    h, w, b = (
        torch.randn(10, 8, requires_grad=True),
        torch.randn(11, 8, requires_grad=True),
        torch.randn(11, requires_grad=True),
    )
    t_x, t_h = torch.randint(0, 11, (6,)), torch.randint(0, 11, (10,))
    compiled = torch.compile(_rl_step, fullgraph=True, backend="aot_eager")
    out = compiled(x, h, w, b, t_x, t_h)
    grads = torch.autograd.grad(out, (x, h, w, b))
    ref = _rl_step(x, h, w, b, t_x, t_h)
    grads_ref = torch.autograd.grad(ref, (x, h, w, b))
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)


@pytest.mark.interpreter
def test_custom_ops_pass_opcheck():
    pytest.importorskip("triton")
    from triton_losses import _linear_logprobs_chunks as chunks
    from triton_losses.kernels import logprobs as k

    x = torch.randn(3, 7)
    t = torch.randint(0, 7, (3,))
    _, ent, m, s = k.logprobs_fwd(x, t, 0.9, True)
    torch.library.opcheck(k._logprobs_fwd_op, (x, t, 0.9, True))
    torch.library.opcheck(k._logprobs_fwd_op, (x, t, 1.0, False))
    torch.library.opcheck(k._logprobs_bwd_op, (x, t, m, s, ent, torch.randn(3), torch.randn(3), 0.9))
    torch.library.opcheck(k._logprobs_bwd_op, (x, t, m, s, ent, None, torch.randn(3), 0.9))
    h, w, b = torch.randn(5, 4), torch.randn(7, 4), torch.randn(7)
    th = torch.randint(0, 7, (5,))
    _, ent, m, s = chunks._fwd_op(h, w, b, th, 1.1, True, 2)
    torch.library.opcheck(chunks._fwd_op, (h, w, b, th, 1.1, True, 2))
    args = (h, w, b, th, m, s, ent, torch.randn(5), torch.randn(5), [True, True, False], 1.1, 2, torch.float32)
    torch.library.opcheck(chunks._bwd_op, args)


# ---- rows that do not start 16-byte aligned (odd vocabularies such as 50257) ---------------------


@pytest.fixture
def aligned_split(monkeypatch):
    """The kernels' aligned split (``_common.row_align``), on for CPU tensors too; returns the ALIGNs launched."""
    pytest.importorskip("triton")
    from triton_losses.kernels import _common
    from triton_losses.kernels import logprobs as k

    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "triton")
    monkeypatch.setattr(_common, "ALIGN_IN_INTERPRETER", True)
    seen = []

    def recorded(*args):
        seen.append(_common.row_align(*args))
        return seen[-1]

    monkeypatch.setattr(k, "row_align", recorded)
    return seen


UNALIGNED = [(torch.float64, 1031), (torch.float32, 1030), (torch.float32, 4097), (torch.float32, 9001)]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,V", [*UNALIGNED, (torch.bfloat16, 4099)], ids=str)
def test_unaligned_rows_split_for_16_byte_accesses(aligned_split, dtype, V):
    """Rows of an odd length start at every offset modulo 16 bytes: heads of every length; no whole tile
    (V = 1030: one masked tile of 2048), one (4097), several (9001: fp32 tiles of 4096); both outputs
    differentiated; non-finite logits and tokens in the edge tile."""
    logits = (torch.randn(5, V, dtype=torch.float64) * 3).to(dtype)
    logits[1, 0] = logits[2, -1] = float("-inf")
    tokens = torch.randint(0, V, (5,))
    tokens[3], tokens[4] = 0, V - 1  # tokens in the edge tile
    _check_token(logits, tokens, 0.8, True, lowp=dtype == torch.bfloat16)
    _check_token(logits, tokens, 1.0, False, lowp=dtype == torch.bfloat16)
    assert set(aligned_split) == {16 // logits.element_size()}


@pytest.mark.interpreter
def test_unaligned_linear_token_logprobs(aligned_split):
    """The chunked linear path: its logits buffer rows of an odd vocabulary, the gradient written in place."""
    x, w = torch.randn(2, 7, 16), torch.randn(1031, 16) * 0.3
    _check_linear(x, w, torch.randn(1031), torch.randint(0, 1031, (2, 7)), 0.9, True, 4)
    assert set(aligned_split) == {4}
