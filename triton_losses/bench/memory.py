"""Peak memory of one forward+backward: the most bytes allocated on top of what was live before it.

* CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``max_memory_allocated() - memory_allocated()``
  around one forward+backward.
* CPU: every allocation and free made through PyTorch's CPU allocator during one forward+backward
  is recorded by ``torch.profiler`` (``profile_memory=True``); the peak of their running sum is the
  same quantity ``max_memory_allocated`` gives on the GPU. It counts tensors (those of eager
  kernels, autograd, and the code ``torch.compile`` generates), not Python objects or allocator
  slack, so it is comparable across providers and with the GPU numbers; it is not the process RSS
  (checked against the peak-RSS rise of a fresh process doing one step, cross_entropy 128 x 262144
  fp32: torch eager 384 vs 387 MiB, ours 208 vs 216 MiB). A subprocess per measurement would cost
  seconds each, and in one process freed memory the C allocator keeps hides later peaks from RSS.

The gradient the step leaves in ``.grad`` counts (it is allocated during the step). The reported
``peak_bytes`` adds the inputs' bytes, so it is what the step needs in all; ``extra_bytes -
grads_bytes`` is the working memory beyond the inputs and the gradients the step must return. A
gradient written into an input's own storage (Liger-Kernel's cross-entropy overwrites the logits)
allocates nothing: it is left out of ``grads_bytes`` and its bytes are reported as
``aliased_grads_bytes``, so the working memory stays comparable across providers.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import tempfile
from collections.abc import Callable

import torch

from .registry import Case
from .timing import fwd_bwd

CPU_METHOD = "torch.profiler allocation events (PyTorch CPU allocator), peak of the running sum"
CUDA_METHOD = "torch.cuda.max_memory_allocated"

# Lines the profiler writes to stderr on every use; anything else written there is passed on.
_PROFILER_NOISE = ("USDT:", "STAGE:", "Memory block of unknown size")


def peak_memory(fn: Callable, case: Case, device: torch.device) -> dict:
    """``{"peak_bytes", "extra_bytes", "inputs_bytes", "grads_bytes", "method"}`` for one forward+backward."""
    case.clear_grads()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fwd_bwd(fn, case)
        torch.cuda.synchronize(device)
        extra, method = torch.cuda.max_memory_allocated(device) - base, CUDA_METHOD
    else:
        extra, method = _cpu_extra_peak(lambda: fwd_bwd(fn, case)), CPU_METHOD
    fresh, aliased = _grad_bytes(case)
    return {
        "peak_bytes": case.nbytes + extra,
        "extra_bytes": extra,
        "inputs_bytes": case.nbytes,
        "grads_bytes": fresh,
        "aliased_grads_bytes": aliased,
        "method": method,
    }


def _grad_bytes(case: Case) -> tuple[int, int]:
    """Bytes of the ``.grad`` tensors the step left: ``(in storage of their own, in an input's storage)``."""
    inputs = {a.untyped_storage().data_ptr() for a in case.args if isinstance(a, torch.Tensor)}
    fresh = aliased = 0
    for t in case.grad_inputs:
        nbytes = t.numel() * t.element_size()
        if t.grad is not None and t.grad.untyped_storage().data_ptr() in inputs:
            aliased += nbytes
        else:
            fresh += nbytes
    return fresh, aliased


def _cpu_extra_peak(run: Callable[[], None]) -> int:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    allocs = []
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
    current = peak = 0
    for _, size in sorted(allocs, key=lambda a: a[0]):
        current += size  # negative for a free
        peak = max(peak, current)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """Capture file descriptor 2 (the profiler's C++ logging) and pass on what is not its routine noise."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (e.g. captured by a harness): nothing to quiet
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines():
                if line.strip() and not any(n in line for n in _PROFILER_NOISE):
                    print(line, file=sys.stderr)
