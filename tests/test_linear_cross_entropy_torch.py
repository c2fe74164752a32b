"""linear_cross_entropy and LinearCrossEntropyLoss against torch 2.13's own: signature, defaults,
options, K-dimensional weights, and exception types and messages.

torch's ``F.linear_cross_entropy`` / ``nn.LinearCrossEntropyLoss`` are the oracle where they exist
(torch >= 2.13); the tests that need them are skipped before. Values are compared in fp64.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import triton_losses as tl_
from tests.helpers import same_error
from triton_losses import _linear_ce_composite as composite

lce = importlib.import_module("triton_losses.linear_cross_entropy")

needs_torch_lce = pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch < 2.13")
REDUCTIONS = ["none", "mean", "sum"]
EXTRAS = ("z_loss", "softcap", "chunk_size", "fp32_weight_grad")


def _f64(*shape, device, grad=True):
    return torch.randn(*shape, dtype=torch.float64, device=device).requires_grad_(grad)


def _compare(ours, ref, inputs, reduction):
    """Same loss and same gradients for ``inputs`` under a random upstream gradient."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    # The kernels take scalar options as fp32 (``smoothing / C`` is rounded there): ~1e-8 of the scale.
    torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-8)
    up = torch.randn(ref.shape, dtype=ref.dtype, device=ref.device) if reduction == "none" else torch.tensor(1.3)
    for g, r in zip(torch.autograd.grad(ours, inputs, up), torch.autograd.grad(ref, inputs, up)):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-8)


@needs_torch_lce
def test_signature_is_torchs_plus_keyword_only_extras():
    theirs = list(inspect.signature(F.linear_cross_entropy).parameters.values())
    ours = list(inspect.signature(tl_.linear_cross_entropy).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[: len(theirs)]] == [(p.name, p.kind, p.default) for p in theirs]
    assert [p.name for p in ours[len(theirs) :]] == [*EXTRAS, "process_group"]  # the function's vocab-parallel group
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(theirs) :])
    theirs = inspect.signature(torch.nn.LinearCrossEntropyLoss.__init__).parameters
    ours = inspect.signature(tl_.nn.LinearCrossEntropyLoss.__init__).parameters
    for name, p in theirs.items():
        if name not in ("in_features", "num_classes"):  # ours may also be built without sizes
            assert (ours[name].kind, ours[name].default) == (p.kind, p.default), name
    assert all(ours[name].kind is inspect.Parameter.KEYWORD_ONLY for name in EXTRAS)


@needs_torch_lce
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignore_index_defaults_to_none_as_torch(backend, device, reduction):
    """torch's default ``ignore_index=None`` means -100 for index targets and is required for probabilities."""
    x, w, b = _f64(7, 4, device=device), _f64(9, 4, device=device), _f64(9, device=device)
    t = torch.randint(0, 9, (7,), device=device)
    t[[1, 4]] = -100
    p = torch.rand(7, 9, dtype=torch.float64, device=device).softmax(-1)
    for target in (t, p):
        for kw in ({}, {"ignore_index": None}):
            ours = tl_.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction, chunk_size=3, **kw)
            ref = F.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction, **kw)
            _compare(ours, ref, (x, w, b), reduction)


@needs_torch_lce
def test_probability_targets_refuse_an_explicit_ignore_index(backend, device):
    x, w = _f64(5, 3, device=device), _f64(6, 3, device=device)
    p = torch.rand(5, 6, dtype=torch.float64, device=device).softmax(-1)
    for ii in (-100, 2):
        err = same_error(F.linear_cross_entropy, tl_.linear_cross_entropy, x, w, p, ignore_index=ii)
        assert isinstance(err, RuntimeError)
        same_error(F.linear_cross_entropy, tl_.linear_cross_entropy, x, w, p, ignore_index=ii, reduction="none")


