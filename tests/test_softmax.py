"""log_softmax / softmax against torch, on the PyTorch reference and on the Triton kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import triton_losses as tl_
from tests.helpers import budget_close

FNS = [(tl_.log_softmax, F.log_softmax), (tl_.softmax, F.softmax)]
IDS = ["log_softmax", "softmax"]


@pytest.mark.parametrize("fns", FNS, ids=IDS)
@pytest.mark.parametrize(
    "shape,dim",
    [((7,), 0), ((5, 9), 1), ((5, 9), 0), ((3, 4, 6), 1), ((3, 4, 6), -1), ((2, 3, 4, 5), 2), ((3, 5000), 1),
     ((2, 40, 3), 1), ((), 0), ((4, 1), 1)],
    ids=str,
)  # fmt: skip
def test_matches_torch_fp64(backend, device, fns, shape, dim):
    ours_fn, torch_fn = fns
    x = (torch.randn(shape, device=device) * 3).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    ours = ours_fn(x, dim)
    ref = torch_fn(x64, dim)
    up = torch.randn(ref.shape, dtype=torch.float64, device=device)
    budget_close(ours, ref)
    budget_close(torch.autograd.grad(ours, x, up.float())[0], torch.autograd.grad(ref, x64, up)[0])


@pytest.mark.parametrize("fns", FNS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes_within_error_budget(backend, device, fns, dtype):
    ours_fn, torch_fn = fns
    x = (torch.randn(6, 300, device=device) * 4).to(dtype)
    xs = x.clone().requires_grad_()
    x64 = x.double().requires_grad_()
    xl = x.clone().requires_grad_()
    up = torch.randn(6, 300, device=device, dtype=torch.float64)
    ours, ref, lowp = ours_fn(xs, 1), torch_fn(x64, 1), torch_fn(xl, 1)
    assert ours.dtype == dtype
    budget_close(ours, ref, lowp)
    g = torch.autograd.grad(ours, xs, up.to(dtype))[0]
    budget_close(g, torch.autograd.grad(ref, x64, up)[0], torch.autograd.grad(lowp, xl, up.to(dtype))[0])


@pytest.mark.parametrize("fns", FNS, ids=IDS)
def test_dtype_argument_upcasts(backend, device, fns):
    ours_fn, torch_fn = fns
    x = torch.randn(4, 7, device=device).to(torch.bfloat16)
    ours = ours_fn(x, 1, dtype=torch.float32)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, torch_fn(x, 1, dtype=torch.float32))
    xi = torch.randint(0, 5, (3, 4), device=device)
    torch.testing.assert_close(ours_fn(xi, 1, dtype=torch.float64), torch_fn(xi, 1, dtype=torch.float64))


@pytest.mark.parametrize("fns", FNS, ids=IDS)
def test_nonfinite_rows(backend, device, fns):
    ours_fn, torch_fn = fns
    inf, nan = float("inf"), float("nan")
    x = torch.tensor(
        [[0.0, -inf, 1.0], [0.0, inf, 1.0], [nan, 0.0, 1.0], [-inf, -inf, -inf], [1e30, -1e30, 0.0]], device=device
    )
    torch.testing.assert_close(ours_fn(x, 1), torch_fn(x, 1), equal_nan=True)


@pytest.mark.parametrize("fns", FNS, ids=IDS)
def test_noncontiguous_and_empty(backend, device, fns):
    ours_fn, torch_fn = fns
    for x in [
        torch.randn(8, 10, device=device)[:, ::3],
        torch.randn(10, 8, device=device).t(),
        torch.randn(3, 4, 5, device=device).permute(2, 0, 1),
        torch.randn(0, 5, device=device),
        torch.randn(4, 0, device=device),
    ]:
        for dim in range(x.dim()):
            xs = x.clone().requires_grad_()
            xr = x.clone().requires_grad_()
            a, b = ours_fn(xs, dim), torch_fn(xr, dim)
            torch.testing.assert_close(a, b)
            up = torch.randn_like(b)
            torch.testing.assert_close(torch.autograd.grad(a, xs, up)[0], torch.autograd.grad(b, xr, up)[0])


@pytest.mark.parametrize("fns", FNS, ids=IDS)
def test_implicit_dim_warns_like_torch(backend, device, fns):
    ours_fn, torch_fn = fns
    x = torch.randn(3, 4, device=device)
    with pytest.warns(UserWarning, match="Implicit dimension choice") as ours_w:
        a = ours_fn(x)
    with pytest.warns(UserWarning) as torch_w:
        b = torch_fn(x)
    torch.testing.assert_close(a, b)
    assert str(ours_w[0].message) == str(torch_w[0].message)


@pytest.mark.parametrize("fns", FNS, ids=IDS)
def test_bad_dim_and_integer_input_raise_like_torch(backend, device, fns):
    from tests.helpers import same_error

    ours_fn, torch_fn = fns
    same_error(torch_fn, ours_fn, torch.randn(3, 4, device=device), 2)
    same_error(torch_fn, ours_fn, torch.randint(0, 3, (3, 4), device=device), 1)
    same_error(torch_fn, ours_fn, torch.randn(3, 4, device=device), 1.5)
    same_error(torch_fn, ours_fn, torch.randn(3, 4, device=device), dim=1.5)
    same_error(torch_fn, ours_fn, [[1.0, 2.0]], 1)


@pytest.mark.parametrize("fns", FNS, ids=IDS)
def test_fp32_accuracy_does_not_fall_with_logit_magnitude(backend, device, fns):
    """At 300 * randn a log-sum-exp rounded to fp32 put 2e-5 absolute error on softmax (torch: 3e-8)."""
    ours_fn, torch_fn = fns
    x = torch.randn(8, 1000, device=device) * 300
    xs, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    x64 = x.double().requires_grad_()
    ours, ref, lowp = ours_fn(xs, 1), torch_fn(x64, 1), torch_fn(xl, 1)
    budget_close(ours, ref, lowp)
    up = torch.randn(8, 1000, device=device, dtype=torch.float64)
    g = torch.autograd.grad(ours, xs, up.float())[0]
    budget_close(g, torch.autograd.grad(ref, x64, up)[0], torch.autograd.grad(lowp, xl, up.float())[0])


@pytest.mark.parametrize("C", [5003, 70001])
def test_bf16_log_softmax_backward_on_long_rows(backend, device, C):
    """The backward works from fp32 statistics of the input, not from the bf16-rounded output."""
    x = (torch.randn(2, C, device=device) * 4).bfloat16()
    xs, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    x64 = x.double().requires_grad_()
    up = torch.randn(2, C, device=device, dtype=torch.float64)
    ours, ref, lowp = tl_.log_softmax(xs, 1), F.log_softmax(x64, 1), F.log_softmax(xl, 1)
    budget_close(ours, ref, lowp)
    g = torch.autograd.grad(ours, xs, up.bfloat16())[0]
    budget_close(g, torch.autograd.grad(ref, x64, up)[0], torch.autograd.grad(lowp, xl, up.bfloat16())[0])


@pytest.mark.parametrize("fns", FNS, ids=IDS)
def test_second_order_gradients(backend, device, fns):
    ours_fn, torch_fn = fns
    x = torch.randn(2, 4, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda v: ours_fn(v, 1), (x,))
    xr = x.detach().clone().requires_grad_()
    up = torch.randn(2, 4, 3, dtype=torch.float64, device=device)
    (g,) = torch.autograd.grad(ours_fn(x, 1), x, up, create_graph=True)
    (gr,) = torch.autograd.grad(torch_fn(xr, 1), xr, up, create_graph=True)
    torch.testing.assert_close(g, gr)
    v = torch.randn_like(g)
    torch.testing.assert_close(torch.autograd.grad(g, x, v)[0], torch.autograd.grad(gr, xr, v)[0])


@pytest.mark.parametrize("fns", FNS, ids=IDS)
def test_cpu_autocast_keeps_the_dtype_like_torch(backend, device, fns):
    if device != "cpu":
        pytest.skip("CPU autocast")
    ours_fn, torch_fn = fns
    x = torch.randn(4, 6).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref = ours_fn(x, 1), torch_fn(x, 1)
    assert ours.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref)


@pytest.mark.interpreter
def test_custom_ops_pass_opcheck(device):
    pytest.importorskip("triton")
    from triton_losses.kernels import softmax as k

    x = torch.randn(3, 7, 2, device=device)
    for log in (True, False):
        torch.library.opcheck(k.softmax_fwd_op, (x, log))
        _, stats = k.softmax_fwd(x, log)
        torch.library.opcheck(k.softmax_bwd_op, (x, stats, torch.randn_like(x), log))


# ---- rows that do not start 16-byte aligned (odd vocabularies such as 50257) ---------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("fns", FNS, ids=IDS)
@pytest.mark.parametrize(
    "dtype,C", [(torch.float64, 1031), (torch.float32, 2051), (torch.float32, 9001), (torch.bfloat16, 4099)], ids=str
)
def test_unaligned_rows_split_for_16_byte_accesses(monkeypatch, fns, dtype, C):
    """With the aligned split on (``_common.row_align``; off under the interpreter by default): rows starting
    at every offset modulo 16 bytes, no whole tile (2051: one masked tile of 4096 fp32), one (4099 bf16: tiles
    of 4096), several (9001); forward and backward (random upstream); -inf in the edge tiles."""
    pytest.importorskip("triton")
    from triton_losses.kernels import _common
    from triton_losses.kernels import softmax as k

    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "triton")
    monkeypatch.setattr(_common, "ALIGN_IN_INTERPRETER", True)
    seen = []
    monkeypatch.setattr(k, "row_align", lambda *a: seen.append(_common.row_align(*a)) or seen[-1])
    ours_fn, torch_fn = fns
    x = (torch.randn(5, C, dtype=torch.float64) * 3).to(dtype)
    x[1, 0] = x[2, -1] = float("-inf")
    xs, x64, xl = x.clone().requires_grad_(), x.double().requires_grad_(), x.clone().requires_grad_()
    up = torch.randn(5, C, dtype=torch.float64)
    ours, ref, lowp = ours_fn(xs, 1), torch_fn(x64, 1), torch_fn(xl, 1)
    budget_close(ours, ref, lowp if dtype == torch.bfloat16 else None)
    g = torch.autograd.grad(ours, xs, up.to(dtype))[0]
    glow = torch.autograd.grad(lowp, xl, up.to(dtype))[0] if dtype == torch.bfloat16 else None
    budget_close(g, torch.autograd.grad(ref, x64, up)[0], glow)
    assert set(seen) == {16 // x.element_size()}, seen
