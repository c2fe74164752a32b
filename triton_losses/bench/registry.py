"""The op registry: what the benchmark and the self-check know about each op.

An :class:`Op` says how to build one problem (:class:`Case`) for a :class:`Size`, dtype and device,
which callables compute it (ours, torch's eager reference, Liger-Kernel's if it has one), and how
many bytes the op must move. Adding an op is one :func:`register` call; see ``ops.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
"""Forward (inputs requiring grad, as in training), backward alone, and one training step's pair."""


@dataclass(frozen=True)
class Size:
    """One problem size: ``N`` rows (tokens), ``V`` columns (vocabulary), ``H`` hidden (linear ops)."""

    N: int
    V: int
    H: int | None = None

    @property
    def label(self) -> str:
        return f"{self.N}x{self.V}" + ("" if self.H is None else f"x{self.H}")


@dataclass
class Case:
    """The inputs of one call: ``fn(*args)``; ``grad_out`` is the upstream gradient for a non-scalar output."""

    args: tuple
    grad_out: torch.Tensor | None = None

    @property
    def grad_inputs(self) -> list[torch.Tensor]:
        """The inputs the backward differentiates (those with ``requires_grad``)."""
        return [a for a in self.args if isinstance(a, torch.Tensor) and a.requires_grad]

    @property
    def nbytes(self) -> int:
        """Bytes held by the inputs (and ``grad_out``)."""
        tensors = [a for a in (*self.args, self.grad_out) if isinstance(a, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def clear_grads(self) -> None:
        for t in self.grad_inputs:
            t.grad = None


@dataclass(frozen=True)
class Op:
    """One benchmarked op.

    Attributes:
        name: the public function's name in ``triton_losses``.
        inputs: ``(size, dtype, device) -> Case``; float inputs that need a gradient have ``requires_grad``.
        ours: ``(*case.args) -> Tensor``, calling ``triton_losses``.
        torch: ``(*case.args) -> Tensor``, the eager PyTorch reference (also what ``torch.compile`` compiles).
        bytes_moved: ``(size, element_size) -> {mode: bytes}``: what an ideal implementation must read
            and write for each of :data:`MODES` (the same count for every provider, so GB/s compares times).
        bytes_note: the same count as text, for the tables.
        axes: the size axes the op uses (``("N", "V")`` or ``("N", "V", "H")``).
        liger: ``() -> callable``: loads Liger-Kernel's equivalent (called with ``case.args``); None if it has none.
        flops: optional ``(size) -> {mode: flops}`` for matmul-bound ops (reported as TFLOP/s).
        check_sizes: small sizes for ``triton-losses check``.
    """

    name: str
    inputs: Callable[[Size, torch.dtype, torch.device], Case]
    ours: Callable[..., torch.Tensor]
    torch: Callable[..., torch.Tensor]
    bytes_moved: Callable[[Size, int], dict[str, int]]
    bytes_note: str
    axes: tuple[str, ...] = ("N", "V")
    liger: Callable[[], Callable[..., torch.Tensor]] | None = None
    flops: Callable[[Size], dict[str, int]] | None = None
    check_sizes: tuple[Size, ...] = field(default=(Size(64, 1000), Size(8, 50257)))

    def liger_fn(self) -> Callable[..., torch.Tensor]:
        """Liger-Kernel's callable; raises ``LookupError`` with the reason when there is none."""
        if self.liger is None:
            raise LookupError(f"Liger-Kernel has no {self.name}")
        try:
            return self.liger()
        except (ImportError, AttributeError) as e:
            raise LookupError(f"the installed Liger-Kernel has no {self.name} ({e})") from e

    def sizes_for(self, sizes: list[Size], hidden: list[int]) -> list[Size]:
        """The sizes this op runs: ``H`` dropped if unused, else each size without one gets every ``hidden``."""
        out: list[Size] = []
        for s in sizes:
            if "H" not in self.axes:
                cand = [Size(s.N, s.V)]
            else:
                cand = [s] if s.H is not None else [Size(s.N, s.V, h) for h in hidden]
            out += [c for c in cand if c not in out]
        return out


OPS: dict[str, Op] = {}


def register(op: Op) -> Op:
    """Add ``op`` to the registry (replacing one of the same name) and return it."""
    OPS[op.name] = op
    return op


def get_ops(names: list[str] | None = None) -> list[Op]:
    """The registered ops in registration order, or those named (``ValueError`` for an unknown name)."""
    if not names:
        return list(OPS.values())
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {', '.join(unknown)}; registered: {', '.join(OPS)}")
    return [OPS[n] for n in names]
