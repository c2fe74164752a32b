"""Timing: forward, backward and forward+backward medians with spread, and the device's copy bandwidth.

* CUDA: ``triton.testing.do_bench`` (L2 flushed before each run, gradients reset, per-run CUDA
  events) for the forward and the forward+backward. The backward alone cannot be timed by
  ``do_bench`` (each run needs a fresh forward), so :func:`_cuda_backward` follows do_bench's
  method with the forward run untimed before each timed backward. Every CUDA timing takes at
  least ``min_reps`` runs (``rep`` is raised for long calls, such as a linear cross-entropy step of
  40 ms, where do_bench's default ``rep`` would take two).
* CPU: wall clock (``time.perf_counter``). Each iteration runs the forward and then the backward
  and records three samples: the forward, the backward and their sum, after one untimed warm-up
  iteration; iterations repeat until ``rep_ms`` has passed and at least ``min_reps`` were taken.

Every result is a :class:`Stats` (median, 20th and 80th percentiles, min, max, sample count) in ms.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .registry import Case

# Samples a CUDA backward measurement may take at most (each one also runs an untimed forward).
_MAX_CUDA_BWD_REPS = 1000


@dataclass(frozen=True)
class Stats:
    """Summary of one timing, in milliseconds."""

    median: float
    p20: float
    p80: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, samples_ms: list[float]) -> Stats:
        s = sorted(samples_ms)
        q = statistics.quantiles(s, n=10, method="inclusive") if len(s) > 1 else [s[0]] * 9
        return cls(statistics.median(s), q[1], q[7], s[0], s[-1], len(s))

    @property
    def spread(self) -> float:
        """Half the 20-80 percentile range, relative to the median."""
        return (self.p80 - self.p20) / (2 * self.median) if self.median > 0 else 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def forward(fn: Callable, case: Case) -> torch.Tensor:
    return fn(*case.args)


def backward(out: torch.Tensor, case: Case) -> None:
    out.backward(case.grad_out)


def fwd_bwd(fn: Callable, case: Case) -> None:
    """One training step's pair: forward then backward (gradients land in ``.grad``)."""
    backward(forward(fn, case), case)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_call(fn: Callable, case: Case, device: torch.device) -> float:
    """Seconds of the first forward+backward (includes torch.compile's compile, Triton's JIT)."""
    case.clear_grads()
    sync(device)
    t0 = time.perf_counter()
    fwd_bwd(fn, case)
    sync(device)
    return time.perf_counter() - t0


def time_modes(
    fn: Callable, case: Case, device: torch.device, *, warmup_ms: float, rep_ms: float, min_reps: int
) -> dict[str, Stats]:
    """Forward, backward and forward+backward timings of ``fn`` on ``case`` (warm: call :func:`first_call`)."""
    if device.type == "cuda":
        return _cuda_modes(fn, case, warmup_ms, rep_ms, min_reps)
    return _cpu_modes(fn, case, rep_ms, min_reps)


def _cpu_modes(fn: Callable, case: Case, rep_ms: float, min_reps: int) -> dict[str, Stats]:
    samples: dict[str, list[float]] = {"fwd": [], "bwd": [], "fwd+bwd": []}
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(samples["fwd"]) < min_reps or time.perf_counter() < deadline:
        case.clear_grads()
        t0 = time.perf_counter()
        out = forward(fn, case)
        t1 = time.perf_counter()
        backward(out, case)
        t2 = time.perf_counter()
        del out
        samples["fwd"].append((t1 - t0) * 1e3)
        samples["bwd"].append((t2 - t1) * 1e3)
        samples["fwd+bwd"].append((t2 - t0) * 1e3)
    return {k: Stats.of(v) for k, v in samples.items()}


_RETURNS_ALL: bool | None = None  # whether this triton's do_bench takes return_mode="all" (probed once)


def _do_bench_returns_all() -> bool:
    """Probe ``do_bench(..., return_mode="all")`` once on a no-op (older tritons reject the mode)."""
    global _RETURNS_ALL
    if _RETURNS_ALL is None:
        from triton.testing import do_bench

        try:
            do_bench(lambda: None, warmup=1, rep=1, return_mode="all")
            _RETURNS_ALL = True
        except (AssertionError, TypeError, ValueError):
            _RETURNS_ALL = False
    return _RETURNS_ALL


