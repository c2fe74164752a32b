"""Test setup: the backend fixture that runs each test on the PyTorch reference and on the kernels.

Without a GPU, ``TRITON_INTERPRET=1`` is set here, before anything imports triton, so the
kernels run on CPU tensors through Triton's interpreter (tier 2 of DESIGN.md).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from triton_losses._dispatch import triton_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


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
