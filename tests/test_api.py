"""The Python API: what help() shows, the README's example run as written, calibrate, and quantize's option checks."""

from __future__ import annotations

import os
import pydoc
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qbert_deploy
from qbert_deploy.checkpoint import load_checkpoint
from qbert_deploy.models.build import build_model
from qbert_deploy.validation.parity import torch_logits
from tests.tiny import SENTENCES, text_batch, write_tiny_task

README = Path(__file__).resolve().parents[1] / "README.md"
PIPELINE = ("quantize", "calibrate", "export", "validate", "load_session")


def readme_python_example() -> str:
    """The ```python block of the README's "Python API" section."""
    section = README.read_text(encoding="utf-8").split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section has one example"
    return blocks[0]


def test_help_documents_the_pipeline_functions() -> None:
    text = pydoc.render_doc(qbert_deploy, renderer=pydoc.plaintext)
    for name in PIPELINE:
        function = getattr(qbert_deploy, name)
        assert function.__module__ == "qbert_deploy" and name in qbert_deploy.__all__
        assert re.search(rf"^\s+{name}\(", text, flags=re.M), f"help(qbert_deploy) does not list {name}()"
        first_line = (function.__doc__ or "").strip().splitlines()[0]
        assert first_line and first_line in text, f"{name}() has no docstring help() shows"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's folder: my-bert/ (a tiny random BERT; 128 and 256 rows, so the default 128 groups fit),
    train.tsv and dev.tsv."""
    root = write_tiny_task(tmp_path_factory.mktemp("api"), hidden=128, intermediate=256)
    (root / "model").rename(root / "my-bert")
    return root


def test_the_readme_python_example_runs_as_written(task_dir: Path) -> None:
    done = subprocess.run([sys.executable, "-c", readme_python_example()], cwd=task_dir, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-2].startswith(("gate passed", "gate failed")), done.stdout[-2000:]
    # 0/1 labels in SST-2's sentence/label layout, no --labels: GLUE's names for SST-2
    assert lines[-1] in ("negative", "positive"), done.stdout[-2000:]
    assert {p.name for p in (task_dir / "out" / "export").glob("model*.onnx")} == {"model.onnx",
                                                                                   "model.cpu-w8a8.onnx"}
    assert (task_dir / "out" / "validation" / "report.json").is_file()
    assert load_checkpoint(task_dir / "ptq" / "model.pt").recipe.default.bits == 8


def test_calibrate_observes_ranges_on_the_texts_and_exports(task_dir: Path, tmp_path: Path) -> None:
    short = qbert_deploy.calibrate(task_dir / "my-bert", SENTENCES[:2], tmp_path / "a.pt", bits=4, groups=4)
    full = qbert_deploy.calibrate(task_dir / "my-bert", SENTENCES, tmp_path / "b.pt", bits=4, groups=4)
    assert short.activation_ranges and short.activation_ranges.keys() == full.activation_ranges.keys()
    assert short.activation_ranges != full.activation_ranges, "the ranges must come from the texts"
    assert short.recipe.default.bits == 4 and short.labels == ["LABEL_0", "LABEL_1"]
    result = qbert_deploy.export(tmp_path / "b.pt", tmp_path / "export")  # parity with PyTorch is checked
    session = qbert_deploy.load_session(result.out_dir, profile="canonical")
    batch = text_batch()
    onnx_logits = session.run(["logits"], batch)[0]
    reference = torch_logits(build_model(load_checkpoint(tmp_path / "b.pt")), batch)
    assert np.allclose(onnx_logits, reference, atol=1e-4)
    with pytest.raises(ValueError, match="at least one text"):
        qbert_deploy.calibrate(task_dir / "my-bert", [], tmp_path / "c.pt")


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"bits": 9}, ValueError, r"bits=9: choose from 2, 3"),
    ({"bits": 4, "avg_bits": 3}, ValueError, "give one of bits, avg_bits, not several"),
    ({"bits": 4, "finetune_steps": -1}, ValueError, "finetune_steps=-1: must be at least 0"),
    ({"bits": 4, "bit_choices": (2, 9)}, ValueError, "bit widths must be in 2..8"),
    ({"bits": 4, "finetune_step": 2}, TypeError, "unknown option 'finetune_step'"),
])
def test_quantize_checks_options_as_the_command_does(task_dir: Path, tmp_path: Path, options: dict[str, object],
                                                     error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        qbert_deploy.quantize(tmp_path / "out", model=task_dir / "my-bert", train=task_dir / "train.tsv",
                              dev=task_dir / "dev.tsv", **options)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()
