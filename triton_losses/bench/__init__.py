"""The benchmark suite and self-check behind ``triton-losses bench`` and ``triton-losses check``.

Files, by what they hold:

* ``registry.py``: :class:`Op`, :class:`Size`, :class:`Case` and :func:`register`;
* ``ops.py``: the registered ops (input builders, ours / torch callables, bytes each must move);
* ``providers.py``: torch eager, ours, torch.compile, Liger-Kernel, and why one is missing;
* ``timing.py``: medians with spread (``do_bench`` on CUDA, wall clock on CPU), copy bandwidth;
* ``memory.py``: peak memory (``max_memory_allocated`` on CUDA, allocator events on CPU);
* ``meta.py``: device, versions, date, commit, the reproducing command line;
* ``runner.py``: the loop; ``report.py``: tables and JSON; ``plots.py``: the PNG;
* ``check.py``: ``triton-losses check``; ``cli.py``: argument parsing and per-device defaults.

Nothing here is imported by ``import triton_losses``.
"""

from . import ops as _ops  # noqa: F401  (registers the built-in ops; registry.py imports nothing of them)
from .registry import MODES, OPS, Case, Op, Size, get_ops, register

__all__ = ["MODES", "OPS", "Case", "Op", "Size", "get_ops", "register"]
