"""The ORT int8 anchor the demo prints: a plain fp32 export, quantize_dynamic, scored with a real ORT session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from transformers import BertForSequenceClassification

from qbert_deploy.models.train import train
from qbert_deploy.runtimes.session import open_session
from qbert_deploy.validation.ort_int8 import ort_int8_accuracy
from tests.tiny import SENTENCES, text_batch, tiny_config


def test_int8_anchor_is_quantized_faithful_and_scored(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config())
    model.config._attn_implementation = "eager"
    batch = text_batch()
    labels = np.array([1 - i % 2 for i in range(len(SENTENCES))])
    train(model, lambda _epoch: [(batch, labels)], steps=30, lr=1e-3, desc="fit tiny")
    anchor = ort_int8_accuracy(model.eval(), [(batch, labels)], tmp_path / "ort-int8")
    flipped = ort_int8_accuracy(model, [(batch, 1 - labels)], tmp_path / "ort-int8")
    assert anchor.accuracy >= 0.9, f"the fitted model separates the sentences, int8 got {anchor.accuracy}"
    assert anchor.accuracy + flipped.accuracy == 1.0, (anchor, flipped)
    ops = {node.op_type for node in onnx.load(anchor.path).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops, ops
    fp32 = tmp_path / "ort-int8" / "fp32.onnx"
    assert anchor.file_bytes == anchor.path.stat().st_size < fp32.stat().st_size / 2
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    got = open_session(str(fp32)).run(["logits"], batch)[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert anchor.line().startswith("ORT int8 (quantize_dynamic) dev accuracy ") and " MB)" in anchor.line()
