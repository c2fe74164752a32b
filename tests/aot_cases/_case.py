"""The one AOT case builder: a kernel specialisation described as the launch the runtime would see.

A :class:`Case` holds a value for every argument of a ``@triton.jit`` kernel: a :class:`Ptr`
(dtype and a 16-byte-aligned address) for each tensor, a Python int or float for each scalar, and
the constexprs. ``tests/aot_compile.py`` hands those values to triton's own launch binder, so the
signature it compiles is the one a real launch gets (integers that are multiples of 16 carry the
divisibility hint, integers equal to 1 become constants, i32 or i64 by value, aligned pointers):
nothing here restates triton's specialisation rules. The scalar values describe a realistic launch
(contiguous rows of an LM vocabulary, strides multiples of 16) named by ``launch``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from triton_losses.kernels._common import assert_options

# Representative launch: N tokens x an LM vocabulary (Llama 3), and an unaligned vocabulary (GPT-2).
ROWS = 8192
VOCAB = 128256
ODD_VOCAB = 50257
# Rows of a K-dim input (N, C, d1..dk) seen as (A, C, B): B positions per sample.
KDIM_B = 64

DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "fp64": torch.float64,
    "i64": torch.int64,
    "i32": torch.int32,
    "u8": torch.uint8,
    "i1": torch.bool,
}
FLOAT_NAMES: dict[torch.dtype, str] = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
}

# The launch options of the kernels holding a ``tl.device_assert`` on CUDA (``_common.assert_options``).
ASSERT_OPTIONS = assert_options(SimpleNamespace(is_cuda=True))

# Registers per SM on sm_80 / sm_90, and the resident warps per SM a launch is held to by default
# (4 per scheduler, 25% occupancy): at most 65536 / (16 * 32) = 128 registers per thread.
REGISTERS_PER_SM = 65536
MIN_WARPS_PER_SM = 16


@dataclass(frozen=True)
class Ptr:
    """A tensor argument as triton's binder reads it: ``dtype`` and ``data_ptr()`` (16-byte aligned)."""

    name: str
    address: int = 1 << 20

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def data_ptr(self) -> int:
        return self.address

    def __repr__(self) -> str:
        return self.name


def is_constexpr(param: inspect.Parameter) -> bool:
    """Whether a kernel parameter is a ``tl.constexpr`` (the test triton's own ``KernelParam`` applies)."""
    from triton.runtime.jit import KernelParam

    return KernelParam(0, param, False, False).is_constexpr


def parameters(kernel) -> list[inspect.Parameter]:
    """The parameters of a ``@triton.jit`` kernel (a JITFunction, or an InterpretedFunction)."""
    return list(inspect.signature(kernel.fn).parameters.values())


