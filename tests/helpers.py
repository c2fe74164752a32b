"""Shared test utilities: fp64 references and the error-budget comparison of DESIGN.md."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Slack added to the budget, per dtype, relative to the reference's magnitude.
_EPS = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def budget_close(ours: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor | None = None, factor=2.0):
    """Assert ``|ours - ref64| <= factor * |torch_lowp - ref64| + eps * (1 + |ref64|)`` elementwise.

    ``ref64`` is the fp64 reference; ``torch_lowp`` is torch's own result in ``ours``' dtype (its
    error sets the budget). NaN and inf must sit at the same places, with the same signs.
    """
    assert ours.shape == ref64.shape, (ours.shape, ref64.shape)
    o = ours.detach().double().cpu()
    r = ref64.detach().double().cpu()
    nan_o, nan_r = o.isnan(), r.isnan()
    assert torch.equal(nan_o, nan_r), f"NaN positions differ: ours {nan_o.nonzero()[:5]}, ref {nan_r.nonzero()[:5]}"
    inf_o, inf_r = o.isinf(), r.isinf()
    assert torch.equal(inf_o, inf_r), "inf positions differ"
    assert torch.equal(o[inf_o], r[inf_r]), "inf signs differ"
    fin = ~(nan_o | inf_o)
    err = (o - r).abs()[fin]
    allowed = _EPS[ours.dtype] * (1 + r.abs()[fin])
    if torch_lowp is not None:
        allowed = allowed + factor * (torch_lowp.detach().double().cpu() - r).abs()[fin]
    if err.numel():
        worst = (err - allowed).argmax()
        assert bool((err <= allowed).all()), (
            f"error {err[worst].item():.3e} > budget {allowed[worst].item():.3e} "
            f"(ours {o[fin][worst].item():.6e}, ref {r[fin][worst].item():.6e})"
        )


def on_cpu(obj):
    """``obj`` with every tensor in it (nested in tuples, lists, dicts) copied to the CPU, ``requires_grad`` kept."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().requires_grad_(obj.requires_grad)
    if isinstance(obj, (tuple, list)):
        return type(obj)(on_cpu(o) for o in obj)
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    return obj


def torch_error(fn_torch, *args, **kwargs) -> BaseException:
    """The exception torch's ``fn_torch`` raises for these arguments, computed on CPU copies of them.

    On a GPU, torch's CUDA kernels answer invalid input (an out-of-range target, probabilities
    outside [0, 1]) with a device-side assert, which poisons the CUDA context for every later test;
    the CPU kernels raise the error that triton_losses reproduces on every device.
    """
    with pytest.raises(Exception) as e_torch:
        fn_torch(*on_cpu(args), **on_cpu(kwargs))
    return e_torch.value


# torch's CPU messages for errors that need the data (a target's range, a probability in [0, 1]): on
# CUDA torch's kernels report these with a device-side assert, so the CPU's error is the expected one.
_DATA_CHECK = re.compile(r"out of (bounds|range)|between 0 and 1|negative entr")


def _on_cuda(*values) -> bool:
    return any(isinstance(v, torch.Tensor) and v.is_cuda for v in values)


def same_error(fn_torch, fn_ours, *args, **kwargs):
    """``fn_ours`` raises the exception type and message torch raises.

    Errors that need the data (target ranges, probabilities in [0, 1]) are computed by torch on CPU
    copies (see :func:`torch_error`): on a GPU, torch's CUDA kernels report those with a device-side
    assert. Other errors (dtype, shape, arguments) are torch's on the arguments' own device, whose
    messages can differ from the CPU's (a CUDA kernel's name); torch reads no data for them. If torch
    accepts the call on that device, so must ours.
    """
    expected = torch_error(fn_torch, *args, **kwargs)
    if _on_cuda(*args, *kwargs.values()) and not _DATA_CHECK.search(str(expected)):
        try:
            fn_torch(*args, **kwargs)
        except Exception as e:
            expected = e
        else:
            fn_ours(*args, **kwargs)
            return None
    with pytest.raises(Exception) as e_ours:
        fn_ours(*args, **kwargs)
    assert type(e_ours.value) is type(expected), (e_ours.value, expected)
    assert str(e_ours.value) == str(expected)
    return e_ours.value


def device_assert(message: str):
    """``pytest.raises`` for a kernel's ``tl.device_assert`` with ``message`` under Triton's interpreter
    (tests/conftest.py switches the interpreter's asserts on, as the CUDA launches have them)."""
    return pytest.raises(Exception, match=re.escape(message))


def run_isolated(code: str, timeout: float = 300.0, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run Python ``code`` in a fresh interpreter (for a test that provokes a CUDA device-side assert on
    purpose: the assert poisons that process's CUDA context, not this one's). Returns the finished process.

    Args:
        code: the program.
        timeout: seconds before it is killed (``subprocess.TimeoutExpired``).
        env: variables set on top of this process's environment.
        cwd: its working directory (default: the repository's root, which is also put on ``PYTHONPATH``).
    """
    root = str(Path(__file__).resolve().parents[1])  # the package imports from the checkout, installed or not
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, full_env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=cwd or root)  # fmt: skip
