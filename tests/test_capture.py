"""CUDA-graph capture launches exactly the kernel specialisations of its eager warm-up.

A Triton kernel is compiled and loaded on the first launch of each specialisation (constexprs,
launch options, integers equal to 1 or divisible by 16), and loading a module while a stream
captures is refused by the driver. So a captured call must launch only what the same call launched
eagerly. Here the capture is simulated on the CPU (``_dispatch.tracing()`` true, as
``torch.cuda.is_current_stream_capturing()`` makes it, dynamo not tracing) and every launch of the
interpreter is recorded with its specialisation key; the captured set must equal the eager one.
"""

from __future__ import annotations

import pytest
import torch

import triton_losses as tl_
from triton_losses import _dispatch

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(not _dispatch.triton_available(), reason="triton is not installed"),
]


def _key(fn_name: str, args: tuple, kwargs: dict) -> tuple:
    """What the runtime specialises a launch on: constexprs and options by value, integers by whether
    they equal 1 or are multiples of 16, tensors by dtype and 16-byte alignment."""

    def spec(v):
        if isinstance(v, torch.Tensor):
            return (str(v.dtype), v.data_ptr() % 16 == 0)
        if isinstance(v, bool) or not isinstance(v, int):
            return type(v).__name__ if isinstance(v, float) else repr(v)
        return ("int", v == 1, v % 16 == 0, -(2**31) <= v < 2**31)

    return (fn_name, tuple(spec(a) for a in args), tuple(sorted((k, spec(v)) for k, v in kwargs.items())))


@pytest.fixture
def launches(monkeypatch):
    """The specialisation keys of every interpreted kernel launch, appended as they happen."""
    from triton.runtime.interpreter import InterpretedFunction

    seen: list[tuple] = []
    run = InterpretedFunction.run

    def recorded(self, *args, grid, warmup, **kwargs):
        seen.append(_key(self.fn.__name__, args, kwargs))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recorded)
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "triton")
    return seen


def _step(loss_fn, *leaves):
    """One training step of ``loss_fn`` on fresh copies of ``leaves`` (float ones requiring grad)."""
    xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in leaves]
    loss = loss_fn(*xs)
    if loss.requires_grad:
        loss.backward()
    return loss


def _logits(n=6, c=300):
    return torch.randn(n, c)


def _weighted(w):
    return (lambda x, t: tl_.cross_entropy(x, t, weight=w, label_smoothing=0.1), _logits(), torch.randint(0, 300, (6,)))


CALLS = {
    "cross_entropy mean": lambda: (lambda x, t: tl_.cross_entropy(x, t), _logits(), torch.randint(0, 300, (6,))),
    "cross_entropy sum": lambda: (
        lambda x, t: tl_.cross_entropy(x, t, reduction="sum"),
        _logits(),
        torch.randint(0, 300, (6,)),
    ),
    "cross_entropy smoothing, weight": lambda: _weighted(torch.rand(300)),
    "nll_loss": lambda: (lambda x, t: tl_.nll_loss(x.log_softmax(1), t), _logits(), torch.randint(0, 300, (6,))),
    "bce_with_logits": lambda: (lambda x, y: tl_.binary_cross_entropy_with_logits(x, y), _logits(), torch.rand(6, 300)),
    "kl_div_with_logits": lambda: (lambda s, t: tl_.kl_div_with_logits(s, t), _logits(), _logits()),
    "token_logprobs": lambda: (lambda x, t: tl_.token_logprobs(x, t).sum(), _logits(), torch.randint(0, 300, (6,))),
    "linear_cross_entropy": lambda: (
        lambda h, w, t: tl_.linear_cross_entropy(h, w, t),
        torch.randn(6, 16),
        torch.randn(300, 16),
        torch.randint(0, 300, (6,)),
    ),
}


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "training step"])
@pytest.mark.parametrize("name", list(CALLS))
def test_capture_launches_what_the_eager_warm_up_compiled(launches, monkeypatch, name, grad):
    fn, *inputs = CALLS[name]()
    with torch.set_grad_enabled(grad):
        eager_out = _step(fn, *inputs)
    eager = set(launches)
    assert eager, "the call launched no kernel"
    launches.clear()
    monkeypatch.setattr(_dispatch, "tracing", lambda: True)  # what a capture looks like to the library
    with torch.set_grad_enabled(grad):
        captured_out = _step(fn, *inputs)
    assert set(launches) <= eager, f"compiled during capture: {sorted(set(launches) - eager)}"
    torch.testing.assert_close(captured_out, eager_out)
