"""cpu-w8a8's integer GEMMs: written as MatMulIntegerToFloat with the bias inside, no weight zero point where
q - z fits in int8, one activation quantizer for Q, K and V only when their quantizers are bitwise equal."""

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


def test_lowered_file_holds_integer_gemms_with_bias_and_no_zero_point(tiny_export: Path, tmp_path: Path) -> None:
    lowered = lower(tiny_export / "model.onnx", "cpu-w8a8", tmp_path / "lowered.onnx")
    model = ir.load(lowered)
    gemms = _gemms(model)
    assert len(gemms) == LINEARS, f"{len(gemms)} MatMulIntegerToFloat for {LINEARS} quantized Linears"
    with_zp = [n.name for n in gemms if _has_zero_point(n)]
    assert with_zp == [], f"weights of <= 7 bits must lose their zero point: {with_zp}"
    # Q, K and V hand their biases to MultiHeadAttention; every other Linear adds its bias in the GEMM
    no_bias = sorted(n.name or "" for n in gemms if len(n.inputs) < 7 or n.inputs[6] is None)
    assert len(no_bias) == 3 * LAYERS and all(".attention.self." in name for name in no_bias), no_bias
    ops = Counter(n.op_type for n in model.graph)
    assert ops["QuantizeLinear"] == LINEARS - 2 * LAYERS, f"Q, K and V should share one quantizer: {ops}"
    assert ops["MatMul"] == 0 and ops["If"] == LAYERS, ops  # If: MultiHeadAttention with or without mask


def test_ort_runs_the_written_gemms_as_they_are(tiny_export: Path, tmp_path: Path) -> None:
    lowered = lower(tiny_export / "model.onnx", "cpu-w8a8", tmp_path / "lowered.onnx")
    optimized = tmp_path / "optimized.onnx"
    open_session(lowered, optimized_model_path=optimized).run(["logits"], text_batch())
    graph = onnx.load(str(optimized)).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["MatMulIntegerToFloat"] == LINEARS, ops
    assert ops["BiasGelu"] == 0 and ops["Gelu"] == LAYERS, f"the bias should stay in the GEMM: {ops}"
    inits = {i.name for i in graph.initializer}
    zero_points = [n.name for n in graph.node if n.op_type == "MatMulIntegerToFloat" and len(n.input) > 5
                   and n.input[5] and n.input[5] in inits]
    assert zero_points == [], f"ORT's integer GEMMs still get weight zero points: {zero_points}"


def test_8bit_asymmetric_weights_that_do_not_fit_int8_keep_their_zero_point(tiny_export: Path, tmp_path: Path) -> None:
    canonical = requantized(tiny_export / "model.onnx", tmp_path / "model.onnx", 8)
    model = ir.load(canonical)
    value = model.graph.initializers["bert.encoder.layer.0.attention.self.query.weight_q"]
    q = value.const_value.numpy().copy()  # type: ignore[union-attr]
    q[0, 0], q[1, 0] = 0, 255  # this column's q - z cannot fit in int8
    value.const_value = ir.tensor(q, name=value.name)
    ir.save(model, canonical)
    lowered = lower(canonical, "cpu-w8a8", tmp_path / "lowered.onnx")
    kept = [n.name for n in _gemms(ir.load(lowered)) if _has_zero_point(n)]
    assert "bert.encoder.layer.0.attention.self.query/MatMulIntegerToFloat" in kept, kept
    expected = np.asarray(open_session(canonical, optimize=False).run(["logits"], text_batch())[0])
    got = np.asarray(open_session(lowered).run(["logits"], text_batch())[0])
    steps = float(np.abs(got - expected).max()) / output_step(expected)
    assert steps <= 2.0, f"logits off by {steps:.2f} output steps"


@pytest.mark.parametrize("bits", [2, 4])
def test_centred_weights_stay_packed_on_disk(tiny_export: Path, tmp_path: Path, bits: int) -> None:
    canonical = requantized(tiny_export / "model.onnx", tmp_path / "model.onnx", bits)
    lowered = lower(canonical, "cpu-w8a8", tmp_path / "lowered.onnx")
    types = {v.dtype for v in ir.load(lowered).graph.initializers.values()
             if (v.name or "").endswith(".weight_q") and ".encoder." in (v.name or "")}
    assert types == {ir.DataType.UINT2 if bits == 2 else ir.DataType.UINT4}, f"encoder weights on disk: {types}"
    assert lowered.stat().st_size <= canonical.stat().st_size * 1.02


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
