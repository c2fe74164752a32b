"""kl_div against torch in fp64, on the PyTorch reference and on the Triton kernels."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import triton_losses as tl_
from tests.fp64_checks import check_against_fp64
from tests.helpers import same_error
from tests.op_counts import HOST_SYNCS, count_ops
from triton_losses.reference import _chunks

REDUCTIONS = ["none", "mean", "sum", "batchmean"]
# (input shape, target shape): equal shapes, 0-d, 1-D, broadcasting of either operand, empty.
SHAPES = [
    ((), ()),
    ((6,), (6,)),
    ((4, 5), (4, 5)),
    ((2, 3, 4), (2, 3, 4)),
    ((5,), (4, 5)),
    ((4, 5), (1, 5)),
    ((4, 1), (4, 5)),
    ((3, 1, 4), (2, 4)),
    ((2, 700), (2, 700)),
    ((0, 3), (0, 3)),
]


def _kl_tensors(x_shape, t_shape, log_target, device, zeros=True):
    x = torch.randn(x_shape, device=device) - 1.5  # log-probabilities need not be normalised
    t = torch.rand(t_shape, device=device)
    if zeros and t.numel() > 2:
        t.view(-1)[::3] = 0.0  # exact zeros: xlogy(0, 0) = 0 (and a NaN target gradient, as in torch)
    if log_target:
        t = torch.randn(t_shape, device=device) - 1.0
    return {"input": x, "target": t}


def _quiet(fn):
    def run(**kw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(**kw)

    return run


def check_kl_div_matches_fp64(backend, device, shapes, log_target, reduction, dtype=torch.float64):
    tensors = _kl_tensors(*shapes, log_target, device)
    out, _ = check_against_fp64(
        _quiet(lambda **kw: tl_.kl_div(**kw, reduction=reduction, log_target=log_target)),
        _quiet(lambda **kw: F.kl_div(**kw, reduction=reduction, log_target=log_target)),
        tensors, ("input", "target"), dtype,
    )  # fmt: skip
    full = torch.broadcast_shapes(*shapes)
    assert out.shape == (full if reduction == "none" else ())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("shapes", SHAPES, ids=str)
def test_kl_div_matches_fp64(backend, device, shapes, log_target, reduction):
    check_kl_div_matches_fp64(backend, device, shapes, log_target, reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shapes", [SHAPES[3], SHAPES[7], SHAPES[8]], ids=str)
def test_kl_div_fp32_within_budget(backend, device, shapes, reduction):
    for log_target in (False, True):
        check_kl_div_matches_fp64(backend, device, shapes, log_target, reduction, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shapes", [SHAPES[3], SHAPES[7], SHAPES[8]], ids=str)
def test_kl_div_reference_many_chunks(backend, device, shapes, dtype, monkeypatch):
    """The CPU reference with tiny chunks: many chunks per call, broadcast operands, chunks of chunks."""
    if backend != "torch":
        pytest.skip("the chunking is the reference's")
    monkeypatch.setattr(_chunks, "CHUNK_ELEMS", 7)
    for reduction in REDUCTIONS:
        for log_target in (False, True):
            check_kl_div_matches_fp64(backend, device, shapes, log_target, reduction, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_low_precision_within_budget(backend, device, log_target, reduction, dtype):
    tensors = _kl_tensors((32, 50), (32, 50), log_target, device, zeros=False)
    check_against_fp64(
        _quiet(lambda **kw: tl_.kl_div(**kw, reduction=reduction, log_target=log_target)),
        _quiet(lambda **kw: F.kl_div(**kw, reduction=reduction, log_target=log_target)),
        tensors, ("input", "target"), dtype,
    )  # fmt: skip


def test_kl_div_nan_and_inf_like_torch(backend, device):
    x = torch.tensor([0.3, -1.0, float("-inf"), 0.2, 0.5, float("-inf")], device=device)
    t = torch.tensor([0.0, 0.5, 0.0, -0.1, float("nan"), 0.3], device=device)
    for log_target, tt in ((False, t), (True, torch.tensor([float("-inf"), 0.5, 0.0, -0.1, float("inf"), 1.0]))):
        check_against_fp64(
            lambda **kw: tl_.kl_div(**kw, reduction="none", log_target=log_target),  # noqa: B023
            lambda **kw: F.kl_div(**kw, reduction="none", log_target=log_target),  # noqa: B023
            {"input": x, "target": tt.to(device)}, ("input", "target"), torch.float32,
        )  # fmt: skip


def test_mean_warns_like_torch_and_batchmean_does_not(backend, device):
    x, t = torch.randn(3, 4, device=device).log_softmax(1), torch.rand(3, 4, device=device)
    with pytest.warns(UserWarning) as ours:
        tl_.kl_div(x, t)
    with pytest.warns(UserWarning) as ref:
        F.kl_div(x, t)
    assert [str(w.message) for w in ours] == [str(w.message) for w in ref]
    assert ours[0].filename == __file__  # points at the caller, as torch's stacklevel does
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tl_.kl_div(x, t, reduction="batchmean")
        tl_.kl_div(x, t, reduction="sum")


def test_legacy_arguments_and_their_batchmean_quirk(backend, device):
    x, t = torch.randn(3, 4, device=device).log_softmax(1), torch.rand(3, 4, device=device)
    cases = [
        {"size_average": False},
        {"reduce": False},
        {"size_average": True},
        {"size_average": False, "reduction": "batchmean"},
    ]
    for kw in cases:
        with warnings.catch_warnings(record=True) as w_ours:
            warnings.simplefilter("always")
            ours = tl_.kl_div(x, t, **kw)
        with warnings.catch_warnings(record=True) as w_ref:
            warnings.simplefilter("always")
            ref = F.kl_div(x, t, **kw)
        assert [str(w.message) for w in w_ours] == [str(w.message) for w in w_ref]
        torch.testing.assert_close(ours, ref)


def test_backward_twice_and_inputs_untouched(backend, device):
    x = torch.randn(3, 7, device=device).log_softmax(1).requires_grad_()
    t = torch.rand(3, 7, device=device, requires_grad=True)
    x0, t0 = x.detach().clone(), t.detach().clone()
    loss = tl_.kl_div(x, t, reduction="batchmean") * 3.0
    loss.backward(retain_graph=True)
    g1 = (x.grad.clone(), t.grad.clone())
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * g1[0])
    torch.testing.assert_close(t.grad, 2 * g1[1])
    assert torch.equal(x.detach(), x0) and torch.equal(t.detach(), t0)


def test_noncontiguous_views_match_contiguous(backend, device):
    x = torch.randn(8, 6, device=device).log_softmax(1)[::2]
    t = torch.rand(6, 4, device=device).t()
    for log_target in (False, True):
        a = tl_.kl_div(x, t, reduction="none", log_target=log_target)
        b = tl_.kl_div(x.contiguous(), t.contiguous(), reduction="none", log_target=log_target)
        torch.testing.assert_close(a, b)


def test_gradcheck_fp64(backend, device):
    x = torch.randn(3, 4, dtype=torch.float64, device=device, requires_grad=True)
    t = (torch.rand(3, 4, dtype=torch.float64, device=device) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: tl_.kl_div(a, b, reduction="batchmean"), (x, t))
    assert torch.autograd.gradcheck(lambda a, b: tl_.kl_div(a, b, reduction="sum", log_target=True), (x, t))


def test_cpu_autocast_computes_in_fp32_like_torch(backend, device):
    if device != "cpu":
        pytest.skip("CPU autocast")
    x, t = torch.randn(4, 6, dtype=torch.bfloat16), torch.rand(4, 6, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref = tl_.kl_div(x, t, reduction="sum"), F.kl_div(x, t, reduction="sum")
    assert ours.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(ours, ref)


def test_mixed_dtypes_are_left_to_torch(backend, device):
    x, t = torch.randn(4, 5, device=device), torch.rand(4, 5, device=device, dtype=torch.float64)
    if backend == "triton":
        with pytest.raises(NotImplementedError, match="kl_div"):
            tl_.kl_div(x, t, reduction="sum")
    else:
        torch.testing.assert_close(tl_.kl_div(x, t, reduction="sum"), F.kl_div(x, t, reduction="sum"))


KL_ERRORS = {
    "not-broadcastable": lambda d: ((torch.randn(4, 5, device=d), torch.rand(4, 6, device=d)), {"reduction": "sum"}),
    "integer-input": lambda d: ((torch.ones(4, 5, dtype=torch.long, device=d), torch.rand(4, 5, device=d)), {}),
    "integer-target": lambda d: ((torch.randn(4, 5, device=d), torch.ones(4, 5, dtype=torch.long, device=d)), {}),
    "bad-reduction": lambda d: ((torch.randn(4, 5, device=d), torch.rand(4, 5, device=d)), {"reduction": "avg"}),
}


@pytest.mark.parametrize("case", KL_ERRORS)
def test_kl_div_errors_match_torch(backend, device, case):
    args, kw = KL_ERRORS[case](device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same_error(F.kl_div, tl_.kl_div, *args, **kw)


def test_kl_div_module_matches_torch(backend, device):
    assert issubclass(tl_.nn.KLDivLoss, nn.KLDivLoss)
    for kw in [{"reduction": "batchmean"}, {"reduction": "none", "log_target": True}, {}]:
        ours, ref = tl_.nn.KLDivLoss(**kw), nn.KLDivLoss(**kw)
        assert repr(ours) == repr(ref) and ours.log_target == ref.log_target and ours.reduction == ref.reduction
        assert ours.state_dict().keys() == ref.state_dict().keys()
        x = torch.randn(3, 5, dtype=torch.float64, device=device).log_softmax(1).requires_grad_()
        t = torch.rand(3, 5, dtype=torch.float64, device=device)
        with warnings.catch_warnings(record=True) as w_ours:
            warnings.simplefilter("always")
            a = ours(x, t)
        with warnings.catch_warnings(record=True) as w_ref:
            warnings.simplefilter("always")
            b = ref(x, t)
        assert [str(w.message) for w in w_ours] == [str(w.message) for w in w_ref]
        torch.testing.assert_close(a, b)
        up = torch.randn_like(b)
        torch.testing.assert_close(torch.autograd.grad(a, x, up)[0], torch.autograd.grad(b, x, up)[0])


def test_log_target_must_be_a_bool_as_in_torch(backend, device):
    x, t = torch.randn(3, 4, device=device).log_softmax(1), torch.rand(3, 4, device=device)
    for bad in (1, 0, None, torch.tensor(True)):
        same_error(F.kl_div, tl_.kl_div, x, t, reduction="sum", log_target=bad)


@pytest.mark.parametrize("case", ["input", "target"])
def test_python_lists_raise_torchs_error(backend, device, case):
    t = torch.rand(3, device=device)
    args = ([0.5, 0.5, 0.5], t) if case == "input" else (t, [0.5, 0.5, 0.5])
    same_error(F.kl_div, tl_.kl_div, *args, reduction="sum")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("log_target", [False, True])
def test_double_backward_matches_torch(backend, device, reduction, log_target):
    d = torch.float64
    x = torch.randn(3, 4, dtype=d, device=device).log_softmax(1).requires_grad_()
    t = (torch.randn(1, 4, dtype=d, device=device) - 1.0) if log_target else torch.rand(1, 4, dtype=d, device=device)
    t.requires_grad_()  # broadcast along dim 0: its gradients are summed back
    up = torch.randn(3, 4, dtype=d, device=device)

    def second(fn):
        def loss(a, b):
            out = fn(a, b, reduction=reduction, log_target=log_target)
            return (out * up).sum() if reduction == "none" else out

        gx, gt = torch.autograd.grad(_quiet(loss)(a=x, b=t), (x, t), create_graph=True)
        return torch.autograd.grad((gx * up).sum() + (gt * up[:1]).sum(), (x, t))

    for a, b in zip(second(tl_.kl_div), second(F.kl_div)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradgradcheck_fp64(backend, device):
    x = torch.randn(2, 3, dtype=torch.float64, device=device, requires_grad=True)
    t = (torch.rand(2, 3, dtype=torch.float64, device=device) + 0.1).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a, b: tl_.kl_div(a, b, reduction="batchmean"), (x, t))
    assert torch.autograd.gradgradcheck(lambda a, b: tl_.kl_div(a, b, reduction="none", log_target=True), (x, t))


def test_sliced_and_stride0_operands_are_read_in_place(backend, device):
    x = torch.randn(4, 10, dtype=torch.float64, device=device).log_softmax(1)[:, ::2]
    targets = [
        torch.rand(1, 5, dtype=torch.float64, device=device).expand(4, 5),
        torch.rand(5, 4, dtype=torch.float64, device=device).t(),
        torch.rand(4, 1, dtype=torch.float64, device=device).expand(4, 5),
    ]
    for t in targets:
        for reduction in ("none", "sum", "batchmean"):
            ours = tl_.kl_div(x, t, reduction=reduction)
            torch.testing.assert_close(ours, F.kl_div(x.contiguous(), t.contiguous(), reduction=reduction))


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
def test_cpu_autocast_follows_torchs_policy(backend, device, autocast_dtype, dtype):
    """kl_div is an fp32 op of torch's CPU autocast: fp16 / bf16 in, fp32 out; fp64 untouched."""
    if device != "cpu":
        pytest.skip("CPU autocast")
    x = torch.randn(4, 6, dtype=dtype, requires_grad=True)
    t = torch.rand(4, 6, dtype=dtype)
    for reduction in ("sum", "none", "batchmean"):
        with torch.autocast("cpu", dtype=autocast_dtype):
            ours, ref = tl_.kl_div(x, t, reduction=reduction), F.kl_div(x, t, reduction=reduction)
        assert ours.dtype == ref.dtype
        torch.testing.assert_close(ours, ref)
        up = torch.randn_like(ref)
        g_ours, g_ref = torch.autograd.grad(ours, x, up)[0], torch.autograd.grad(ref, x, up)[0]
        assert g_ours.dtype == g_ref.dtype == dtype
        torch.testing.assert_close(g_ours, g_ref)


