"""Packaging and CI: one ruff pin, the licence, py.typed, compat failing, pytest's exit code 5, what import does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_one_ruff_version_everywhere():
    (dev,) = [r for r in _pyproject()["project"]["optional-dependencies"]["dev"] if r.startswith("ruff")]
    assert re.fullmatch(r"ruff==\d+\.\d+\.\d+", dev), dev
    pins = set(re.findall(r"ruff==[\d.]+\d", (ROOT / ".ci/run").read_text()))
    pins |= set(re.findall(r"ruff==[\d.]+\d", (ROOT / ".pre-commit-config.yaml").read_text()))
    assert pins == {dev}, pins


def test_licence_and_metadata():
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    assert "Version 2.0, January 2004" in (ROOT / "LICENSE").read_text()[:200]
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]  # PEP 639: the SPDX field only
    assert project["urls"]
    assert "Typing :: Typed" in project["classifiers"]


def test_py_typed_is_packaged():
    assert (ROOT / "triton_losses" / "py.typed").exists()
    assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["triton_losses"]


def _fake_python(tmp_path: Path, rc: int) -> dict:
    """An environment whose ``python`` exits with ``rc`` at once.

    ``CI_PYTHON`` is dropped: the CI helpers prefer it to ``python`` (.ci/compat sets it to its venv's
    interpreter), so inheriting it would run the real test suite inside the test, recursively.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text(f"#!/bin/sh\nexit {rc}\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CI_PYTHON"}
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", "TRITON_LOSSES_COMPAT_VENV": str(tmp_path / "v")}


@pytest.fixture
def outer_python(tmp_path, monkeypatch):
    """``CI_PYTHON`` in the environment, naming an interpreter the CI helpers under test must never run."""
    wrong = tmp_path / "outer-python"
    wrong.write_text("#!/bin/sh\necho 'the outer CI_PYTHON ran' >&2\nexit 3\n")
    wrong.chmod(0o755)
    monkeypatch.setenv("CI_PYTHON", str(wrong))


def test_compat_stage_fails_when_it_cannot_install(tmp_path, outer_python):
    proc = subprocess.run(
        ["bash", str(ROOT / ".ci/compat")], env=_fake_python(tmp_path, 1), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "could not install" in proc.stderr


@pytest.mark.parametrize(("pytest_rc", "expected"), [(0, 0), (5, 0), (1, 1), (2, 2)])
def test_ci_treats_pytest_exit_code_5_as_success(tmp_path, outer_python, pytest_rc, expected):
    script = f"set -euo pipefail; source {ROOT}/.ci/steps.sh; step 'pytest' run_pytest -q"
    env = _fake_python(tmp_path, pytest_rc)
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == expected, proc.stdout + proc.stderr


def test_import_queries_no_device_and_imports_the_kernels():
    """What the package docstring says importing does: triton and the kernels imported, CUDA untouched."""
    pytest.importorskip("triton")
    code = (
        "import sys, torch, triton_losses; "
        "assert not torch.cuda.is_initialized(); "
        "assert 'triton' in sys.modules and 'triton_losses.kernels.cross_entropy' in sys.modules; print('ok')"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_ci_limit_fails_a_hung_step():
    script = f"set -euo pipefail; source {ROOT}/.ci/steps.sh; step 'hang' ci_limit 1 sleep 30"
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 124, proc.stdout + proc.stderr
    assert "ran past its 1 s limit" in proc.stderr
