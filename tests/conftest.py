"""Shared fixtures: one tiny checkpoint and its export per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from qbert_deploy.checkpoint import Checkpoint, save_checkpoint
from qbert_deploy.exporters.onnx_export import export_checkpoint
from tests.tiny import tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt() -> Checkpoint:
    return tiny_checkpoint()


@pytest.fixture(scope="session")
def tiny_model_pt(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Checkpoint) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(tiny_ckpt, path)
    return path


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Checkpoint) -> Path:
    """An export directory of the tiny checkpoint (opset 21)."""
    out = tmp_path_factory.mktemp("export") / "export"
    export_checkpoint(tiny_ckpt, out, opset=21)
    return out


@pytest.fixture(scope="session")
def embedding_model_pt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A label-free 4-bit model.pt of a tiny sentence-transformers directory (mean pooling, Normalize), written by
    qbert-quantize beside its fp32 folder and the texts it read (texts.txt)."""
    from qbert_deploy.cli.quantize import main as quantize_main
    from tests.test_embeddings import write_st_dir
    from tests.tiny import SENTENCES

    root = tmp_path_factory.mktemp("emb")
    model = write_st_dir(root / "model", "mean", True)
    (root / "texts.txt").write_text("\n".join(SENTENCES) + "\n")
    out = root / "out"
    assert quantize_main(["--model", str(model), "--train", str(root / "texts.txt"), "--dev",
                          str(root / "texts.txt"), "--bits", "4", "--groups", "8", "--qat-steps", "0",
                          "--calibration-batches", "1", "--batch-size", "8", "-o", str(out)]) == 0
    return out / "model.pt"


@pytest.fixture(scope="session")
def embedding_checkpoint(embedding_model_pt: Path) -> Checkpoint:
    from qbert_deploy.checkpoint import load_checkpoint

    return load_checkpoint(embedding_model_pt)


@pytest.fixture(scope="session")
def embedding_export(embedding_checkpoint: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """qbert-export of the embedding model.pt with every lowering profile: what qbert-serve meets."""
    from qbert_deploy.runtimes.lowering import PROFILES

    out = tmp_path_factory.mktemp("emb-export") / "export"
    export_checkpoint(embedding_checkpoint, out, lower=list(PROFILES))
    return out