@pytest.mark.interpreter
@pytest.mark.parametrize("reduction", ["mean", "batchmean"])
def test_reduced_kl_is_at_most_three_device_ops(device, reduction, monkeypatch):
    """One launch (partial sums already divided by numel / the batch size), one sum, one cast; no host sync."""
    from triton_losses.kernels import kl_div as k_kl

    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "triton")
    x = torch.randn(8, 50, dtype=torch.bfloat16, device=device).log_softmax(1)
    t = torch.rand(8, 50, dtype=torch.bfloat16, device=device)
    out = []
    ops, launches = count_ops(
        _quiet(lambda: out.append(tl_.kl_div(x, t, reduction=reduction))), [(k_kl, "launch_forward")], monkeypatch
    )
    assert launches["launch_forward"] == 1 and len(ops) + 1 <= 3 and not HOST_SYNCS & set(ops), ops
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = F.kl_div(x.double(), t.double(), reduction=reduction)
    torch.testing.assert_close(out[0].double(), ref, rtol=1e-2, atol=1e-3)


@pytest.mark.interpreter
def test_custom_ops_pass_opcheck(device):
    pytest.importorskip("triton")
    from triton_losses.kernels import kl_div as k_kl

    x, y = torch.randn(3, 4, device=device), torch.rand(3, 4, device=device)
    g = torch.ones((), device=device).expand(3, 4)
    torch.library.opcheck(k_kl._kl_fwd_op, (x, y, False, False, 1))
    torch.library.opcheck(k_kl._kl_fwd_op, (x, y, True, True, 3))
    torch.library.opcheck(k_kl._kl_bwd_op, (x, y, True, g, True, False))
    torch.library.opcheck(k_kl._kl_bwd_op, (x, y, False, torch.randn(3, 4, device=device), True, True))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
def test_fullgraph_compile_matches_eager(backend, device):
    torch._dynamo.reset()
    lp = torch.randn(4, 5, device=device).log_softmax(1).requires_grad_()
    t = torch.rand(4, 5, device=device, requires_grad=True)

    def losses(m, lp, t):
        return m.kl_div(lp[:1], t, reduction="batchmean") + m.kl_div(lp, lp.detach(), reduction="sum", log_target=True)

    compiled = torch.compile(
        functools.partial(losses, tl_), fullgraph=True, backend="aot_eager" if backend == "triton" else "inductor"
    )
    out, ref = compiled(lp, t), losses(F, lp, t)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(torch.autograd.grad(out, (lp, t)), torch.autograd.grad(ref, (lp, t))):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
