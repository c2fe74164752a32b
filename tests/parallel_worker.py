"""One rank of the vocabulary-parallel tests: ``python -m tests.parallel_worker RANK WORLD INIT SUITES``.

``SUITES``: comma-separated ``cases``, ``comm``, ``dtensor``, ``linear``, ``nosync`` (the kernels only; ``nccl:``
first: NCCL on ``cuda:<rank>``).

Every rank builds the same full tensors from a shared seed, keeps its slice of the classes, runs
``triton_losses.cross_entropy(..., process_group=...)`` (or a ``DTensor`` input) and compares the loss
and its slice of the gradient with the single-process function on the full tensors (fp64 as the
reference, the same dtype as the budget, tests/helpers.py ``budget_close``). It exits 0 after
printing ``ok <suite>:<cases> ...``; any failure raises (exit 1, traceback on stderr). The backend comes from the
environment (``TRITON_LOSSES_BACKEND``, ``TRITON_INTERPRET``) the parent sets.
"""

from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

import triton_losses
from tests.helpers import budget_close

DEVICE = torch.device("cpu")  # cuda:<rank> for the NCCL suites

# (name, full shape builder args, options): N rows, V classes, spatial d (0: none), dtype, prob targets.
CASES = [
    ("plain-mean", dict(), dict()),
    ("weight-valid-ignore", dict(weight=True), dict(ignore_index=3)),
    ("smooth-weight-sum", dict(weight=True, ignored=True), dict(label_smoothing=0.1, reduction="sum")),
    ("smooth-z-cap-none", dict(ignored=True), dict(label_smoothing=0.2, z_loss=1e-2, softcap=3.0, reduction="none")),
    (
        "smooth-weight-ignored-mean-inplace",
        dict(weight=True, ignored=True),
        dict(label_smoothing=0.15, inplace_backward=True),
    ),
    ("prob-smooth-weight-mean", dict(prob=True, weight=True), dict(label_smoothing=0.1)),
    ("prob-z-cap-none", dict(prob=True), dict(z_loss=1e-2, softcap=4.0, reduction="none")),
    ("spatial-weight-smooth-none", dict(d=3, weight=True), dict(label_smoothing=0.1, reduction="none")),
    ("bf16-smooth-weight-mean", dict(dtype=torch.bfloat16, weight=True), dict(label_smoothing=0.1, z_loss=1e-3)),
    ("fp64-none", dict(dtype=torch.float64, ignored=True), dict(reduction="none", z_loss=1e-3)),
    # logits 1000 + 2 randn: the ranks' weighted sums are rebased on the global max, never summed from 0
    (
        "offset-prob-smooth-weight-none",
        dict(prob=True, weight=True, offset=1e3),
        dict(label_smoothing=0.2, reduction="none"),
    ),
    ("offset-smooth-weight-none", dict(weight=True, offset=1e3), dict(label_smoothing=0.2, reduction="none")),
]


def _split(V: int, world: int) -> list[int]:
    """Uneven class counts in rank order (one slice empty with 4 ranks)."""
    if world == 2:
        return [V // 2 + 2, V - V // 2 - 2]
    base = [V // 2, 0, V // 4]
    return [*base, V - sum(base)]


def _full(seed: int, N: int, V: int, d: int, dtype, prob: bool, weight: bool, ignored: bool, offset: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    shape = (N, V) if not d else (N, V, d)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset).to(dtype)
    if prob:
        t = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), 1).to(dtype)
    else:
        t = torch.randint(0, V, shape[:1] + shape[2:], generator=g)
        if ignored:
            t.view(-1)[::3] = -100
    w = (torch.rand(V, generator=g, dtype=torch.float64) + 0.5).to(dtype) if weight else None
    gout = torch.randn(shape[:1] + shape[2:], generator=g, dtype=torch.float64)
    return x.to(DEVICE), t.to(DEVICE), None if w is None else w.to(DEVICE), gout.to(DEVICE)


def _loss_and_grad(fn, x, t, w, gout, opts):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, t, w, opts)
    up = gout.to(out.dtype) if out.dim() else torch.ones((), dtype=out.dtype, device=out.device)
    out.backward(up)
    return out.detach(), x.grad


