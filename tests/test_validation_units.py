"""Statistics, the gate's arithmetic and the report's per-layer facts, on hand-made numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qbert_deploy.validation.gate import Tolerance, check, failure_table
from qbert_deploy.validation.harness import BackendSummary
from qbert_deploy.validation.layers import bits_per_layer, sensitivity_per_layer
from qbert_deploy.validation.stats import error_stats, sqnr_db, wilson_interval


def test_wilson_interval_matches_known_values() -> None:
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and abs(high - 0.2775) < 1e-3, (low, high)
    low, high = wilson_interval(90, 100)
    assert abs(low - 0.8256) < 1e-3 and abs(high - 0.9448) < 1e-3, (low, high)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_error_stats_and_sqnr() -> None:
    ref = np.array([[1.0, -1.0], [2.0, 0.0]])
    other = ref + np.array([[0.1, 0.0], [0.0, 0.0]])
    stats = error_stats(ref, other)
    assert abs(stats.max_abs - 0.1) < 1e-9 and stats.median_abs == 0.0, stats
    assert abs(stats.step - 3.0 / 255) < 1e-9, stats
    assert abs(sqnr_db(ref, other) - 10 * math.log10(6.0 / 0.01)) < 1e-6
    assert math.isinf(error_stats(ref, ref).sqnr_db)
    assert math.isinf(error_stats(ref, other * np.nan).max_abs)


def _summary(name: str, accuracy: float, agree: float = 100.0, error: float = 0.0, exact: bool = False
             ) -> BackendSummary:
    stats = error_stats(np.array([0.0, 1.0, 2.0]), np.array([0.0, 1.0 + error, 2.0 + error]), step=1.0)
    return BackendSummary(name, name, 100, accuracy, 0.0, 100.0, agree, agree, stats, 1.0, 1.0, None, exact)


def test_gate_checks_baseline_pytorch_agreement_and_error() -> None:
    runs = [_summary("pytorch-fp32", 90.0), _summary("pytorch-fakequant", 88.0),
            _summary("ort-spec", 87.6), _summary("ort-cpu-canonical", 87.0, agree=98.0, error=5.0, exact=True)]
    baseline = {"pytorch-fp32": 90.2, "pytorch-fakequant": 88.0, "ort-spec": 88.0}
    failures = check(runs, Tolerance(max_drop=0.5), baseline)
    got = {(f.backend, f.check) for f in failures}
    assert got == {("ort-cpu-canonical", "baseline"), ("ort-cpu-canonical", "drop vs PyTorch fake-quant"),
                   ("ort-cpu-canonical", "agreement with PyTorch fake-quant"),
                   ("ort-cpu-canonical", "median logit error vs PyTorch fake-quant")}, got
    relative = check(runs[:3], Tolerance(max_drop=0.5, relative=True), {"pytorch-fakequant": 88.5})
    assert {(f.backend, f.check) for f in relative} == {
        ("pytorch-fakequant", "drop vs baseline"), ("pytorch-fp32", "baseline"), ("ort-spec", "baseline")}, relative
    assert "drop vs baseline" in failure_table(relative)


def test_bits_and_sensitivity_per_layer() -> None:
    bits = bits_per_layer({"bert.embeddings.word_embeddings": 8, "bert.encoder.layer.0.attention.self.query": 3,
                           "bert.encoder.layer.0.output.dense": 2, "bert.encoder.layer.1.output.dense": 4})
    assert bits == {0: 2.5, 1: 4.0}, bits
    assert sensitivity_per_layer({"dev_accuracy": 0.9}) == {}
    assert sensitivity_per_layer({"sensitivity.layer.1": 2.0, "sensitivity.layer.0": 5.0}) == {0: 5.0, 1: 2.0}
    assert sensitivity_per_layer({"hessian_omega": [1.0, 3.0]}) == {0: 1.0, 1: 3.0}


def test_limit_takes_examples_spread_over_a_label_sorted_file() -> None:
    from qbert_deploy.validation.task_data import spread

    labels = [1] * 50 + [0] * 50  # the movie-review split is sorted by rating
    assert sorted(set(spread(labels, 8))) == [0, 1] and len(spread(labels, 8)) == 8
    assert spread(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert spread(labels, None) == labels and spread(labels, 500) == labels
