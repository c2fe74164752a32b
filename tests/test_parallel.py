"""Vocabulary-parallel cross-entropy over torch.distributed: gloo on the CPU, one process per rank.

Each test starts ``world`` subprocesses running ``tests/parallel_worker.py`` (a FileStore rendezvous
in a temporary directory, 60 s collective timeouts, and a wall-clock limit on every process, so a
hang fails instead of blocking). Each rank checks values, gradients and collective counts itself
(see the worker); here every rank must exit 0 and report its cases.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from triton_losses._dispatch import triton_available

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _launch(world: int, suite: str, backend: str, tmp_path: Path, timeout: float = 120.0) -> list[str]:
    """Run ``suite`` on ``world`` ranks; returns each rank's stdout (asserts every rank exited 0)."""
    init = f"file://{tmp_path / 'rendezvous'}"
    env = {**os.environ, "TRITON_LOSSES_BACKEND": backend, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if backend == "triton" and not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"  # before the child imports triton_losses
    procs = [
        subprocess.Popen([sys.executable, "-m", "tests.parallel_worker", str(r), str(world), init, suite],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(world)
    ]  # fmt: skip
    results = []
    try:
        for p in procs:
            results.append((p.communicate(timeout=timeout), p.returncode))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    failed = [f"rank {r} exited {code}:\n{err[-2500:]}" for r, ((_, err), code) in enumerate(results) if code != 0]
    assert not failed, "\n".join(failed)
    return [out for (out, _), _ in results]


def _backends():
    return ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


def _needs(backend: str) -> None:
    if backend == "triton" and not triton_available():
        pytest.skip("triton is not installed")


# suite -> cases each rank must report (tests/parallel_worker.py).
EXPECTED = {"cases": 12, "comm": 1, "dtensor": 8, "linear": 5, "nosync": 1}


def _assert_done(outs: list[str], suites: str) -> None:
    want = "ok " + " ".join(f"{name}:{EXPECTED[name]}" for name in suites.removeprefix("nccl:").split(","))
    assert all(o.strip().splitlines()[-1] == want for o in outs), (want, outs)


@pytest.mark.parametrize("backend", _backends())
def test_two_ranks(backend, tmp_path):
    """Two ranks, uneven split, one spawn: every option of ``cross_entropy`` (fp32 / bf16 / fp64, values and
    gradients against one process, collectives counted), DTensor inputs against ``loss_parallel()`` and a
    ``ColwiseParallel`` lm_head, and ``linear_cross_entropy``."""
    _needs(backend)
    suites = "cases,comm,dtensor,linear" + (",nosync" if backend == "triton" else "")
    _assert_done(_launch(2, suites, backend, tmp_path, timeout=240.0), suites)


@pytest.mark.slow
@pytest.mark.parametrize("backend", _backends())
def test_four_ranks_with_an_empty_slice(backend, tmp_path):
    """Four ranks, one of them holding no class at all (DTensor: torch.chunk's split of 13 classes)."""
    _needs(backend)
    suites = "cases,dtensor,linear"
    _assert_done(_launch(4, suites, backend, tmp_path, timeout=400.0), suites)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_nccl_two_gpus(tmp_path):
    """The index / probability cases and ``linear_cross_entropy`` with NCCL on two GPUs (kernels compiled)."""
    suites = "nccl:cases,linear,nosync"
    _assert_done(_launch(2, suites, "triton", tmp_path, timeout=300.0), suites)


@pytest.mark.interpreter
def test_opcheck_parallel_custom_ops():
    """``triton_losses::ce_partial`` and the slice-aware ``triton_losses::ce_bwd`` pass ``torch.library.opcheck``."""
    _needs("triton")
    from triton_losses.kernels import cross_entropy as k

    x = torch.randn(3, 5, 1)
    t = torch.tensor([[1], [7], [-100]])
    w = torch.rand(9) + 0.5
    torch.library.opcheck(k.ce_partial_op, (x, t, w, 0.1, 3.0, False, 4))
    p = torch.softmax(torch.randn(3, 5, 1), 1)
    torch.library.opcheck(k.ce_partial_op, (p.log(), p, None, 0.0, 0.0, True, 2))
    stats = torch.stack([x.amax((1, 2)) + 1.0, torch.full((3,), 4.0), torch.ones(3)], 1)
    gout = torch.randn(3)
    wsum = w.sum().reshape(1)
    args = (x, t, w, wsum, stats, gout, None, -100, 0.1, 1e-3, 3.0, False, False, False, 4, 9)
    torch.library.opcheck(k.ce_bwd_op, args)
    torch.library.opcheck(k.ce_bwd_op, (*args[:-2], 0, 0, torch.tensor([4, 9])))
    torch.library.opcheck(k.ce_partial_op, (x, t, w, 0.1, 3.0, False, 0, torch.tensor([4, 9])))


@pytest.mark.parametrize("backend", _backends())
def test_partial_sums_of_a_slice(backend):
    """``ce_partial``'s columns on a slice, against plain torch on the same slice (both engines)."""
    _needs(backend)
    from triton_losses import _dispatch
    from triton_losses.options import CESpec

    eng = _dispatch._KERNELS["cross_entropy"] if backend == "triton" else _dispatch._REFERENCE["cross_entropy"]
    g = torch.Generator().manual_seed(3)
    full = torch.randn(6, 11, generator=g) * 3
    w = torch.rand(11, generator=g) + 0.5
    t = torch.tensor([0, 4, 5, 8, -100, 10])
    lo, hi = 4, 9
    x = full[:, lo:hi]
    spec = CESpec(w, None, smoothing=0.1, softcap=5.0, class_offset=lo, num_classes=11)
    part = eng.ce_partial(x.unsqueeze(-1), t.view(6, 1), spec)
    xs = 5.0 * torch.tanh(x.double() / 5.0)
    m = xs.amax(1)
    hit = (t >= lo) & (t < hi)
    x_t = torch.where(hit, xs.gather(1, (t - lo).clamp(0, hi - lo - 1)[:, None])[:, 0], 0.0)
    r = m  # the weighted sums are taken from the slice's max
    wl = w[lo:hi].double()
    want = torch.stack([m, (xs - m[:, None]).exp().sum(1), x_t, (xs - r[:, None]) @ wl], 1)
    torch.testing.assert_close(part[:, :4].double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(part[:, 4:6], torch.zeros(6, 2))
    torch.testing.assert_close(part[:, 6:].double(), torch.stack([r, wl.sum().expand(6)], 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("prob", [False, True])
def test_device_bounds_match_integer_bounds(backend, prob):
    """A slice given as a ``(2,)`` device tensor (``CESpec.bounds``: a plain process group on the kernels)
    gives exactly what the same slice given as integers gives, forward partial sums and backward."""
    _needs(backend)
    from triton_losses import _dispatch
    from triton_losses.options import CESpec

    eng = _dispatch._KERNELS["cross_entropy"] if backend == "triton" else _dispatch._REFERENCE["cross_entropy"]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 5, 1, generator=g) * 3
    w = torch.rand(11, generator=g) + 0.5
    t = torch.softmax(torch.randn(6, 5, 1, generator=g), 1) if prob else torch.tensor([0, 4, 5, 8, -100, 10])[:, None]
    opts = dict(smoothing=0.1, z_loss=1e-3, softcap=5.0, prob_target=prob)
    ints = CESpec(w, w.sum().reshape(1), **opts, class_offset=4, num_classes=11)
    dev = CESpec(w, w.sum().reshape(1), **opts, bounds=torch.tensor([4, 11]))
    assert torch.equal(eng.ce_partial(x, t, ints), eng.ce_partial(x, t, dev))
    stats = torch.stack([x.amax((1, 2)) + 0.5, torch.full((6,), 30.0), torch.full((6,), 0.7)], 1)
    gout = torch.randn(6, generator=g)
    want = eng.ce_bwd(x, t, ints, stats, gout, None, None, torch.empty_like(x) if prob else None)
    got = eng.ce_bwd(x, t, dev, stats, gout, None, None, torch.empty_like(x) if prob else None)
    for a, b in zip(want, got, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_input_grad_all_reduce_starts_piece_by_piece(monkeypatch):
    """The backward's input-gradient all-reduce: row pieces fixed by N, each started when its rows are done."""
    from triton_losses import parallel

    started = []
    monkeypatch.setattr(parallel.dist, "all_reduce", lambda t, **kw: started.append((t.data_ptr(), t.shape[0], kw)))
    gi = torch.zeros(10, 3)
    r = parallel._RowsAllReduce(10, group="g")
    assert r.bounds == [(0, 2), (2, 5), (5, 7), (7, 10)]
    r.ready(1, gi)
    assert started == []
    r.ready(6, gi)
    assert [n for _, n, _ in started] == [2, 3]
    assert started[1][0] == gi[2:].data_ptr() and started[1][2]["async_op"] and started[1][2]["group"] == "g"
    r.ready(10, gi)
    r.ready(10, gi)  # idempotent
    assert [n for _, n, _ in started] == [2, 3, 2, 3]
    assert parallel._RowsAllReduce(2, None).bounds == [(0, 1), (1, 2)]
    assert parallel._RowsAllReduce(0, None).bounds == []


def test_chunk_loop_reports_finished_input_grad_rows():
    """``_linear_ce_chunks.run`` calls ``on_rows`` after every chunk with the rows finished so far."""
    from triton_losses import _dispatch
    from triton_losses import _linear_ce_chunks as chunks
    from triton_losses.options import CESpec

    eng = _dispatch._REFERENCE["cross_entropy"]
    x, w, t = torch.randn(10, 4), torch.randn(7, 4), torch.randint(0, 7, (10, 1))
    p = chunks.Problem(x, w, None, t, CESpec(), 7, None, 10, 4, torch.float32)
    stats = chunks.run(eng, p, torch.ones(1), (False, False, False)).stats
    seen = []
    res = chunks.run(eng, p, torch.full((1,), 0.1), (True, False, False), stats=stats, gout=torch.ones(1),
                     on_rows=lambda done, gi: seen.append((done, gi.shape)))  # fmt: skip
    assert seen == [(4, (10, 4)), (8, (10, 4)), (10, (10, 4))]
    assert res.grads[0].shape == (10, 4)


def test_nn_modules_take_a_process_group(tmp_path):
    """``nn.CrossEntropyLoss(process_group=...)`` / ``nn.LinearCrossEntropyLoss(process_group=...)`` (options
    form) run the vocabulary-parallel path: on a one-rank gloo group it is the whole vocabulary."""
    from tests.helpers import run_isolated

    code = f"""
import torch, torch.distributed as dist, torch.nn.functional as F, triton_losses
from triton_losses import parallel
dist.init_process_group("gloo", init_method="file://{tmp_path / "rdv"}", rank=0, world_size=1)
pg = dist.group.WORLD
calls = []
real = parallel.slice_bounds
parallel.slice_bounds = lambda *a, **k: calls.append(a) or real(*a, **k)
x = torch.randn(6, 11, requires_grad=True); t = torch.randint(0, 11, (6,))
m = triton_losses.nn.CrossEntropyLoss(label_smoothing=0.1, process_group=pg)
assert m.process_group is pg and "process_group" not in m.state_dict()
loss = m(x, t); loss.backward()
torch.testing.assert_close(loss, F.cross_entropy(x, t, label_smoothing=0.1))
h, W = torch.randn(6, 4), torch.randn(11, 4, requires_grad=True)
lm = triton_losses.nn.LinearCrossEntropyLoss(process_group=pg)
torch.testing.assert_close(lm(h, W, t), F.cross_entropy(h @ W.t(), t))
assert len(calls) == 2, calls
with torch.autocast("cpu", dtype=torch.bfloat16):  # the composite's policy: bf16 logits, an fp32 loss
    ours = triton_losses.linear_cross_entropy(h, W, t, process_group=pg)
    ref = F.cross_entropy(F.linear(h, W), t)
assert ours.dtype == ref.dtype == torch.float32, (ours.dtype, ref.dtype)
torch.testing.assert_close(ours, ref)
try:
    triton_losses.nn.LinearCrossEntropyLoss(4, 11, process_group=pg)
except TypeError as e:
    assert "options-only form" in str(e)
else:
    raise AssertionError("no TypeError")
dist.destroy_process_group()
print("ok")
"""
    proc = run_isolated(code, timeout=120, env={"TRITON_LOSSES_BACKEND": "torch"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
