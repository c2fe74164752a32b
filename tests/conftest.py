"""Test setup: the backend fixture that runs each test on the PyTorch reference and on the kernels.

Without a GPU, ``TRITON_INTERPRET=1`` is set here, before anything imports triton, so the
kernels run on CPU tensors through Triton's interpreter (tier 2 of DESIGN.md).
"""

from __future__ import annotations

import dataclasses
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from triton_losses import _dispatch
from triton_losses._dispatch import triton_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run kernels in this environment, or None (also None on a GPU).

    Seen: triton 3.6's interpreter turns scalar kernel arguments into 1-element numpy arrays, and
    numpy >= 2.4 refuses ``int()`` of those, so any ``range(0, n, BLOCK)`` loop raises
    ``TypeError: only 0-dimensional arrays can be converted to Python scalars`` (triton 3.9 is fine).
    A one-line probe kernel tells, so the interpreter tier is skipped with that reason instead of
    failing hundreds of times on something that is not this project's code.
    """
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1" or not triton_available():
        return None
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(out_ptr, n, BLOCK: tl.constexpr):
        acc = tl.zeros([BLOCK], tl.float32)
        for _ in range(0, n, BLOCK):
            acc += 1.0
        tl.store(out_ptr + tl.arange(0, BLOCK), acc)

    out = torch.empty(4)
    try:
        _probe[(1,)](out, 8, BLOCK=4)
    except Exception as e:  # any failure of the interpreter itself is the answer
        import numpy

        return (
            f"Triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} here "
            f"({type(e).__name__}: {e}); with triton <= 3.6 install numpy<2.4 to run the interpreter tier"
        )
    return None if bool((out == 2.0).all()) else "Triton's interpreter gave a wrong result on a probe kernel"


def _interpreter_asserts() -> None:
    """Evaluate every ``tl.device_assert`` under the interpreter, as the CUDA launches do.

    On CUDA the kernels with data checks launch with ``debug=True`` (``_common.assert_options``); the
    interpreter takes its options from its own builder (``debug`` off), so without this their
    conditions would never run before a GPU does. With it, every test on valid data also checks
    that no assert fires on it (a wrong condition would stop every GPU run), and
    ``tests/test_device_asserts.py`` checks that each fires on the data it is for.
    """
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1" or not triton_available():
        return
    from triton.runtime import interpreter

    builder = getattr(interpreter, "interpreter_builder", None)  # triton 3.6 - 3.9; test_device_asserts skips without
    if builder is not None and dataclasses.is_dataclass(getattr(builder, "options", None)):
        builder.options = dataclasses.replace(builder.options, debug=True, sanitize_overflow=False)


_interpreter_asserts()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    # On a GPU machine the interpreter is off: kernel tests that build CPU tensors (not through the
    # ``device`` fixture) run on CPU machines only; those on ``device`` run the real kernels.
    cpu_only = pytest.mark.skip(reason="runs the kernels on CPU tensors: under TRITON_INTERPRET on a CPU machine")
    broken = _interpreter_problem() if any("interpreter" in item.keywords for item in items) else None
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if broken and "interpreter" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=broken))
        uses_device = "device" in getattr(item, "fixturenames", ())
        if torch.cuda.is_available() and "interpreter" in item.keywords and not uses_device:
            item.add_marker(cpu_only)


@pytest.fixture(params=["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def backend(request, monkeypatch):
    """Run the test once on the PyTorch reference and once on the Triton kernels."""
    if request.param == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", request.param)
    return request.param


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


_SHIPPED_TORCH_FASTER_BELOW = dict(_dispatch.TORCH_FASTER_BELOW)


@pytest.fixture(autouse=True)
def _reference_at_every_size(monkeypatch):
    """The library's own engines serve every size in tests: ``_dispatch.TORCH_FASTER_BELOW`` (small CPU
    calls handed to torch's own function) is emptied, or the reference would go untested on small inputs."""
    monkeypatch.setattr(_dispatch, "TORCH_FASTER_BELOW", {})


@pytest.fixture
def shipped_torch_faster_below(monkeypatch) -> dict[str, int]:
    """The table as shipped, restored for the test that asks for it."""
    monkeypatch.setattr(_dispatch, "TORCH_FASTER_BELOW", dict(_SHIPPED_TORCH_FASTER_BELOW))
    return dict(_SHIPPED_TORCH_FASTER_BELOW)