def _rep_for(fn: Callable, rep_ms: float, min_reps: int) -> float:
    """``do_bench``'s ``rep`` (ms) that gives at least ``min_reps`` timed runs of ``fn``.

    do_bench times ``rep / estimate`` runs (its estimate includes the L2 flush, about 0.1 ms), so a
    call of 40 ms under ``rep=100`` gets 2 samples; here two synchronised wall-clock runs estimate the
    call (an upper bound of its GPU time) and ``rep`` grows to cover ``min_reps`` runs with a margin.
    """
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    est_ms = (time.perf_counter() - t0) * 1e3 / 2
    return max(rep_ms, 1.25 * min_reps * (est_ms + 0.2))


def _do_bench(
    fn: Callable, warmup_ms: float, rep_ms: float, grad_to_none: list[torch.Tensor], min_reps: int = 1
) -> Stats:
    from triton.testing import do_bench

    rep = _rep_for(fn, rep_ms, min_reps) if min_reps > 1 else rep_ms
    if _do_bench_returns_all():
        return Stats.of(list(do_bench(fn, warmup=warmup_ms, rep=rep, grad_to_none=grad_to_none, return_mode="all")))
    q = do_bench(fn, warmup=warmup_ms, rep=rep, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8, 0, 1])
    return Stats(q[0], q[1], q[2], q[3], q[4], -1)


def _cuda_modes(fn: Callable, case: Case, warmup_ms: float, rep_ms: float, min_reps: int) -> dict[str, Stats]:
    grads = case.grad_inputs
    return {
        "fwd": _do_bench(lambda: forward(fn, case), warmup_ms, rep_ms, grads, min_reps),
        "bwd": _cuda_backward(fn, case, warmup_ms, rep_ms, min_reps),
        "fwd+bwd": _do_bench(lambda: fwd_bwd(fn, case), warmup_ms, rep_ms, grads, min_reps),
    }


def _cuda_backward(fn: Callable, case: Case, warmup_ms: float, rep_ms: float, min_reps: int = 5) -> Stats:
    """do_bench's method for the backward alone: per run, an untimed forward and L2 flush, then timed events."""
    cache = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")

    def fresh():
        case.clear_grads()
        out = forward(fn, case)
        cache.zero_()
        return out

    def timed(n: int) -> list[float]:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            out = fresh()
            start.record()
            backward(out, case)
            end.record()
            del out
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in events]

    # Estimate a whole iteration (forward + flush + backward) to bound the time spent.
    t0 = time.perf_counter()
    est_bwd = statistics.mean(timed(5))
    est_iter = (time.perf_counter() - t0) * 1e3 / 5
    n_warmup = max(1, int(warmup_ms / max(est_iter, 1e-3)))
    wanted = int(rep_ms / max(est_bwd, 1e-3))  # do_bench's count for this backward
    affordable = int(10 * rep_ms / max(est_iter, 1e-3))  # each sample also costs a forward
    n_repeat = max(5, min_reps, min(wanted, affordable, _MAX_CUDA_BWD_REPS))
    timed(n_warmup)
    return Stats.of(timed(n_repeat))


def copy_bandwidth(device: torch.device, nbytes: int, *, rep_ms: float, min_reps: int) -> tuple[float, Stats]:
    """The device's copy bandwidth in GB/s: ``dst.copy_(src)`` of ``nbytes``, counted as read + write.

    ``nbytes`` should exceed the last-level cache (1 GiB does on both the H100/H200 and this CPU).
    """
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    copy = lambda: dst.copy_(src)
    if device.type == "cuda":
        # 500 ms of warm-up (about a thousand copies of 1 GiB): the first work of a process on a GPU
        # that was idle must not be timed at idle clocks, which would understate the bandwidth and
        # overstate every "% of copy" measured against it.
        st = _do_bench(copy, 500, rep_ms, [], min_reps)
    else:
        copy()
        samples = []
        deadline = time.perf_counter() + rep_ms / 1e3
        while len(samples) < min_reps or time.perf_counter() < deadline:
            t0 = time.perf_counter()
            copy()
            samples.append((time.perf_counter() - t0) * 1e3)
        st = Stats.of(samples)
    return 2 * src.numel() * 4 / (st.median * 1e-3) / 1e9, st
