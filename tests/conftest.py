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
def embedding_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny sentence-embedding export folder (mean pooling and L2 normalisation in the graph)."""
    from tests.embedding_export import write_embedding_export

    return write_embedding_export(tmp_path_factory.mktemp("embedding") / "export")