def _single(x, t, w, opts):
    return triton_losses.cross_entropy(x, t, w, **opts)


class _Recorder:
    """Counts this rank's ``all_reduce`` / ``all_gather_into_tensor`` calls and the elements they carry."""

    def __init__(self):
        self.calls: list[tuple[str, int]] = []
        self._orig = (dist.all_reduce, dist.all_gather_into_tensor)

    def __enter__(self):
        ar, ag = self._orig

        def all_reduce(t, *a, **k):
            self.calls.append(("all_reduce", t.numel()))
            return ar(t, *a, **k)

        def all_gather_into_tensor(out, inp, *a, **k):
            self.calls.append(("all_gather", out.numel()))
            return ag(out, inp, *a, **k)

        dist.all_reduce, dist.all_gather_into_tensor = all_reduce, all_gather_into_tensor
        return self

    def __exit__(self, *exc):
        dist.all_reduce, dist.all_gather_into_tensor = self._orig


def _check_same_on_ranks(v: torch.Tensor, world: int) -> None:
    got = [torch.empty_like(v) for _ in range(world)]
    dist.all_gather(got, v.contiguous())
    for o in got:
        assert torch.equal(o.view(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), "ranks disagree"


def run_cases(rank: int, world: int, V: int = 13, N: int = 4) -> int:
    sizes = _split(V, world)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    pg = dist.group.WORLD
    for i, (name, build, opts) in enumerate(CASES):
        dtype = build.get("dtype", torch.float32)
        d, prob = build.get("d", 0), build.get("prob", False)
        x, t, w, gout = _full(100 + i, N, V, d, dtype, prob, build.get("weight", False), build.get("ignored", False),
                              build.get("offset", 0.0))  # fmt: skip
        if opts.get("ignore_index", -100) >= 0:
            t[0] = opts["ignore_index"]
        ref64, g64 = _loss_and_grad(
            _single, x.double(), t.double() if prob else t, None if w is None else w.double(), gout, opts
        )
        low, glow = _loss_and_grad(_single, x, t, w, gout, opts)
        xs, ts = x[:, lo:hi], (t[:, lo:hi] if prob else t)

        def par(xl, tl_, wl, o):
            return triton_losses.cross_entropy(xl, tl_, wl, **o, process_group=pg)

        xl = xs.detach().clone().requires_grad_(True)
        with _Recorder() as rec:
            out = par(xl, ts, w, opts)
        kinds = [k for k, _ in rec.calls]
        assert kinds == ["all_gather", "all_reduce", "all_reduce"], (name, rec.calls)
        assert all(n <= 5 * N * max(d, 1) for k, n in rec.calls if k == "all_reduce"), (name, rec.calls)
        with _Recorder() as rec:
            out.backward(gout.to(out.dtype) if out.dim() else torch.ones((), dtype=out.dtype, device=out.device))
        assert rec.calls == [], (name, rec.calls)
        try:
            assert out.dtype == low.dtype and out.shape == low.shape, (out.dtype, out.shape)
            budget_close(out.detach(), ref64, low)
            budget_close(xl.grad, g64[:, lo:hi], glow[:, lo:hi])
        except AssertionError as e:
            raise AssertionError(f"case {name} rank {rank}: {e}") from e
        _check_same_on_ranks(out.detach(), world)
    return len(CASES)


def run_comm_debug(rank: int, world: int) -> int:
    """The forward's collectives seen by ``CommDebugMode``: one all-gather of sizes, two all-reduces."""
    from torch.distributed.tensor.debug import CommDebugMode

    V, N = 11, 3
    sizes = _split(V, world)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    x, t, w, _ = _full(7, N, V, 0, torch.float32, False, True, False)
    xl = x[:, lo:hi].clone().requires_grad_(True)
    mode = CommDebugMode()
    with mode:
        out = triton_losses.cross_entropy(xl, t, w, label_smoothing=0.1, z_loss=1e-3, process_group=dist.group.WORLD)
    counts = {str(k): v for k, v in mode.get_comm_counts().items()}
    assert sum(counts.values()) == 3, counts
    assert sum(v for k, v in counts.items() if "allreduce" in k) == 2, counts
    with mode:
        out.backward()
    counts = {str(k): v for k, v in mode.get_comm_counts().items()}
    assert sum(counts.values()) == 0, counts
    return 1


def run_dtensor(rank: int, world: int) -> int:
    """DTensor ``Shard(1)`` logits against torch's ``loss_parallel()``, and the extra options against one process."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import loss_parallel

    mesh = init_device_mesh("cpu", (world,))
    n = 0
    for i, (V, opts) in enumerate([(13, dict()), (10, dict(reduction="sum", ignore_index=2)),
                                   (13, dict(reduction="none")), (13, dict(weight=True))]):  # fmt: skip
        x, t, w, gout = _full(200 + i, 4, V, 0, torch.float32, False, opts.pop("weight", False), False)
        if w is None:  # torch 2.13's loss_parallel backward gathers the weight at an ignored -100 target (fails)
            t[1] = opts.get("ignore_index", -100)
        up = torch.ones(()) if opts.get("reduction") != "none" else gout.float()
        dx = distribute_tensor(x.clone(), mesh, [Shard(1)]).requires_grad_(True)
        with loss_parallel():
            theirs = F.cross_entropy(dx, t, w, **opts)
            theirs.backward(distribute_tensor(up, mesh, [Replicate()]))
        ours_x = distribute_tensor(x.clone(), mesh, [Shard(1)]).requires_grad_(True)
        mode = CommDebugMode()
        with mode:
            ours = triton_losses.cross_entropy(ours_x, t, w, **opts)
        assert sum(v for k, v in mode.get_comm_counts().items() if "allreduce" in str(k)) == 2, mode.get_comm_counts()
        assert sum(mode.get_comm_counts().values()) == 2, mode.get_comm_counts()
        ours.backward(distribute_tensor(up, mesh, [Replicate()]))
        torch.testing.assert_close(ours.to_local(), theirs.to_local(), rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(ours_x.grad.to_local(), dx.grad.to_local(), rtol=2e-6, atol=1e-7)
        n += 1
    # Options loss_parallel lacks: label smoothing, z-loss, softcap, probability targets.
    for i, (prob, opts) in enumerate([(False, dict(label_smoothing=0.1, z_loss=1e-2, softcap=3.0)),
                                      (True, dict(label_smoothing=0.2))]):  # fmt: skip
        x, t, w, _ = _full(300 + i, 4, 13, 0, torch.float32, prob, True, False)
        ref, gref = _loss_and_grad(_single, x.double(), t.double() if prob else t, w.double(), None, opts)
        dx = distribute_tensor(x.clone(), mesh, [Shard(1)]).requires_grad_(True)
        dt = distribute_tensor(t, mesh, [Shard(1)]) if prob else t
        out = triton_losses.cross_entropy(dx, dt, w, **opts)
        out.backward()
        lo = dx.to_local()
        start = min(rank * -(-13 // world), 13)
        budget_close(out.to_local(), ref.float().double(), torch.tensor(float(ref), dtype=torch.float32))
        budget_close(dx.grad.to_local(), gref[:, start : start + lo.shape[1]])
        n += 1
    return n + _colwise_lm_head(mesh)


def _colwise_lm_head(mesh) -> int:
    """An lm_head under ``ColwiseParallel``: its DTensor logits into ``cross_entropy``, its DTensor weight
    into ``linear_cross_entropy``; loss and gradients against one process."""
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    N, H, V = 5, 6, 13
    g = torch.Generator().manual_seed(500)
    hidden = torch.randn(N, H, generator=g)
    W = torch.randn(V, H, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    opts = dict(label_smoothing=0.1, z_loss=1e-3)
    ref_h, ref_w = hidden.double().requires_grad_(True), W.double().requires_grad_(True)
    ref = triton_losses.cross_entropy(ref_h @ ref_w.t(), t, **opts)
    ref.backward()
    for fused in (False, True):
        head = torch.nn.Linear(H, V, bias=False)
        with torch.no_grad():
            head.weight.copy_(W)
        parallelize_module(head, mesh, ColwiseParallel(use_local_output=False))
        h = hidden.clone().requires_grad_(True)
        if fused:
            loss = triton_losses.linear_cross_entropy(h, head.weight, t, **opts)
        else:
            loss = triton_losses.cross_entropy(head(h), t, **opts)
        loss = loss.full_tensor() if hasattr(loss, "full_tensor") else loss
        loss.backward()
        budget_close(loss.detach(), ref.detach(), ref.detach().float())
        budget_close(head.weight.grad.full_tensor(), ref_w.grad, ref_w.grad.float())
        budget_close(h.grad, ref_h.grad, ref_h.grad.float())
    return 2


LINEAR_CASES = [
    ("plain-mean", dict(), dict()),
    ("bias-weight-smooth-sum", dict(bias=True, weight=True), dict(label_smoothing=0.1, reduction="sum")),
    ("prob-smooth-none", dict(prob=True, bias=True), dict(label_smoothing=0.2, reduction="none")),
    ("z-cap-valid-ignore-chunks", dict(weight=True), dict(z_loss=1e-2, softcap=3.0, ignore_index=2, chunk_size=2)),
    ("bf16-smooth-mean", dict(dtype=torch.bfloat16, bias=True), dict(label_smoothing=0.1)),
]


def _linear_full(seed: int, N: int, H: int, V: int, dtype, prob: bool, bias: bool, weight: bool):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 3
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    if prob:
        t = torch.softmax(torch.randn(N, V, generator=g, dtype=torch.float64), 1).to(dtype)
    else:
        t = torch.randint(0, V, (N,), generator=g)
        t[1] = -100
    w = (torch.rand(V, generator=g, dtype=torch.float64) + 0.5).to(dtype) if weight else None
    gout = torch.randn(N, generator=g, dtype=torch.float64)
    dev = [v if v is None else v.to(DEVICE) for v in (x.to(dtype), W.to(dtype), None if b is None else b.to(dtype))]
    return (*dev, t.to(DEVICE), None if w is None else w.to(DEVICE), gout.to(DEVICE))


def _linear_run(x, W, b, t, w, gout, opts, pg=None):
    leaves = [v.detach().clone().requires_grad_(True) if v is not None else None for v in (x, W, b)]
    kw = dict(process_group=pg) if pg is not None else {}
    out = triton_losses.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2], weight=w, **opts, **kw)
    return out, leaves


def run_linear(rank: int, world: int, V: int = 13, N: int = 5, H: int = 6) -> int:
    """``linear_cross_entropy(process_group=...)``: loss, the full input gradient and this rank's weight rows."""
    sizes = _split(V, world)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    pg = dist.group.WORLD
    for i, (name, build, opts) in enumerate(LINEAR_CASES):
        dtype, prob = build.get("dtype", torch.float32), build.get("prob", False)
        x, W, b, t, w, gout = _linear_full(400 + i, N, H, V, dtype, prob, build.get("bias", False),
                                           build.get("weight", False))  # fmt: skip
        if opts.get("ignore_index") is not None:
            t[0] = t[1] = opts["ignore_index"]
        up = gout if opts.get("reduction") == "none" else torch.ones((), dtype=torch.float64, device=DEVICE)
        results = []
        for cast in (torch.float64, dtype):
            xs = [None if v is None else v.to(cast) for v in (x, W, b, w)]
            out, leaves = _linear_run(*xs[:3], t.to(cast) if prob else t, xs[3], gout, opts)
            out.backward(up.to(out.dtype))
            results.append((out.detach(), [None if v is None else v.grad for v in leaves]))
        (ref, gref), (low, glow) = results
        ts = t[:, lo:hi] if prob else t
        out, leaves = _linear_run(x, W[lo:hi], None if b is None else b[lo:hi], ts, w, gout, opts, pg)
        with _Recorder() as rec:
            out.backward(up.to(out.dtype))
        # the input gradient's all-reduce: min(4, N) row pieces fixed by N alone, started as the chunks finish
        pieces = [(k * N // min(4, N), (k + 1) * N // min(4, N)) for k in range(min(4, N))]
        assert rec.calls == [("all_reduce", (b1 - a) * H) for a, b1 in pieces], (name, rec.calls)
        try:
            budget_close(out.detach(), ref, low)
            budget_close(leaves[0].grad, gref[0], glow[0])
            budget_close(leaves[1].grad, gref[1][lo:hi], glow[1][lo:hi])
            if b is not None:
                budget_close(leaves[2].grad, gref[2][lo:hi], glow[2][lo:hi])
        except AssertionError as e:
            raise AssertionError(f"linear case {name} rank {rank}: {e}") from e
        _check_same_on_ranks(out.detach(), world)
    return len(LINEAR_CASES)


def run_no_host_sync(rank: int, world: int) -> int:
    """On the kernels, with the value checks off as on CUDA by default: a plain process group's call (and its
    backward) reads nothing back to the host and builds no tensor from host data, for ``cross_entropy`` and
    ``linear_cross_entropy``; the slice's bounds stay on the device. A weight of the wrong length then fails
    on the device (``torch._assert_async``) after the same collectives on every rank."""
    from tests.op_counts import HOST_SYNCS, count_ops
    from triton_losses import _checks, parallel
    from triton_losses.kernels import cross_entropy as k

    launchers = [(k, name) for name in ("ce_partial", "ce_bwd", "ce_norm", "ce_finish", "scale_")]
    import pytest

    patch = pytest.MonkeyPatch()  # count_ops wraps its launchers through it
    for module in (_checks, parallel):
        patch.setattr(module, "eager_checks", lambda device: False)
    seen, real = [], parallel.slice_bounds
    patch.setattr(parallel, "slice_bounds", lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
    V, N, H = 13, 4, 6
    sizes = _split(V, world)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    pg = dist.group.WORLD
    try:
        x, t, w, _ = _full(600, N, V, 0, torch.float32, False, True, True)
        opts = dict(label_smoothing=0.1, z_loss=1e-3)
        xl = x[:, lo:hi].clone().requires_grad_(True)
        ops, launches = count_ops(
            lambda: triton_losses.cross_entropy(xl, t, w, **opts, process_group=pg).backward(), launchers, patch
        )
        assert not HOST_SYNCS & set(ops), ops
        assert launches["ce_partial"] == 1 and launches["ce_bwd"] == 1, launches
        _, gref = _loss_and_grad(_single, x.double(), t, w.double(), None, opts)
        budget_close(xl.grad, gref[:, lo:hi], _loss_and_grad(_single, x, t, w, None, opts)[1][:, lo:hi])
        g = torch.Generator().manual_seed(601)
        h, W = torch.randn(N, H, generator=g).to(DEVICE), (torch.randn(V, H, generator=g) / 3).to(DEVICE)
        leaves = [h.clone().requires_grad_(True), W[lo:hi].clone().requires_grad_(True)]
        ops, _ = count_ops(
            lambda: triton_losses.linear_cross_entropy(*leaves, t, weight=w, **opts, process_group=pg).backward(),
            launchers, patch,
        )  # fmt: skip
        assert not HOST_SYNCS & set(ops), ops
        assert all(isinstance(b, torch.Tensor) and b.shape == (2,) for b in seen), "host bounds"
        assert [b.tolist() for b in seen] == [[lo, V], [lo, V]], seen
        if DEVICE.type == "cuda":  # there the failed assert would end the process's CUDA context
            return 1
        try:
            triton_losses.cross_entropy(xl, t, w[:-1], process_group=pg)
        except RuntimeError as e:
            assert "weight tensor should be defined" in str(e), e
        else:
            raise AssertionError("a weight of V - 1 classes was accepted")
    finally:
        patch.undo()
    return 1


def main() -> None:
    rank, world, init, suite = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    backend = "nccl" if suite.startswith("nccl:") else "gloo"
    if backend == "nccl":
        global DEVICE
        DEVICE = torch.device("cuda", rank)
        torch.cuda.set_device(DEVICE)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        suites = {"cases": run_cases, "comm": run_comm_debug, "dtensor": run_dtensor, "linear": run_linear,
                  "nosync": run_no_host_sync}  # fmt: skip
        done = [f"{name}:{suites[name](rank, world)}" for name in suite.removeprefix("nccl:").split(",")]
        dist.barrier()
    finally:
        dist.destroy_process_group()
    print("ok " + " ".join(done))


if __name__ == "__main__":
    main()
