"""The GPU session's measurement logic, on the CPU: rows kept as they come, ratios between providers,
in-place gradients in the memory count, enough timed runs per measurement, and the goals' verdicts."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from triton_losses.bench import Case, cli, report, runner, timing
from triton_losses.bench.memory import _grad_bytes

ROOT = Path(__file__).resolve().parents[1]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(provider: str, ms: float, op: str = "cross_entropy", N=8, V=300, H=None, **extra) -> dict:
    return dict(op=op, provider=provider, N=N, V=V, H=H, status="ok", time_ms={"fwd+bwd": {"median": ms}}, **extra)


def test_every_provider_is_compared_with_every_other():
    failed = {**_row("torch.compile", 1.0), "status": "error"}
    rows = [_row("torch", 6.0), _row("ours", 2.0), _row("liger", 3.0), failed]
    runner._compare_all(rows)
    assert rows[1]["speedup_vs"] == {"torch": 3.0, "liger": 1.5}
    assert rows[2]["speedup_vs"] == {"torch": 2.0, "ours": 2.0 / 3.0}
    assert "speedup_vs" not in rows[3]
    line = report.ours_against(rows)
    assert "3.00x torch" in line and "1.50x liger" in line and "8x300" in line
    table = report._ours_table(rows)
    assert "| 8x300 | 3.00 | 1.50 |" in table and "| size | torch | liger |" in table


def test_a_gradient_written_into_an_input_allocates_nothing():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    x.grad = x.detach()  # as Liger-Kernel's cross-entropy does: the logits' storage holds their gradient
    w.grad = torch.zeros(8)
    fresh, aliased = _grad_bytes(Case((x, w)))
    assert (fresh, aliased) == (8 * 4, 4 * 8 * 4)


def test_a_run_cut_short_keeps_the_rows_measured(tmp_path, monkeypatch):
    """A timeout ends the process mid-run: the tables on disk hold every row measured before it."""
    measure = runner.measure
    calls = []

    def dies_on_the_third(op, size, provider, *rest):
        calls.append(provider.status == "ok")
        if sum(calls) == 3:  # the third measurement (skipped providers are rows too, measuring nothing)
            raise KeyboardInterrupt  # stands in for the session's timeout
        return measure(op, size, provider, *rest)

    monkeypatch.setattr(runner, "measure", dies_on_the_third)
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "torch")
    argv = ["bench", "--quick", "--ops", "cross_entropy", "--sizes", "8x300", "4x200", "--providers", "torch", "ours",
            "--copy-mib", "1", "--no-progress", "--no-plots", "--rep-ms", "0", "--min-reps", "1",
            "--out", str(tmp_path)]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [(r["provider"], r["V"]) for r in doc["results"] if r["status"] == "ok"] == [("torch", 300), ("ours", 300)]
    assert doc["results"][1]["speedup_vs"]["torch"] > 0
    assert "ours' fwd+bwd speedup" in (tmp_path / "results.md").read_text()


def test_long_calls_get_enough_timed_runs(monkeypatch):
    """do_bench times ``rep / estimate`` runs: ``rep`` grows so a 20 ms call still gets ``min_reps`` of them."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    rep = timing._rep_for(lambda: time.sleep(0.02), rep_ms=100.0, min_reps=10)
    assert rep >= 10 * 20
    assert timing._rep_for(lambda: None, rep_ms=100.0, min_reps=10) == 100.0  # short calls: rep as asked


def _bench_doc(rows: list[dict]) -> dict:
    return {"results": rows}


def _ce(provider, copy_fraction=None, **extra):
    r = _row(provider, 1.0, N=8192, V=128256, **extra)
    if copy_fraction is not None:
        r["copy_fraction"] = {"fwd+bwd": copy_fraction}
    return r


def test_goals_are_judged_from_the_session_files(tmp_path):
    goals = _module("gpu_goals")
    facts = {"kind": "facts", "gemms": {"N": 8192, "H": 4096, "V": 128256, "ms": {"all3": 40.0}}}
    (tmp_path / "ce-sweep.jsonl").write_text(json.dumps(facts) + "\n" + '{"kind": "sweep", "V": 1')  # a cut line
    bench = [_ce("ours", 0.9, speedup_vs={"torch": 3.0, "liger": 1.2}), _ce("torch", 0.3),
             _row("ours", 44.0, op="linear_cross_entropy", N=8192, V=128256, H=4096)]  # fmt: skip
    extra = [_ce("ours", 0.8, speedup_vs={"torch": 2.9}), {**_ce("torch.compile"), "status": "error", "reason": "boom"}]
    (tmp_path / "bench.json").write_text(json.dumps(_bench_doc(bench)))
    (tmp_path / "bench-extra.json").write_text(json.dumps(_bench_doc(extra)))
    found = {d["goal"].split(": ")[-1]: d for d in goals.goals(tmp_path, (8192, 128256), (8192, 128256, 4096))}
    share, liger = found["share of the copy bandwidth"], found["speedup over liger"]
    assert (share["value"], share["verdict"], share["source"]) == (0.9, "PASS", "bench.json")  # the first file's row
    assert (liger["value"], liger["verdict"]) == (1.2, "FAIL")
    compiled = found["speedup over torch.compile"]
    assert (compiled["verdict"], compiled["why"]) == ("not measured", "error: boom")
    linear = found["time over its three GEMMs"]
    assert (linear["value"], linear["verdict"]) == (1.1, "PASS")
    text = goals.table(list(found.values()))
    assert "| ≤ 1.15 | PASS |" in text and "| ≥ 1.3 | FAIL |" in text


def test_goals_without_files_are_not_measured(tmp_path):
    goals = _module("gpu_goals")
    found = goals.goals(tmp_path, (8192, 128256), (8192, 128256, 4096))
    assert [d["verdict"] for d in found] == ["not measured"] * 4
    assert all(d["why"] for d in found)
