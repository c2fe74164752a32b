"""Count what a call runs on the device: torch ops that launch work, Triton launches, host reads.

``count_ops(fn, launchers)`` runs ``fn()`` under a ``TorchDispatchMode`` and returns the aten ops
it ran outside the kernels (allocations and views excluded: they launch nothing) and the number of
calls of each wrapped launcher (the wrappers switch the recording off, so the work Triton's
interpreter does inside a launch is not counted). ``Tensor.tolist`` reads a CPU tensor without
dispatching any aten op, so it is recorded by a wrapper as ``"Tensor.tolist"`` (a host read).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

# Ops that allocate or re-view memory: no kernel, no copy.
_FREE = {
    "aten.empty.memory_format", "aten.empty_like.default", "aten.empty_strided.default", "aten.new_empty.default",
    "aten.view.default", "aten.expand.default", "aten.reshape.default", "aten._unsafe_view.default",
    "aten.as_strided.default", "aten.detach.default", "aten.alias.default", "aten.t.default",
    "aten.unsqueeze.default", "aten.squeeze.dim", "aten.select.int", "aten.slice.Tensor", "aten.permute.default",
}  # fmt: skip
# Ops that copy host data to the device or read device data back: a blocking sync on CUDA.
HOST_SYNCS = {"aten.lift_fresh.default", "aten._local_scalar_dense.default", "aten.is_nonzero.default", "Tensor.tolist"}


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def count_ops(fn, launchers: list[tuple[object, str]], monkeypatch) -> tuple[list[str], dict[str, int]]:
    """``(ops, launches)`` of ``fn()``: non-free aten ops in order, and calls per ``(module, name)`` launcher."""
    launches = {name: 0 for _, name in launchers}
    rec = _Recorder()
    inside = []  # non-empty while a wrapped launcher runs

    def wrapped(name, original, *args, **kwargs):
        launches[name] += 1
        inside.append(name)
        try:
            with _disable_current_modes():
                return original(*args, **kwargs)
        finally:
            inside.pop()

    tolist = torch.Tensor.tolist

    def recorded_tolist(self):
        if not inside:
            rec.ops.append("Tensor.tolist")
        return tolist(self)

    for module, name in launchers:
        monkeypatch.setattr(module, name, functools.partial(wrapped, name, getattr(module, name)))
    with contextlib.ExitStack() as stack:
        own = "tolist" in vars(torch.Tensor)  # False: inherited from the C base class
        torch.Tensor.tolist = recorded_tolist
        stack.callback(lambda: setattr(torch.Tensor, "tolist", tolist) if own else delattr(torch.Tensor, "tolist"))
        stack.enter_context(rec)
        fn()
    return [op for op in rec.ops if op not in _FREE], launches
