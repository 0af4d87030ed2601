"""The server runs where only onnxruntime, tokenizers and the [serve] extra are installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROBE = """
import sys
for blocked in ("torch", "transformers", "optimum"):
    sys.modules[blocked] = None  # importing them now raises ImportError
from qbert_deploy.cli.serve import build_parser
from qbert_deploy.runtimes.serving import ServedModel, create_app
from qbert_deploy.runtimes.triton_repo import write_triton_repo
app = create_app(ServedModel(sys.argv[1]))
print("ok", type(app).__name__)
"""


def test_serving_imports_without_torch_or_transformers(tiny_export: Path) -> None:
    done = subprocess.run([sys.executable, "-c", PROBE, str(tiny_export)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok FastAPI" in done.stdout, done.stderr[-2000:]
