"""Every ``tl.device_assert`` of the kernels fires on the data it is for, and only there.

On CUDA the data checks that would need a host read (target ranges, probabilities in [0, 1], a
negative variance) are device-side asserts, as in torch's CUDA kernels; CPU tensors get torch's CPU
errors from the public functions before any kernel runs. Here the public functions run on CPU
tensors with their host checks off, as while tracing (``_dispatch.tracing`` patched), so
the kernels see the bad data under Triton's interpreter, whose asserts tests/conftest.py switches
on. The rest of the interpreter tier runs with the asserts on too: there no valid input trips one.
"""

from __future__ import annotations

import pytest
import torch

import triton_losses as tl_
from tests.helpers import device_assert

pytestmark = pytest.mark.interpreter


@pytest.fixture(autouse=True)
def _unchecked(monkeypatch):
    """The Triton kernels, with the host-side data checks off (as on CUDA, or while tracing)."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU a device-side assert ends the process (tests/test_gpu.py runs one in a subprocess)")
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    if not getattr(getattr(getattr(interpreter, "interpreter_builder", None), "options", None), "debug", False):
        pytest.skip("this triton's interpreter offers no switch for its device asserts (tests/conftest.py)")
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "triton")
    from triton_losses import _dispatch, _linear_ce_chunks

    for module in (_dispatch, _linear_ce_chunks):  # not torch.compiler.is_compiling: dynamo keys its rules on it
        monkeypatch.setattr(module, "tracing", lambda: True)


def _index_targets(N: int, C: int, bad: int) -> torch.Tensor:
    t = torch.randint(0, C, (N,))
    t[N // 2] = bad
    return t


@pytest.mark.parametrize("bad", [-3, 7, 1 << 40])
def test_cross_entropy_target_out_of_bounds(bad):
    x = torch.randn(5, 7)
    with device_assert("cross_entropy / nll_loss: target out of bounds"):
        tl_.cross_entropy(x, _index_targets(5, 7, bad))
    with device_assert("cross_entropy / nll_loss: target out of bounds"):
        tl_.nll_loss(x.log_softmax(1), _index_targets(5, 7, bad), reduction="none")


@pytest.mark.parametrize("ignore_index", [-100, 50])
def test_cross_entropy_ignore_index_is_not_out_of_bounds(ignore_index):
    x = torch.randn(5, 7, requires_grad=True)
    tl_.cross_entropy(x, _index_targets(5, 7, ignore_index), ignore_index=ignore_index).backward()
    assert torch.isfinite(x.grad).all()
    with device_assert("cross_entropy / nll_loss: target out of bounds"):  # the other one is out of bounds
        tl_.cross_entropy(x, _index_targets(5, 7, 50 if ignore_index == -100 else -100), ignore_index=ignore_index)


def test_linear_cross_entropy_target_out_of_bounds():
    x, w = torch.randn(6, 4), torch.randn(9, 4)
    with device_assert("target out of bounds"):
        tl_.linear_cross_entropy(x, w, _index_targets(6, 9, 9))


@pytest.mark.parametrize("bad", [-1, 11])
def test_token_logprobs_token_out_of_range(bad):
    with device_assert("token_logprobs: token index out of range"):
        tl_.token_logprobs(torch.randn(4, 11), _index_targets(4, 11, bad))


@pytest.mark.parametrize("bad", [-1, 6])
def test_multi_margin_target_out_of_range(bad):
    with device_assert("multi_margin_loss: target out of range"):
        tl_.multi_margin_loss(torch.randn(4, 6), _index_targets(4, 6, bad))


def test_multilabel_margin_target_out_of_range():
    x = torch.randn(3, 6)
    y = torch.full((3, 6), -1, dtype=torch.int64)
    y[:, 0] = 1
    y[1, 1] = 6  # listed (before the row's first -1), out of range
    with device_assert("multilabel_margin_loss: target out of range"):
        tl_.multilabel_margin_loss(x, y)


def test_multilabel_margin_entries_after_the_list_are_not_checked():
    """As torch's CPU kernel: the list ends at the first negative entry; what follows is never read as a class."""
    x = torch.randn(3, 6, requires_grad=True)
    y = torch.full((3, 6), -1, dtype=torch.int64)
    y[:, 0] = 1
    y[2, 2] = 99  # after row 2's terminator
    ours = tl_.multilabel_margin_loss(x, y)
    y[2, 2] = -1
    expected = torch.nn.functional.multilabel_margin_loss(x, y)
    torch.testing.assert_close(ours, expected)


def test_ctc_target_out_of_range():
    T, N, C, S = 8, 2, 5, 3
    lp = torch.randn(T, N, C).log_softmax(2)
    targets = torch.randint(1, C, (N, S))
    targets[1, 1] = C
    with device_assert("ctc_loss: target out of range"):
        tl_.ctc_loss(lp, targets, torch.full((N,), T), torch.full((N,), S))


@pytest.mark.parametrize("which", ["input", "target"])
def test_binary_cross_entropy_outside_unit_interval(which):
    p, t = torch.rand(4, 3), torch.rand(4, 3)
    (p if which == "input" else t)[2, 1] = 1.5
    with device_assert(f"all elements of {which} should be between 0 and 1"):
        tl_.binary_cross_entropy(p, t)


def test_gaussian_nll_negative_variance():
    x, y, var = torch.randn(4, 3), torch.randn(4, 3), torch.rand(4, 3)
    var[3, 0] = -0.5
    with device_assert("var has negative entry/entries"):
        tl_.gaussian_nll_loss(x, y, var)
