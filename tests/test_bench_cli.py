"""Fast tests of ``triton-losses bench`` / ``check`` (triton_losses/bench): outputs, reasons, registry."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import triton_losses
from triton_losses.bench import OPS, Case, Op, Size, get_ops, register
from triton_losses.bench.cli import main, parse_size
from triton_losses.bench.providers import NAMES
from triton_losses.bench.registry import MODES
from triton_losses.bench.timing import Stats

TINY = ["--sizes", "8x300", "4x1000", "--hidden", "16", "--copy-mib", "16", "--no-progress"]


def _bench(tmp_path, *extra: str) -> tuple[int, dict, str]:
    rc = main(["bench", "--quick", *TINY, "--out", str(tmp_path), *extra])
    doc = json.loads((tmp_path / "results.json").read_text())
    return rc, doc, (tmp_path / "results.md").read_text()


@pytest.fixture
def scratch_registry(monkeypatch):
    """Ops registered by a test disappear after it."""
    get_ops()  # the built-in ops first
    monkeypatch.setattr("triton_losses.bench.registry.OPS", dict(OPS))
    from triton_losses.bench import registry

    return registry.OPS


@pytest.mark.slow  # 6-15 s: the whole CLI on the interpreter
@pytest.mark.interpreter
def test_quick_bench_writes_json_and_markdown(tmp_path, capsys):
    rc, doc, md = _bench(tmp_path, "--ops", "cross_entropy", "softmax")
    out = capsys.readouterr().out
    assert rc == 0
    meta = doc["meta"]
    for key in ("device", "date", "datetime_utc", "git", "command", "versions"):
        assert meta[key], key
    assert meta["versions"]["torch"] == torch.__version__
    assert "triton" in meta["versions"]
    assert "triton-losses bench --quick" in meta["command"]
    assert doc["copy_bandwidth"]["gbps"] > 0
    assert set(doc["providers"]) == set(NAMES)
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    measured = {(r["op"], r["provider"]) for r in ok}
    assert {(o, p) for o in ("cross_entropy", "softmax") for p in ("torch", "ours")} <= measured
    if not torch.cuda.is_available():  # torch.compile is skipped by --quick, Liger-Kernel needs a GPU
        assert {p for _, p in measured} == {"torch", "ours"}
    for r in ok:
        assert set(r["time_ms"]) == set(MODES)
        assert all(r["time_ms"][m]["median"] > 0 and r["time_ms"][m]["n"] >= 3 for m in MODES)
        assert r["gbps"]["fwd+bwd"] == pytest.approx(r["bytes"]["fwd+bwd"] / r["time_ms"]["fwd+bwd"]["median"] / 1e6)
        assert r["copy_fraction"]["fwd+bwd"] == pytest.approx(r["gbps"]["fwd+bwd"] / doc["copy_bandwidth"]["gbps"])
        assert r["memory"]["peak_bytes"] >= r["memory"]["inputs_bytes"] > 0
        assert r["memory"]["extra_bytes"] > 0  # at least the gradient
        assert r["memory"]["grads_bytes"] > 0
        assert r["memory"]["extra_bytes"] >= r["memory"]["grads_bytes"]  # the step allocates its gradients
    # the markdown: the reproducing command at the top, one table per op, every measured row
    head = md.splitlines()[:8]
    assert any(line == meta["command"] for line in head)
    assert "## cross_entropy" in md and "## softmax" in md
    assert "| work MiB |" in md and "work MiB: " in md
    shown = [r for r in doc["results"] if r["status"] in ("ok", "error")]
    assert md.count("| 8 | 300 |") == sum(r["N"] == 8 for r in shown) >= 4
    assert md.count("| 4 | 1000 |") == sum(r["N"] == 4 for r in shown) >= 4
    assert "cross_entropy" in out and "copy bandwidth" in out


@pytest.mark.slow  # 6-15 s: the whole CLI on the interpreter
@pytest.mark.interpreter
def test_missing_and_skipped_providers_are_reported(tmp_path, capsys):
    rc, doc, md = _bench(tmp_path, "--ops", "nll_loss")
    out = capsys.readouterr().out
    assert rc == 0
    providers = doc["providers"]
    if not torch.cuda.is_available():
        assert providers["liger"]["status"] == "missing" and "CUDA" in providers["liger"]["reason"]
        assert providers["torch.compile"]["status"] == "skipped" and "--quick" in providers["torch.compile"]["reason"]
    for name, p in providers.items():
        if p["status"] != "ok":
            assert p["reason"] and p["reason"] in md and p["reason"] in out, name
        rows = [r for r in doc["results"] if r["provider"] == name]
        assert len(rows) == 2, name  # one per size, whatever its status
    # an op-specific absence (Liger-Kernel has no nll_loss) is listed under the op when liger is there
    if providers["liger"]["status"] == "ok":
        assert "Liger-Kernel has no nll_loss" in md


def test_providers_option_skips_the_others_with_a_reason(tmp_path):
    rc, doc, _ = _bench(tmp_path, "--ops", "log_softmax", "--providers", "torch")
    assert rc == 0
    assert doc["providers"]["ours"] == {**doc["providers"]["ours"], "status": "skipped", "reason": "not in --providers"}
    assert {r["provider"] for r in doc["results"] if r["status"] == "ok"} == {"torch"}


def test_plots_are_skipped_with_a_reason_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("triton_losses.bench.plots.matplotlib_missing", lambda: "matplotlib is not installed (test)")
    rc, _, md = _bench(tmp_path, "--ops", "softmax", "--providers", "torch")
    assert rc == 0
    assert "plots: skipped: matplotlib is not installed (test)" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.png")) and "![" not in md


def test_plot_and_prefix(tmp_path):
    pytest.importorskip("matplotlib")
    main(
        ["bench", "--quick", *TINY, "--ops", "softmax", "--providers", "torch", "--out", str(tmp_path), "--prefix", "x"]
    )
    assert (tmp_path / "x.png").stat().st_size > 1000
    assert "![time and memory against vocabulary size](x.png)" in (tmp_path / "x.md").read_text()


@pytest.mark.slow  # 7 s
def test_new_op_is_a_few_lines(tmp_path, scratch_registry):
    register(
        Op(
            name="double_sum",
            inputs=lambda s, dtype, device: Case((torch.randn(s.N, s.V, dtype=dtype, device=device).requires_grad_(),)),
            ours=lambda x: (2 * x).sum(),
            torch=lambda x: (x + x).sum(),
            bytes_moved=lambda s, b: {"fwd": s.N * s.V * b, "bwd": s.N * s.V * b, "fwd+bwd": 2 * s.N * s.V * b},
            bytes_note="N·V·b each way",
        )
    )
    assert "double_sum" in [op.name for op in get_ops()]
    rc, _, md = _bench(tmp_path, "--ops", "double_sum")
    assert rc == 0 and "## double_sum" in md
    assert main(["check", "--ops", "double_sum"]) == 0


@pytest.mark.slow  # 6-15 s: the whole CLI on the interpreter
@pytest.mark.interpreter
def test_check_passes(capsys):
    assert main(["check", "--ops", "cross_entropy", "softmax", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[-1] for line in out.splitlines() if line.startswith(("cross_entropy ", "softmax "))] == [
        "pass"
    ] * 4
    assert "all passed" in out


def test_check_fails_with_exit_1_on_a_wrong_op(capsys, scratch_registry):
    good = OPS["softmax"]
    register(replace(good, name="bad_softmax", ours=lambda x: torch.softmax(x, -1) * 1.01))
    assert main(["check", "--ops", "bad_softmax"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "failed" in out


def test_errors_are_reported_not_dropped(tmp_path, scratch_registry):
    def broken(x):
        raise RuntimeError("kernel exploded")

    register(replace(OPS["softmax"], name="broken", ours=broken))
    rc, doc, md = _bench(tmp_path, "--ops", "broken")
    assert rc == 1  # an error in ours fails the run
    rows = [r for r in doc["results"] if r["provider"] == "ours"]
    assert all(r["status"] == "error" and "kernel exploded" in r["reason"] for r in rows)
    assert "error: RuntimeError: kernel exploded" in md


def test_registered_ops_cover_the_public_api():
    names = {op.name for op in get_ops()}
    functions = {n for n in triton_losses.__all__ if callable(getattr(triton_losses, n))}
    assert functions <= names, f"register {functions - names} in triton_losses/bench/ops.py"
    for op in get_ops():
        size = Size(8, 100, 16)
        moved = op.bytes_moved(size, 2)
        assert set(moved) == set(MODES) and all(v > 0 for v in moved.values()), op.name
        assert moved["fwd+bwd"] <= moved["fwd"] + moved["bwd"], op.name


def test_bad_arguments():
    assert parse_size("4096x128256") == Size(4096, 128256)
    assert parse_size("8x32000x2048") == Size(8, 32000, 2048)
    with pytest.raises(SystemExit):
        main(["bench", "--sizes", "4096"])
    with pytest.raises(SystemExit, match="unknown op"):
        main(["bench", "--ops", "no_such_op"])
    with pytest.raises(SystemExit, match="unknown provider"):
        main(["bench", "--providers", "no_such_provider"])


def test_stats():
    s = Stats.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.min, s.max, s.n) == (3.0, 1.0, 5.0, 5)
    assert s.p20 < s.median < s.p80


def test_python_dash_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "triton_losses", "bench", "--list"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "cross_entropy" in proc.stdout and "bytes:" in proc.stdout


@pytest.mark.slow
def test_gpu_session_dry_run(tmp_path):
    """``bash bench/gpu_session.sh --dry-run``: every step of the GPU session at toy sizes on the CPU."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "--dry-run"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = {p.name for p in tmp_path.iterdir()}
    assert len(files) <= 8, files
    assert {"session.log", "gpu-tests.log", "ce-sweep.jsonl", "bench.json", "bench.md", "check.log"} <= files
    log = (tmp_path / "session.log").read_text()
    steps = ("device facts", "gpu test tier", "CE sweep", "CE / linear CE vs torch eager, Liger", "vs torch.compile",
             "triton-losses check")  # fmt: skip
    for step in steps:
        assert f"== {step}: exit 0" in log, log[-3000:]
    records = [json.loads(line) for line in (tmp_path / "ce-sweep.jsonl").read_text().splitlines()]
    sweep = [r for r in records if r["kind"] == "sweep"]
    assert sweep and not [r for r in sweep if "error" in r], sweep
    assert {r["config"] == "default" for r in sweep} == {True, False}  # forced configurations were measured
    assert sweep[0]["grad"] and {r["grad"] for r in sweep} == {True, False}  # the gradient-writing forward first
    assert "| 200 | fwd+grad write |" in log.split("launch configurations the sweep implies")[-1]
    facts = json.loads(next(line for line in log.splitlines() if line.startswith('{"device"')))
    assert facts["copy_gbps"] > 0 and facts["gemms"]["ms"]["all3"] > 0
    assert [r for r in records if r["kind"] == "facts"] == [{"kind": "facts", **facts}]
    goals = log.split("== goals")[-1]
    for goal in ("share of the copy bandwidth", "speedup over liger", "speedup over torch.compile", "three GEMMs"):
        assert goal in goals, goals
    # measured at the dry run's sizes: CE and linear CE (Liger runs on CUDA only; torch.compile not in the dry run)
    assert goals.count("| PASS |") + goals.count("| FAIL |") == 2, goals
    bench = json.loads((tmp_path / "bench-extra.json").read_text())
    ours = [r for r in bench["results"] if r["provider"] == "ours" and r["status"] == "ok"]
    assert ours and all("torch" in r["speedup_vs"] for r in ours)


@pytest.mark.slow  # ~10 s: a pytest run of its own
def test_cpu_regression_suite_command_runs():
    """README's regression-suite command (``pytest bench/test_bench_cpu.py --benchmark-only -n 0``) times
    its cases (pytest-benchmark refuses ``--benchmark-only`` under the xdist the test settings turn on)."""
    root = Path(__file__).resolve().parents[1]
    cases = [f"bench/test_bench_cpu.py::test_cpu[cross_entropy-{p}-fwd]" for p in ("ours", "torch")]
    cmd = [sys.executable, "-m", "pytest", *cases, "--benchmark-only", "-n", "0", "-q", "-p", "no:cacheprovider",
           "--benchmark-columns", "median"]  # fmt: skip
    # as from a shell: not under this run's interpreter setting or its xdist worker variables (pytest-benchmark
    # reads PYTEST_XDIST_WORKER as "under xdist" and refuses --benchmark-only)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("PYTEST_XDIST")}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"(?<!\d)2 passed", proc.stdout) and "Median" in proc.stdout, proc.stdout[-3000:]
