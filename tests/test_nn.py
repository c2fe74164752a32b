"""Module shims: same constructor, defaults, buffers, state_dict, repr and results as torch.nn."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import triton_losses as tl_

PAIRS = [
    (tl_.nn.CrossEntropyLoss, nn.CrossEntropyLoss),
    (tl_.nn.NLLLoss, nn.NLLLoss),
]


@pytest.mark.parametrize("ours_cls,torch_cls", PAIRS)
def test_subclass_defaults_and_state_dict(ours_cls, torch_cls):
    assert issubclass(ours_cls, torch_cls)
    w = torch.rand(5)
    ours, ref = (
        ours_cls(weight=w, ignore_index=3, reduction="sum"),
        torch_cls(weight=w, ignore_index=3, reduction="sum"),
    )
    assert ours.ignore_index == ref.ignore_index == 3 and ours.reduction == ref.reduction == "sum"
    assert ours.state_dict().keys() == ref.state_dict().keys()
    torch.testing.assert_close(ours.state_dict()["weight"], ref.state_dict()["weight"])
    assert "weight" in dict(ours.named_buffers())
    ours2 = ours_cls(weight=torch.zeros(5))
    result = ours2.load_state_dict(ref.state_dict())  # strict: every key matches
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(ours2.weight, w)
    ref2 = torch_cls(weight=torch.zeros(5))
    ref2.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ref2.weight, w)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        ours_cls().load_state_dict(ref.state_dict())  # weight=None registers no buffer, as in torch
    with pytest.raises(RuntimeError, match="Unexpected key"):
        torch_cls().load_state_dict(ref.state_dict())
    plain = ours_cls()
    assert plain.ignore_index == -100 and plain.reduction == "mean" and plain.weight is None


def test_cross_entropy_module_matches_torch(backend, device):
    w = torch.rand(6, device=device) + 0.5
    for kw in [{}, {"weight": w, "label_smoothing": 0.1, "ignore_index": 2}, {"reduction": "none"}]:
        ours = tl_.nn.CrossEntropyLoss(**kw).to(device)
        ref = nn.CrossEntropyLoss(**kw).to(device)
        assert ours.label_smoothing == ref.label_smoothing
        x = torch.randn(4, 6, 3, device=device, requires_grad=True)
        t = torch.randint(0, 6, (4, 3), device=device)
        a, b = ours(x, t), ref(x, t)
        torch.testing.assert_close(a, b)
        up = torch.randn_like(b)
        torch.testing.assert_close(torch.autograd.grad(a, x, up)[0], torch.autograd.grad(b, x, up)[0])


def test_cross_entropy_module_extras(backend, device):
    m = tl_.nn.CrossEntropyLoss(z_loss=1e-2, softcap=10.0, inplace_backward=False)
    assert "z_loss=0.01" in repr(m) and "softcap=10.0" in repr(m)
    x = torch.randn(4, 6, device=device)
    t = torch.randint(0, 6, (4,), device=device)
    torch.testing.assert_close(m(x, t), tl_.cross_entropy(x, t, z_loss=1e-2, softcap=10.0))
    with pytest.raises(TypeError):
        tl_.nn.CrossEntropyLoss(None, None, -100, None, "mean", 0.0, 1e-2)  # extras are keyword-only


def test_nll_module_matches_torch(backend, device):
    x = torch.randn(5, 4, device=device).log_softmax(1)
    t = torch.randint(0, 4, (5,), device=device)
    torch.testing.assert_close(tl_.nn.NLLLoss(reduction="sum")(x, t), nn.NLLLoss(reduction="sum")(x, t))


@pytest.mark.parametrize("ours_cls,torch_cls", [(tl_.nn.LogSoftmax, nn.LogSoftmax), (tl_.nn.Softmax, nn.Softmax)])
def test_softmax_modules(backend, device, ours_cls, torch_cls):
    assert issubclass(ours_cls, torch_cls)
    x = torch.randn(3, 4, 5, device=device)
    for dim in (0, 1, -1):
        torch.testing.assert_close(ours_cls(dim)(x), torch_cls(dim)(x))
    assert repr(ours_cls(1)) == repr(torch_cls(1))


def test_modules_pickle_and_deepcopy():
    m = tl_.nn.CrossEntropyLoss(weight=torch.rand(3), label_smoothing=0.2, z_loss=1e-3)
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        assert isinstance(clone, tl_.nn.CrossEntropyLoss) and clone.z_loss == 1e-3
        torch.testing.assert_close(clone.weight, m.weight)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = tl_.nn.CrossEntropyLoss(weight=torch.zeros(3))
    fresh.load_state_dict(torch.load(buf))
    torch.testing.assert_close(fresh.weight, m.weight)


@pytest.mark.interpreter
def test_weight_buffer_follows_to():
    m = tl_.nn.CrossEntropyLoss(weight=torch.rand(3)).to(torch.float64)
    assert m.weight.dtype == torch.float64
    x = torch.randn(2, 3, dtype=torch.float64)
    t = torch.tensor([0, 2])
    torch.testing.assert_close(m(x, t), nn.CrossEntropyLoss(weight=m.weight)(x, t))