def _error_cases(device):
    x, w = torch.randn(4, 3, device=device), torch.randn(6, 3, device=device)
    t = torch.randint(0, 6, (4,), device=device)
    wk = torch.randn(6, 2, 3, device=device)
    return {
        "wrong H": ((x, torch.randn(6, 2, device=device), t), {}),
        "wrong bias length": ((x, w, t), {"linear_bias": torch.randn(5, device=device)}),
        "(1, V) bias": ((x, w, t), {"linear_bias": torch.randn(1, 6, device=device)}),
        "0-d input": ((torch.randn((), device=device), w, torch.tensor(1, device=device)), {}),
        "1-D weight": ((x, torch.randn(3, device=device), t), {}),
        "K-dim weight, unbatched input": ((torch.randn(3, device=device), wk, t[:2]), {}),
        "K-dim weight, 3-D input": ((torch.randn(2, 4, 3, device=device), wk, torch.zeros_like(t).view(2, 2, 1)), {}),
        "K-dim bias shape": ((x, wk, t), {"linear_bias": torch.randn(6, 3, device=device)}),
        "target shape": ((x, w, t[:3]), {}),
        "target dtype": ((x, w, t.int()), {}),
        "long probabilities": ((x, w, torch.ones(4, 6, dtype=torch.long, device=device)), {}),
        "class weight shape": ((x, w, t), {"weight": torch.rand(5, device=device)}),
        "label_smoothing": ((x, w, t), {"label_smoothing": 1.5}),
        "reduction": ((x, w, t), {"reduction": "bogus"}),
        "dtype": ((x, w.double(), t), {}),
        "out of range": ((x, w, torch.tensor([0, 7, 1, 2], device=device)), {}),
        "options": ((x, w, t), {"options": {"batch_chunk_size": 2}}),
    }


@needs_torch_lce
@pytest.mark.parametrize("case", list(_error_cases("cpu")))
def test_errors_are_torchs(device, case):
    """Torch's exception type and message, by delegation, and from our mirror of torch's checks
    (what serves calls with ``z_loss`` / ``softcap``, and every call on torch < 2.13)."""
    if case == "out of range" and device == "cuda":
        pytest.skip("on CUDA a bad target is a device-side assert, as in torch's CUDA kernels")
    args, kw = _error_cases(device)[case]
    same_error(F.linear_cross_entropy, tl_.linear_cross_entropy, *args, **kw)
    if case == "options":
        return  # our mirror ignores options, as the chunks do

    def with_z_loss(*args, **kw):
        return tl_.linear_cross_entropy(*args, z_loss=1e-3, **kw)

    same_error(F.linear_cross_entropy, with_z_loss, *args, **kw)
    mirror_kw = dict(linear_bias=None, weight=None, reduction="mean", ignore_index=None, label_smoothing=0.0)
    mirror_kw.update(kw)

    def mirror(x, w, t, **kw):
        return composite.linear_cross_entropy(x, w, t, **kw, z_loss=0.0, softcap=None)

    same_error(F.linear_cross_entropy, mirror, *args, **mirror_kw)


@needs_torch_lce
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("prob", [False, True], ids=["indices", "probabilities"])
def test_k_dimensional_weight_matches_torch(backend, device, reduction, prob):
    """``linear_weight`` ``(C, d1, d2, H)``: a softmax over the C classes at each of the d1 * d2 positions."""
    N, C, H, out = 7, 5, 4, (3, 2)
    x, w, b = _f64(N, H, device=device), _f64(C, *out, H, device=device), _f64(C, *out, device=device)
    kw = dict(weight=torch.rand(C, dtype=torch.float64, device=device) + 0.5, label_smoothing=0.1)
    if prob:
        t = torch.rand(N, C, *out, dtype=torch.float64, device=device).softmax(1)
    else:
        t = torch.randint(0, C, (N, *out), device=device)
        t[2] = -100  # a row with every position ignored, and single ignored positions
        t[4, 1, 0] = t[5, 0, 1] = -100
    ours = tl_.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, chunk_size=3, **kw)
    ref = F.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, **kw)
    _compare(ours, ref, (x, w, b), reduction)


class _MatmulRows(TorchDispatchMode):
    """Row counts of the ``(rows, V)`` matmuls that make the chunks' logits."""

    def __init__(self, V: int):
        super().__init__()
        self.V, self.rows = V, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("mm", "addmm") and out.dim() == 2 and out.shape[1] == self.V:
            self.rows.append(out.shape[0])
        return out


