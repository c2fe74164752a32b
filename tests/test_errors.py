"""Bad input: the same exception type and message as torch, before any kernel runs."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import triton_losses as tl_
from tests.helpers import same_error


def _x(*shape, device="cpu", dtype=torch.float32):
    return torch.randn(*shape, device=device, dtype=dtype)


def _t(*values, device="cpu"):
    return torch.tensor(values, device=device)


CE_CASES = {
    "target-too-large": lambda d: ((_x(4, 5, device=d), _t(0, 1, 5, 2, device=d)), {}),
    "target-negative": lambda d: ((_x(4, 5, device=d), _t(0, -1, 2, 2, device=d)), {}),
    "target-out-of-range-kdim": lambda d: ((_x(2, 3, 4, device=d), torch.full((2, 4), 7, device=d)), {}),
    "target-out-of-range-sum": lambda d: ((_x(4, 5, device=d), _t(0, 1, 9, 2, device=d)), {"reduction": "sum"}),
    "target-out-of-range-none": lambda d: ((_x(4, 5, device=d), _t(0, 1, 9, 2, device=d)), {"reduction": "none"}),
    "target-out-of-range-smoothing": lambda d: ((_x(4, 5, device=d), _t(6, 1, 0, 2, device=d)), {"label_smoothing": 0.1}),
    "zero-classes": lambda d: ((_x(3, 0, device=d), _t(0, 0, 0, device=d)), {}),
    "float-index-target": lambda d: ((_x(4, 5, device=d), torch.rand(4, device=d)), {}),
    "int32-target": lambda d: ((_x(4, 5, device=d), _t(0, 1, 2, 3, device=d).int()), {}),
    "long-prob-target": lambda d: ((_x(4, 5, device=d), torch.zeros(4, 5, dtype=torch.long, device=d)), {}),
    "batch-mismatch": lambda d: ((_x(4, 5, device=d), _t(0, 1, 2, device=d)), {}),
    "weight-wrong-size": lambda d: ((_x(4, 5, device=d), _t(0, 1, 2, 3, device=d), torch.rand(3, device=d)), {}),
    "weight-2d": lambda d: ((_x(4, 5, device=d), _t(0, 1, 2, 3, device=d), torch.rand(1, 5, device=d)), {}),
    "weight-wrong-dtype": lambda d: ((_x(4, 5, device=d), _t(0, 1, 2, 3, device=d), torch.rand(5, device=d).double()), {}),
    "prob-weight-wrong-size": lambda d: ((_x(4, 5, device=d), torch.rand(4, 5, device=d), torch.rand(3, device=d)), {}),
    "bad-reduction": lambda d: ((_x(4, 5, device=d), _t(0, 1, 2, 3, device=d)), {"reduction": "avg"}),
    "smoothing-too-large": lambda d: ((_x(4, 5, device=d), _t(0, 1, 2, 3, device=d)), {"label_smoothing": 1.5}),
    "prob-smoothing-too-large": lambda d: ((_x(4, 5, device=d), torch.rand(4, 5, device=d)), {"label_smoothing": 1.5}),
    "prob-target-ignore-index": lambda d: ((_x(4, 5, device=d), torch.rand(4, 5, device=d)), {"ignore_index": 1}),
    "multi-target": lambda d: ((_x(4, 5, device=d), _t(0, 1, 2, 3, device=d)[:, None]), {}),
    "kdim-3d-mismatch": lambda d: ((_x(2, 5, 7, device=d), torch.zeros(2, 6, dtype=torch.long, device=d)), {}),
    "kdim-4d-mismatch": lambda d: ((_x(2, 5, 3, 3, device=d), torch.zeros(2, 3, 4, dtype=torch.long, device=d)), {}),
    "kdim-5d-mismatch": lambda d: ((_x(2, 5, 3, 3, 2, device=d), torch.zeros(2, 3, 3, 3, dtype=torch.long, device=d)), {}),
    "integer-logits": lambda d: ((torch.randint(0, 3, (4, 5), device=d), _t(0, 1, 2, 3, device=d)), {}),
    "weight-requires-grad": lambda d: ((_x(4, 5, device=d), _t(0, 1, 2, 3, device=d), torch.rand(5, device=d, requires_grad=True)), {}),
    "unbatched-target-1d": lambda d: ((_x(5, device=d), _t(1, 2, device=d)), {}),
    "ignore-index-float": lambda d: ((_x(4, 5, device=d), _t(0, 1, 2, 3, device=d)), {"ignore_index": 1.0}),
    "ignore-index-negative-float": lambda d: ((_x(4, 5, device=d), _t(0, 1, 2, 3, device=d)), {"ignore_index": -1.5}),
    "ignore-index-bool": lambda d: ((_x(4, 5, device=d), _t(0, 1, 2, 3, device=d)), {"ignore_index": True}),
    "list-input": lambda d: (([[1.0, 2.0], [0.5, 0.1]], _t(0, 1, device=d)), {}),
    "list-target": lambda d: ((_x(2, 3, device=d), [0, 1]), {}),
    "zero-classes-kdim": lambda d: ((_x(2, 0, 3, device=d), torch.zeros(2, 3, dtype=torch.long, device=d)), {}),
    "zero-classes-4d": lambda d: ((_x(2, 0, 3, 4, device=d), torch.zeros(2, 3, 4, dtype=torch.long, device=d)), {}),
}  # fmt: skip


# Zero classes with index targets: torch's CUDA kernels answer with a device-side assert (torch's CPU:
# "Target 0 is out of bounds."), and triton_losses hands such calls to torch; in-process, only on the CPU.
TORCH_ASSERTS_ON_CUDA = {"zero-classes", "zero-classes-kdim", "zero-classes-4d"}


def _skip_torch_device_asserts(device, case):
    if device == "cuda" and case in TORCH_ASSERTS_ON_CUDA:
        pytest.skip("torch's CUDA kernel reports this with a device-side assert")


@pytest.fixture(autouse=True)
def _eager_target_checks(monkeypatch):
    """On CUDA the target-range check is an opt-in (the kernels assert on the device otherwise)."""
    monkeypatch.setenv("TRITON_LOSSES_CHECK_TARGETS", "1")


@pytest.mark.parametrize("case", CE_CASES)
def test_cross_entropy_errors_match_torch(backend, device, case):
    _skip_torch_device_asserts(device, case)
    args, kw = CE_CASES[case](device)
    same_error(F.cross_entropy, tl_.cross_entropy, *args, **kw)


NLL_CASES = {
    k: CE_CASES[k]
    for k in [
        "target-too-large", "target-negative", "target-out-of-range-kdim", "float-index-target", "int32-target",
        "batch-mismatch", "weight-wrong-size", "weight-wrong-dtype", "bad-reduction", "multi-target",
        "kdim-3d-mismatch", "kdim-4d-mismatch", "kdim-5d-mismatch", "weight-requires-grad",
        "ignore-index-float", "ignore-index-negative-float", "list-input", "list-target", "zero-classes-kdim",
    ]
}  # fmt: skip
NLL_CASES["zero-dim-input"] = lambda d: ((torch.tensor(1.0, device=d), torch.tensor(0, device=d)), {})
NLL_CASES["empty-weight-dtype"] = lambda d: (
    (_x(0, 0, device=d), _t(device=d).long(), torch.rand(0, device=d).double()),
    {},
)


@pytest.mark.parametrize("case", NLL_CASES)
def test_nll_loss_errors_match_torch(backend, device, case):
    _skip_torch_device_asserts(device, case)
    args, kw = NLL_CASES[case](device)
    same_error(F.nll_loss, tl_.nll_loss, *args, **kw)


def test_bad_input_launches_nothing(device, monkeypatch):
    """Validation happens before dispatch: a bad target never reaches an implementation."""
    import sys

    ce = sys.modules["triton_losses.cross_entropy"]
    calls = []
    monkeypatch.setattr(ce.CrossEntropyFunction, "apply", lambda *a: calls.append(a))
    with pytest.raises(IndexError):
        tl_.cross_entropy(_x(4, 5, device=device), _t(0, 1, 5, 2, device=device))
    with pytest.raises(ValueError):
        tl_.cross_entropy(_x(4, 5, device=device), _t(0, 1, 2, device=device))
    assert calls == []


def test_invalid_reduction_is_a_call_time_error():
    module = tl_.nn.CrossEntropyLoss(reduction="avg")  # constructs, as torch's does
    with pytest.raises(ValueError, match="avg is not a valid value for reduction"):
        module(_x(2, 3), _t(0, 1))


def test_legacy_size_average_reduce_warn_and_map_like_torch():
    x, t = _x(4, 5), _t(0, 1, 2, 3)
    for size_average, reduce in [(False, None), (None, False), (True, True), (False, True)]:
        with warnings.catch_warnings(record=True) as w_ours:
            warnings.simplefilter("always")
            ours = tl_.cross_entropy(x, t, size_average=size_average, reduce=reduce)
        with warnings.catch_warnings(record=True) as w_torch:
            warnings.simplefilter("always")
            ref = F.cross_entropy(x, t, size_average=size_average, reduce=reduce)
        torch.testing.assert_close(ours, ref)
        user = lambda ws: [str(w.message) for w in ws if w.category is UserWarning]
        assert user(w_ours) == user(w_torch) and len(user(w_torch)) == 1
        torch.testing.assert_close(tl_.nll_loss(x, t, size_average=size_average, reduce=reduce),
                                   F.nll_loss(x, t, size_average=size_average, reduce=reduce))  # fmt: skip


@pytest.mark.parametrize("z_loss", [-1e-4, float("inf"), float("nan")])
def test_z_loss_must_be_finite_and_non_negative(z_loss):
    with pytest.raises(ValueError, match="z_loss must be finite and non-negative"):
        tl_.cross_entropy(_x(2, 3), _t(0, 1), z_loss=z_loss)
    with pytest.raises(ValueError, match="z_loss must be finite and non-negative"):
        tl_.nn.CrossEntropyLoss(z_loss=z_loss)(_x(2, 3), _t(0, 1))


@pytest.mark.parametrize("softcap", [0.0, -1.0, "3"])
def test_softcap_must_be_positive(softcap):
    with pytest.raises(ValueError, match="softcap must be a positive number"):
        tl_.cross_entropy(_x(2, 3), _t(0, 1), softcap=softcap)


def test_triton_backend_never_falls_back_silently(monkeypatch):
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(NotImplementedError, match="CUDA tensors"):
        tl_.cross_entropy(_x(2, 3), _t(0, 1))


def test_unknown_backend_value(monkeypatch):
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "cuda")
    with pytest.raises(ValueError, match="TRITON_LOSSES_BACKEND"):
        tl_.cross_entropy(_x(2, 3), _t(0, 1))
