"""An embedding model.pt exported: last_hidden_state and sentence_embedding (pooled and normalised in the graph, as
sentence-transformers defines them), every lowering profile, and a sentence-transformers directory around it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from qbert_deploy.checkpoint import Checkpoint
from qbert_deploy.exporters.check import check_export
from qbert_deploy.models.build import build_model
from qbert_deploy.runtimes.export_dir import read_config
from qbert_deploy.runtimes.lowering import PROFILES
from qbert_deploy.tasks import FEATURE
from tests.tiny import text_batch


def _run(path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(None, {k: v for k, v in inputs.items() if k in wanted}), strict=True))


def test_graph_pools_and_normalises_as_sentence_transformers_does(embedding_export: Path,
                                                                  embedding_checkpoint: Checkpoint) -> None:
    from sentence_transformers.models import Normalize, Pooling

    inputs = text_batch()
    out = _run(embedding_export / "model.onnx", inputs)
    assert list(out) == ["last_hidden_state", "sentence_embedding"]
    tokens, mask = torch.from_numpy(out["last_hidden_state"]), torch.from_numpy(inputs["attention_mask"])
    features = Normalize()(Pooling(tokens.shape[-1], "mean")({"token_embeddings": tokens, "attention_mask": mask}))
    np.testing.assert_allclose(out["sentence_embedding"], features["sentence_embedding"].numpy(), atol=1e-5)
    model = build_model(embedding_checkpoint)  # PyTorch fake-quant: the same embeddings
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).sentence_embedding.numpy()
    np.testing.assert_allclose(out["sentence_embedding"], expected, atol=1e-4)


@pytest.mark.parametrize("profile", [p for p in PROFILES if not p.startswith(("cuda", "tensorrt"))])
def test_every_cpu_lowering_gives_the_same_embeddings(embedding_export: Path, profile: str) -> None:
    inputs = text_batch()
    canonical = _run(embedding_export / "model.onnx", inputs)["sentence_embedding"]
    lowered = _run(embedding_export / f"model.{profile}.onnx", inputs)["sentence_embedding"]
    cosine = (canonical * lowered).sum(-1)  # unit vectors
    assert cosine.min() > 0.99, cosine


def test_the_export_is_a_sentence_transformers_directory(embedding_export: Path) -> None:
    assert all(r.ok for r in check_export(embedding_export)), [r for r in check_export(embedding_export) if not r.ok]
    modules = json.loads((embedding_export / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    pooling = json.loads((embedding_export / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    config = json.loads((embedding_export / "config.json").read_text())
    assert config["architectures"] == ["BertModel"]
    assert read_config(embedding_export).task == FEATURE


def test_qbert_export_checks_parity_and_the_folder(embedding_checkpoint: Checkpoint, tmp_path: Path) -> None:
    """The command's three-way parity (PyTorch fake-quant, ORT, onnx.reference) on sentence_embedding, then --check."""
    import subprocess
    import sys

    from qbert_deploy.checkpoint import save_checkpoint

    save_checkpoint(embedding_checkpoint, tmp_path / "model.pt")
    export = [sys.executable, "-m", "qbert_deploy.cli.export"]
    done = subprocess.run([*export, str(tmp_path / "model.pt"), "-o", str(tmp_path / "exp"), "--lower",
                           "cpu-w8a8,weight-only"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("parity vs PyTorch fake-quant") == 2, done.stdout
    checked = subprocess.run([*export, "--check", str(tmp_path / "exp")], capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0 and "feature-extraction, 0 labels" in checked.stdout, checked.stdout


def test_parity_of_an_embedding_reports_cosine_not_argmax(embedding_checkpoint: Checkpoint,
                                                          embedding_export: Path) -> None:
    from qbert_deploy.validation.parity import parity_batch, parity_check

    results = parity_check(build_model(embedding_checkpoint), embedding_export / "model.onnx",
                           parity_batch(embedding_checkpoint))
    for result in results:
        assert result.ok and result.least_cosine is not None and result.least_cosine > 0.9999, result
        assert "least cosine" in result.line() and "argmax" not in result.line()