@dataclass(frozen=True)
class Case:
    """One kernel specialisation a launcher produces, as the values of one launch.

    Attributes:
        kernel: the ``@triton.jit`` function.
        args: ``(name, value)`` of every runtime argument in order: a :class:`Ptr` or an int / float.
        constexprs: ``(name, value)`` of every ``tl.constexpr`` argument.
        num_warps: the launch's ``num_warps``.
        options: ``(name, value)`` of the launch's other compile options (e.g. ``debug=True``).
        launch: the representative launch the scalar values describe (e.g. ``"8192x128256"``).
        vector_io: what the SASS must hold: ``"load"`` a 128-bit global load (``LDG.E.128``),
            ``"store"`` a 128-bit global store (``STG.E.128``); for streaming row kernels.
        programs_per_sm: programs per SM the launch relies on (None: ``MIN_WARPS_PER_SM`` warps).
    """

    kernel: Any
    args: tuple[tuple[str, Any], ...]
    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int
    options: tuple[tuple[str, Any], ...]
    launch: str
    vector_io: tuple[str, ...] = ()
    programs_per_sm: int | None = None

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def key(self) -> str:
        """A unique name: pointer dtypes, constexpr values, warps and the launch."""
        ptrs = ",".join(f"{k}:{v}" for k, v in self.args if isinstance(v, Ptr))
        flags = ",".join(f"{k}={getattr(v, 'name', v)}" for k, v in self.constexprs)
        opts = "".join(f",{k}={v}" for k, v in self.options)
        return f"{self.name}[{ptrs}|{flags}|warps={self.num_warps}{opts}|{self.launch}]"

    def launch_kwargs(self) -> dict[str, Any]:
        """Every argument by name, as ``kernel[grid](**kwargs)`` would receive it (options excluded)."""
        return {**dict(self.args), **dict(self.constexprs)}

    def launch_options(self) -> dict[str, Any]:
        """The launch's compile options: ``num_warps`` and the others."""
        return {"num_warps": self.num_warps, **dict(self.options)}

    def max_registers(self) -> int:
        """Registers per thread that keep ``programs_per_sm`` programs resident (allocated in 8s)."""
        threads = 32 * self.num_warps * (self.programs_per_sm or max(1, MIN_WARPS_PER_SM // self.num_warps))
        return min(255, REGISTERS_PER_SM // threads // 8 * 8)

    def __repr__(self) -> str:
        return self.key


def case(
    kernel,
    *,
    ptrs: Mapping[str, str],
    scalars: Mapping[str, int | float],
    constexprs: Mapping[str, Any],
    num_warps: int,
    launch: str,
    options: Mapping[str, Any] | None = None,
    vector_io: Iterable[str] = (),
    programs_per_sm: int | None = None,
) -> Case:
    """A :class:`Case` of ``kernel``, from family-wide tables of pointer dtypes and scalar values.

    ``ptrs`` and ``scalars`` may name arguments of other kernels of the family (they are shared);
    every argument of ``kernel`` must get a value, and every constexpr exactly one.

    Args:
        kernel: the ``@triton.jit`` function.
        ptrs: pointer argument name -> dtype name (``"bf16"``, ``"i64"``, ...).
        scalars: scalar argument name -> the value a representative launch passes.
        constexprs: constexpr name -> value.
        num_warps: the launch's ``num_warps``.
        launch: name of the representative launch.
        options: the launch's other compile options (``debug``, ``num_stages``, ...), as it passes them.
        vector_io: ``"load"`` / ``"store"``: the 128-bit accesses the SASS must contain.
        programs_per_sm: the occupancy the launch relies on, or None for the default.

    Raises:
        ValueError: an argument has no value, or a constexpr is unknown or missing.
    """
    params = parameters(kernel)
    const_names = [p.name for p in params if is_constexpr(p)]
    args, missing = [], []
    for p in params:
        if p.name in const_names:
            continue
        if p.name in ptrs:
            args.append((p.name, Ptr(ptrs[p.name])))
        elif p.name in scalars:
            args.append((p.name, scalars[p.name]))
        else:
            missing.append(p.name)
    unknown = sorted(set(constexprs) - set(const_names))
    missing += [n for n in const_names if n not in constexprs]
    if missing or unknown:
        raise ValueError(f"{kernel.fn.__name__}: no AOT value for {missing}; not constexprs of it: {unknown}")
    consts = tuple((n, constexprs[n]) for n in const_names)
    opts = tuple(sorted((options or {}).items()))
    return Case(kernel, tuple(args), consts, num_warps, opts, launch, tuple(vector_io), programs_per_sm)


def strides(prefix: str, C: int, B: int = 1) -> dict[str, int]:
    """``s_<prefix>a``, ``s_<prefix>c``, ``s_<prefix>b`` of a contiguous tensor seen as ``(A, C, B)``."""
    return {f"s_{prefix}a": C * B, f"s_{prefix}c": B, f"s_{prefix}b": 1}


def reachable(
    launch_config: Callable[[int, int, bool], tuple],
    elem_size: int,
    split: Callable[[tuple, int], tuple] = lambda config, C: (),
    max_log2: int = 20,
) -> dict[tuple, tuple[int, bool]]:
    """Every launch configuration ``launch_config(C, elem_size, contiguous)`` returns, with a C producing it.

    Row lengths ``2**p`` and ``2**p + 1`` for ``p <= max_log2``, rows contiguous or not; the value is
    the largest such ``(C, contiguous)`` (a multiple of 16 where one exists), so each configuration is
    compiled at a realistic specialisation. ``split(config, C)`` adds what else the launcher derives
    from C to the key (e.g. whether one block holds the row).

    Returns:
        dict: ``(*config, *split(config, C))`` -> ``(C, contiguous)``.
    """
    out: dict[tuple, tuple[int, bool]] = {}
    for contiguous in (True, False):
        for p in range(max_log2 + 1):
            for C in (1 << p) + 1, 1 << p:
                config = tuple(launch_config(C, elem_size, contiguous))
                out[(*config, *split(config, C))] = (C, contiguous)
    return out


def dtype_name(dtype: torch.dtype) -> str:
    """The :data:`DTYPES` name of ``dtype``."""
    return next(name for name, d in DTYPES.items() if d == dtype)


def capture(kernel, launch: Callable[[], object]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The launches of ``kernel`` that ``launch()`` makes, recorded instead of run.

    ``launch`` calls a family's own launcher (usually on ``meta`` tensors of a realistic shape), so the
    recorded values are exactly those the launcher computes: strides, collapsed dimensions, flags.

    Returns:
        list: ``(arguments by name, launch options)`` per launch, options being ``num_warps`` and the like.
    """
    calls: list[tuple[tuple, dict]] = []
    kernel.run = lambda *args, grid, warmup, **kwargs: calls.append((args, kwargs))
    try:
        launch()
    finally:
        del kernel.run
    names = [p.name for p in parameters(kernel)]
    out = []
    for args, kwargs in calls:
        bound = dict(zip(names, args, strict=False))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        out.append((bound, {k: v for k, v in kwargs.items() if k not in names}))
    return out


def launched(
    kernel,
    launch: Callable[[], object],
    *,
    name: str,
    options: Mapping[str, Any] | None = None,
    vector_io: Iterable[str] = (),
    programs_per_sm: int | None = None,
) -> list[Case]:
    """The :class:`Case` of every launch of ``kernel`` that ``launch()`` makes (see :func:`capture`).

    Args:
        kernel: the ``@triton.jit`` function.
        launch: calls the family's launcher.
        name: the representative launch's name (the cases' ``launch``).
        options: compile options the launcher adds only on CUDA (e.g. ``debug=True``), merged in.
        vector_io, programs_per_sm: as in :func:`case`.
    """
    out = []
    for bound, opts in capture(kernel, launch):
        opts = {**opts, **(options or {})}
        ptrs = {k: dtype_name(v.dtype) for k, v in bound.items() if isinstance(v, torch.Tensor)}
        scalars = {k: v for k, v in bound.items() if not isinstance(v, torch.Tensor)}
        consts = {p.name: scalars.pop(p.name) for p in parameters(kernel) if is_constexpr(p) and p.name in scalars}
        out.append(case(kernel, ptrs=ptrs, scalars=scalars, constexprs=consts, num_warps=opts.pop("num_warps", 4),
                        options=opts, launch=name, vector_io=vector_io, programs_per_sm=programs_per_sm))  # fmt: skip
    return out


def meta(*shape: int, dtype: str = "bf16", row_stride: int | None = None) -> torch.Tensor:
    """A ``meta`` tensor (no memory) for :func:`capture`: contiguous, or 2-D rows ``row_stride`` apart
    (the rows of a wider tensor, which an elementwise launcher cannot collapse into one dimension)."""
    if row_stride is None:
        return torch.empty(shape, dtype=DTYPES[dtype], device="meta")
    return torch.empty(shape[0], row_stride, dtype=DTYPES[dtype], device="meta")[:, : shape[1]]


def elementwise_shapes(tile: int) -> list[tuple[str, dict]]:
    """``(launch name, meta() keywords)`` of the launches that reach each block shape of an elementwise
    launcher with ``tile`` lanes: one contiguous ``ROWS x ROWS`` tensor (one row of ``tile`` per
    program), then rows of ``2**p < tile`` columns out of a tensor twice as wide (``tile // 2**p`` per program)."""
    out = [(f"{ROWS}x{ROWS}", dict(shape=(ROWS, ROWS)))]
    p = 1
    while (1 << p) < tile:
        out.append((f"{ROWS}x{1 << p} rows", dict(shape=(ROWS, 1 << p), row_stride=2 << p)))
        p += 1
    return out


def upstream(x: torch.Tensor, scalar: bool) -> torch.Tensor:
    """An elementwise backward's upstream gradient at ``x``'s shape: for 'mean' / 'sum' one fp32 (fp64)
    value broadcast (stride 0), for 'none' a tensor of ``x``'s shape and dtype."""
    if scalar:
        return meta(1, dtype="fp64" if x.dtype == torch.float64 else "fp32").expand(x.shape)
    return meta(*x.shape, dtype=dtype_name(x.dtype))
