"""cpu-w8a8's integer GEMMs: written as MatMulIntegerToFloat with the bias inside, the weight zero point only when
it is not all zeros, one activation quantizer for Q, K and V only when their quantizers are bitwise equal."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qbert_deploy.runtimes.lowering import lower
from qbert_deploy.runtimes.session import open_session
from qbert_deploy.validation.parity import output_step
from tests.qdq_variants import requantized
from tests.tiny import text_batch

LAYERS, LINEARS = 2, 12  # the tiny BERT: 2 layers of query, key, value, attention output, intermediate, output


def _gemms(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "MatMulIntegerToFloat"]


def _has_zero_point(node: ir.Node) -> bool:
    return len(node.inputs) > 5 and node.inputs[5] is not None


@pytest.mark.parametrize("symmetric", [False, True])
def test_lowered_file_holds_integer_gemms_with_bias(tiny_export: Path, tmp_path: Path, symmetric: bool) -> None:
    canonical = requantized(tiny_export / "model.onnx", tmp_path / "model.onnx", 4, symmetric=symmetric)
    model = ir.load(lower(canonical, "cpu-w8a8", tmp_path / "lowered.onnx"))
    gemms = _gemms(model)
    assert len(gemms) == LINEARS, f"{len(gemms)} MatMulIntegerToFloat for {LINEARS} quantized Linears"
    with_zp = [n.name for n in gemms if _has_zero_point(n)]
    assert len(with_zp) == (0 if symmetric else LINEARS), f"symmetric={symmetric}: zero points on {with_zp}"
    # Q, K and V hand their biases to MultiHeadAttention; every other Linear adds its bias in the GEMM
    no_bias = sorted(n.name or "" for n in gemms if len(n.inputs) < 7 or n.inputs[6] is None)
    assert len(no_bias) == 3 * LAYERS and all(".attention.self." in name for name in no_bias), no_bias
    ops = Counter(n.op_type for n in model.graph)
    assert ops["QuantizeLinear"] == LINEARS - 2 * LAYERS, f"Q, K and V should share one quantizer: {ops}"
    assert ops["MatMul"] == 0 and ops["If"] == 0 and ops["MultiHeadAttention"] == LAYERS, ops
    expected = np.asarray(open_session(canonical, optimize=False).run(["logits"], text_batch())[0])
    got = np.asarray(open_session(tmp_path / "lowered.onnx").run(["logits"], text_batch())[0])
    steps = float(np.abs(got - expected).max()) / output_step(expected)
    assert steps <= 2.0, f"symmetric={symmetric}: logits off by {steps:.2f} output steps"


def test_ort_runs_the_written_gemms_as_they_are(tiny_export: Path, tmp_path: Path) -> None:
    lowered = lower(tiny_export / "model.onnx", "cpu-w8a8", tmp_path / "lowered.onnx")
    optimized = tmp_path / "optimized.onnx"
    open_session(lowered, optimized_model_path=optimized).run(["logits"], text_batch())
    graph = onnx.load(str(optimized)).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["MatMulIntegerToFloat"] == LINEARS, ops
    assert ops["BiasGelu"] == 0 and ops["Gelu"] == LAYERS, f"the bias should stay in the GEMM: {ops}"
    unpack = [n.name for n in graph.node if n.op_type in ("Cast", "Sub") and "weight" in n.name]
    assert unpack == [], f"ORT should fold the weights' widening at session start: {unpack}"


def test_quantizers_are_shared_only_when_bitwise_equal(tiny_export: Path, tmp_path: Path) -> None:
    model = ir.load(tiny_export / "model.onnx")
    value = model.graph.initializers["bert.encoder.layer.1.attention.self.key.input_scale"]
    scale = np.asarray(value.const_value.numpy())  # type: ignore[union-attr]
    value.const_value = ir.tensor(np.nextafter(scale, np.float32(1.0)), name=value.name)  # one ulp apart
    canonical = tmp_path / "model.onnx"
    ir.save(model, canonical)
    lowered = ir.load(lower(canonical, "cpu-w8a8", tmp_path / "lowered.onnx"))
    quantizers = sum(1 for n in lowered.graph if n.op_type == "QuantizeLinear")
    assert quantizers == LINEARS - 2 * LAYERS + 1, f"layer 1's key must keep its own quantizer: {quantizers}"
    expected = np.asarray(open_session(canonical, optimize=False).run(["logits"], text_batch())[0])
    got = np.asarray(open_session(tmp_path / "lowered.onnx").run(["logits"], text_batch())[0])
    steps = float(np.abs(got - expected).max()) / output_step(expected)
    assert steps <= 2.0, f"logits off by {steps:.2f} output steps"
