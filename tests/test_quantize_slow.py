"""The whole qbert-quantize workflow on the real MiniLM-L6 and movie-review data, with a tiny step budget."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qbert_deploy.checkpoint import load_checkpoint
from qbert_deploy.data.movie_reviews import load_splits
from qbert_deploy.data.tsv import write_tsv
from qbert_deploy.models.build import build_model


@pytest.mark.slow
def test_mixed_precision_workflow_on_minilm(tmp_path: Path) -> None:
    splits = load_splits()
    write_tsv(tmp_path / "train.tsv", splits["train"][:256])
    write_tsv(tmp_path / "dev.tsv", splits["dev"][:128])
    out = tmp_path / "out"
    command = [sys.executable, "-m", "qbert_deploy.cli.quantize", "--train", str(tmp_path / "train.tsv"),
               "--dev", str(tmp_path / "dev.tsv"), "--labels", "negative,positive", "--preset", "mp24",
               "--finetune-steps", "4", "--qat-steps", "4", "--hessian-subsets", "2", "--hessian-batch", "4",
               "--hessian-iters", "3", "--calibration-batches", "2", "--batch-size", "16", "-o", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = load_checkpoint(out / "model.pt")
    bits = [checkpoint.recipe.for_module(f"bert.encoder.layer.{i}.output.dense").bits for i in range(6)]
    assert sorted(bits) == [2, 2, 2, 4, 4, 4], f"MP 2/4 at 3 average bits over 6 equal layers: {bits}"
    assert checkpoint.recipe.default.groups == 128 and checkpoint.recipe.activation_bits == 8
    assert len(checkpoint.activation_ranges) == 36, len(checkpoint.activation_ranges)
    for key in ("dev_accuracy_fp32", "dev_accuracy_quantized", "compression"):
        assert key in checkpoint.metrics, checkpoint.metrics
    assert checkpoint.metrics["compression"] > 4.0, checkpoint.metrics
    build_model(checkpoint)  # the file is a valid, buildable model.pt
    assert (out / "sensitivity.png").stat().st_size > 1000
