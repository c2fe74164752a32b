"""pytest-benchmark suite for the CPU path, so that regressions show as numbers.

Every registered op (``triton_losses.bench.ops``), ours against torch eager, forward and
forward+backward, at one LM-like shape small enough for a 2-core CPU. Not part of the ``tests/``
run (pyproject's ``testpaths``); run it on purpose::

    pytest bench/test_bench_cpu.py --benchmark-only -n 0                      # table of timings
    pytest bench/test_bench_cpu.py --benchmark-only -n 0 --benchmark-autosave  # keep them (.benchmarks/)
    pytest bench/test_bench_cpu.py --benchmark-only -n 0 --benchmark-compare   # against the last saved run

(``-n 0``: one process; the test settings turn xdist on, and pytest-benchmark times nothing under it.)

Each result's ``extra_info`` holds the bytes the op must move and the GB/s that gives (the same
count as ``triton-losses bench``). Ours runs its PyTorch CPU path here (the Triton interpreter is
switched off for this file), which is what a CPU user gets.
"""

from __future__ import annotations

import os

import pytest
import torch

from triton_losses.bench import MODES, Size, get_ops
from triton_losses.bench.timing import backward, forward

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("TRITON_INTERPRET is set: this suite times the CPU path, not the interpreter", allow_module_level=True)

SIZE = Size(N=64, V=32000, H=256)
OPS = get_ops()


@pytest.fixture(autouse=True)
def _cpu_backend(monkeypatch):
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "auto")


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["ours", "torch"])
@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
def test_cpu(benchmark, op, provider, mode):
    assert mode in MODES
    size = op.sizes_for([SIZE], [SIZE.H])[0]
    torch.manual_seed(0)
    case = op.inputs(size, torch.float32, torch.device("cpu"))
    fn = op.ours if provider == "ours" else op.torch
    moved = op.bytes_moved(size, 4)[mode]
    benchmark.group = f"{op.name} {size.label} {mode}"
    benchmark.extra_info.update(bytes=moved, size=size.label, dtype="float32")

    def step():
        out = forward(fn, case)
        if mode == "fwd+bwd":
            backward(out, case)

    benchmark.pedantic(step, setup=case.clear_grads, rounds=5, warmup_rounds=1, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable (each step then runs once, as a smoke test)
        benchmark.extra_info["gbps"] = moved / benchmark.stats.stats.median / 1e9
