"""Small CPU calls handed to torch's own function (``_dispatch.TORCH_FASTER_BELOW``, ``torch_serves``).

The table comes from ``bench/cpu_crossover.py``; every op in it asks ``torch_serves`` under its own
name, gets torch's result bit for bit when served, and keeps the library's path where it is not
(large, fp16 / bf16, empty, CUDA-only backends, the interpreter).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import triton_losses
from triton_losses import _dispatch
from triton_losses.bench.registry import Size, get_ops

ROOT = Path(__file__).resolve().parents[1]


SMALL = Size(4, 16)


def _case(name: str, dtype=torch.float32):
    (op,) = get_ops([name])
    return op, op.inputs(SMALL, dtype, torch.device("cpu"))


def test_the_shipped_table_is_the_measured_one(shipped_torch_faster_below):
    measured = json.loads((ROOT / "bench/results/cpu-crossover.json").read_text())["table"]
    assert shipped_torch_faster_below == measured
    for name in shipped_torch_faster_below:
        assert callable(getattr(triton_losses, name)), name


def test_every_op_in_the_table_asks_under_its_own_name(shipped_torch_faster_below, monkeypatch):
    assert shipped_torch_faster_below
    asked = []
    real = _dispatch.torch_serves
    monkeypatch.setattr(_dispatch, "torch_serves", lambda op, x: asked.append(op) or real(op, x))
    for name in shipped_torch_faster_below:
        if name == "triplet_margin_with_distance_loss":
            _, case = _case("triplet_margin_loss")
            triton_losses.triplet_margin_with_distance_loss(*case.args)
        else:
            _, case = _case(name)
            getattr(triton_losses, name)(*case.args)
        assert asked[-1] == name


@pytest.mark.parametrize("name", ["mse_loss", "huber_loss", "multi_margin_loss", "cosine_embedding_loss"])
def test_a_served_call_is_torchs_bit_for_bit(monkeypatch, name):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "auto")
    monkeypatch.setattr(_dispatch, "TORCH_FASTER_BELOW", {name: 2**62})
    op, case = _case(name)
    ours = op.ours(*case.args)
    grads_ours = torch.autograd.grad(ours, case.grad_inputs)
    want = op.torch(*case.args)
    grads_want = torch.autograd.grad(want, case.grad_inputs)
    assert type(ours.grad_fn).__name__ == type(want.grad_fn).__name__  # torch's own autograd node
    torch.testing.assert_close(ours, want, rtol=0, atol=0)
    for a, b in zip(grads_ours, grads_want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _served(monkeypatch, x, below=2**62, env=None) -> bool:
    monkeypatch.setattr(_dispatch, "TORCH_FASTER_BELOW", {"mse_loss": below})
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    return _dispatch.torch_serves("mse_loss", x)


def test_where_torch_serves(monkeypatch):
    x = torch.randn(4, 16)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "auto")
    assert _served(monkeypatch, x)
    assert _served(monkeypatch, x.double())
    assert not _served(monkeypatch, x, below=64)  # 64 elements: not below 64
    assert _served(monkeypatch, x, below=65)
    assert not _served(monkeypatch, x.half())
    assert not _served(monkeypatch, x.bfloat16())
    assert not _served(monkeypatch, torch.empty(0, 16))  # empty calls stay ours
    assert not _served(monkeypatch, [1.0, 2.0])  # not a tensor: the usual path gives the error
    assert _served(monkeypatch, x, env={"TRITON_LOSSES_BACKEND": "torch"})
    assert not _served(monkeypatch, x, env={"TRITON_LOSSES_BACKEND": "triton"})
    monkeypatch.setattr(_dispatch, "TORCH_FASTER_BELOW", {})
    assert not _dispatch.torch_serves("mse_loss", x)


def test_the_interpreter_keeps_cpu_calls_on_the_kernels(monkeypatch):
    if not _dispatch.triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "auto")
    assert not _served(monkeypatch, torch.randn(4, 16), env={"TRITON_INTERPRET": "1"})


def test_a_call_above_the_size_is_the_librarys(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "auto")
    monkeypatch.setattr(_dispatch, "TORCH_FASTER_BELOW", {"mse_loss": 32})
    x = torch.randn(4, 16, requires_grad=True)
    assert type(triton_losses.mse_loss(x, torch.randn(4, 16)).grad_fn).__name__ == "RegressionFunctionBackward"