@needs_torch_lce
def test_options_are_accepted_and_batch_chunk_size_is_the_chunk(backend, device):
    x, w = _f64(10, 3, device=device), _f64(8, 3, device=device)
    t = torch.randint(0, 8, (10,), device=device)
    for opts in (torch.nn.LinearCrossEntropyOptions(), torch.nn.LinearCrossEntropyOptions(batch_chunk_size=3)):
        with _MatmulRows(8) as seen:
            ours = tl_.linear_cross_entropy(x, w, t, options=opts)
        if opts.batch_chunk_size is not None:
            assert seen.rows == [3, 3, 3, 1], seen.rows
        _compare(ours, F.linear_cross_entropy(x, w, t, options=opts), (x, w), "mean")
    with _MatmulRows(8) as seen:  # chunk_size wins over the options' batch size
        tl_.linear_cross_entropy(x, w, t, options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=3), chunk_size=5)
    assert seen.rows == [5, 5], seen.rows


# ---- the module --------------------------------------------------------------------------------


@needs_torch_lce
def test_module_defaults_and_options_are_torchs(backend, device):
    opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=2)
    ours, theirs = (
        cls(4, 6, bias=True, options=opts, dtype=torch.float64, device=device)
        for cls in (tl_.nn.LinearCrossEntropyLoss, torch.nn.LinearCrossEntropyLoss)
    )
    assert ours.ignore_index is None and ours.options is opts
    assert repr(ours) == repr(theirs)  # no extras given: torch's repr
    ours.load_state_dict(theirs.state_dict())
    x = _f64(5, 4, device=device)
    t = torch.randint(0, 6, (5,), device=device)
    t[1] = -100
    with _MatmulRows(6) as seen:
        a = ours(x, t)
    assert seen.rows == [2, 2], seen.rows  # row 1 is ignored: 4 live rows in chunks of 2
    _compare(a, theirs(x, t), (x,), "mean")
    extra = tl_.nn.LinearCrossEntropyLoss(4, 6, z_loss=1e-3, fp32_weight_grad=False)
    assert "label_smoothing=0.0, options=None, z_loss=0.001, fp32_weight_grad=False\n" in repr(extra)


@needs_torch_lce
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_module_k_dimensional_out_features_is_a_drop_in(backend, device, reduction):
    kw = dict(out_features=(3, 2), bias=True, reduction=reduction, dtype=torch.float64, device=device)
    torch.manual_seed(3)
    theirs = torch.nn.LinearCrossEntropyLoss(5, 4, **kw)
    torch.manual_seed(3)
    ours = tl_.nn.LinearCrossEntropyLoss(5, 4, **kw)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    x = _f64(6, 5, device=device)
    probs = torch.rand(6, 4, 3, 2, dtype=torch.float64, device=device).softmax(1)
    for t in (torch.randint(0, 4, (6, 3, 2), device=device), probs):
        params = (x, ours.linear.weight, ours.linear.bias)
        ref_params = (x, theirs.linear.weight, theirs.linear.bias)
        a, r = ours(x, t), theirs(x, t)
        torch.testing.assert_close(a, r, rtol=1e-7, atol=1e-9)
        up = torch.randn(r.shape, dtype=r.dtype, device=device) if reduction == "none" else None
        up = torch.tensor(0.7, device=device) if up is None else up
        for g, gr in zip(torch.autograd.grad(a, params, up), torch.autograd.grad(r, ref_params, up)):
            torch.testing.assert_close(g, gr, rtol=1e-7, atol=1e-9)


@needs_torch_lce
def test_module_constructor_errors_are_torchs(monkeypatch):
    bad = [dict(weight=torch.rand(5)), dict(label_smoothing=1.5), dict(label_smoothing=-0.1)]
    for without_torch_class in (False, True):
        if without_torch_class:  # torch < 2.13's path: our own copy of torch's checks
            monkeypatch.setattr(lce, "_TorchLinearCrossEntropyLoss", None)
        for kw in bad:
            same_error(torch.nn.LinearCrossEntropyLoss, tl_.nn.LinearCrossEntropyLoss, 4, 6, **kw)


def test_any_batch_shape_with_a_2d_weight(backend, device):
    """An extension of torch's ``(N, H)``: ``(B, T, H)`` input is the same loss over the B * T rows."""
    x, w = _f64(2, 3, 4, device=device), _f64(7, 4, device=device)
    t = torch.randint(0, 7, (2, 3), device=device)
    for reduction in REDUCTIONS:
        ours = tl_.linear_cross_entropy(x, w, t, reduction=reduction, chunk_size=4)
        ref = F.cross_entropy(F.linear(x, w).reshape(6, 7), t.reshape(6), reduction=reduction)
        torch.testing.assert_close(ours, ref.reshape(2, 3) if reduction == "none" else ref)
