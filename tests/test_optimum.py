"""Ecosystem: an export directory loads in Optimum's ORTModelForSequenceClassification and runs in a pipeline."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer, pipeline

from tests.served import Reference
from tests.stack import needs_optimum
from tests.tiny import LABELS, SENTENCES, text_batch


@needs_optimum
def test_export_dir_runs_in_optimum_and_a_transformers_pipeline(tiny_export: Path, tmp_path: Path) -> None:
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    shutil.copyfile(export / "model.onnx", export / "model.cpu-test.onnx")  # stands in for a lowered profile
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from optimum.onnxruntime import ORTModelForSequenceClassification

        model = ORTModelForSequenceClassification.from_pretrained(export)  # reads model.onnx as it is
        lowered = ORTModelForSequenceClassification.from_pretrained(export, file_name="model.cpu-test.onnx")
    assert Path(lowered.path).name == "model.cpu-test.onnx" and Path(model.path).name == "model.onnx"
    assert model.config.id2label == dict(enumerate(LABELS)), model.config.id2label
    classify = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(export))
    results = classify(SENTENCES, top_k=None)
    logits = Reference(tiny_export / "model.onnx").logits(text_batch())
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    for sentence, scores, probs in zip(SENTENCES, results, expected, strict=True):
        got = np.array([next(s["score"] for s in scores if s["label"] == label) for label in LABELS])
        assert np.abs(got - probs).max() <= 1e-5, f"{sentence!r}: pipeline {got} != in-process ORT {probs}"
