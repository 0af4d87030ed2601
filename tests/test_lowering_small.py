"""cpu-small, the memory-first CPU profile: weights stay packed in the file ORT runs, and the logits stay close."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from qbert_deploy.runtimes.lowering import MEMORY_FIRST_ACCURACY_LEVEL, LoweringError, lower, lower_model
from qbert_deploy.runtimes.lowering_passes import unpacked_weight_copies, weight_bits
from qbert_deploy.runtimes.session import open_session
from qbert_deploy.validation.parity import output_step
from tests.qdq_variants import requantized
from tests.tiny import text_batch


def _logits(path: Path, optimize: bool, dump: Path | None = None) -> np.ndarray:
    session = open_session(path, optimize=optimize, optimized_model_path=dump)
    return np.asarray(session.run(["logits"], text_batch())[0])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_small_logits_within_two_steps_with_ort_optimizations_off(tiny_export: Path, tmp_path: Path,
                                                                  bits: int) -> None:
    canonical = requantized(tiny_export / "model.onnx", tmp_path / "model.onnx", bits)
    expected = _logits(canonical, optimize=False)
    got = _logits(lower(canonical, "cpu-small", tmp_path / "model.cpu-small.onnx"), optimize=False)
    steps = float(np.abs(got - expected).max()) / output_step(expected)
    assert steps <= 2.0, f"cpu-small at {bits} bits: logits off by {steps:.2f} output steps"


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_small_holds_every_encoder_matrix_packed(tiny_export: Path, tmp_path: Path, bits: int) -> None:
    canonical = requantized(tiny_export / "model.onnx", tmp_path / "model.onnx", bits)
    lowered = lower(canonical, "cpu-small", tmp_path / "model.cpu-small.onnx")
    model = ir.load(lowered)
    linears = [name for name in weight_bits(model) if ".embeddings." not in f".{name}."]
    nodes = {(n.name or "").removesuffix("/MatMulNBits"): n for n in model.graph if n.op_type == "MatMulNBits"}
    assert sorted(nodes) == sorted(linears), "every quantized Linear must be one MatMulNBits"
    want = 2 if bits == 2 else 4
    for name, node in nodes.items():
        assert node.attributes["bits"].as_int() == want, f"{name}: {bits}-bit weight at {node.attributes['bits']}"
        assert node.attributes["accuracy_level"].as_int() == MEMORY_FIRST_ACCURACY_LEVEL
        k, n = node.attributes["K"].as_int(), node.attributes["N"].as_int()
        packed = node.inputs[1]
        assert packed is not None and packed.dtype == ir.DataType.UINT8
        assert packed.const_value is not None and packed.const_value.nbytes == k * n * want // 8, name
    # no int8 or fp32 copy of an encoder matrix anywhere in the file
    wide = [v.name for v in model.graph.initializers.values() if v.shape is not None and len(v.shape) == 2
            and v.dtype in (ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.FLOAT)
            and ".encoder." in f".{v.name}"]
    assert wide == [], f"wide copies of encoder matrices: {wide}"
    assert not any(n.op_type == "DequantizeLinear" and n.inputs[0] is not None and n.inputs[0].const_value is not None
                   and len(n.inputs[0].shape or ()) == 2 and ".encoder." in f".{n.inputs[0].name}"
                   for n in model.graph)


def test_ort_keeps_the_packed_kernels_and_the_int8_embedding_gather(tiny_export: Path, tmp_path: Path) -> None:
    lowered = lower(tiny_export / "model.onnx", "cpu-small", tmp_path / "model.cpu-small.onnx")
    dump = tmp_path / "optimized.onnx"
    _logits(lowered, optimize=True, dump=dump)
    optimized = ir.load(dump)
    ops = Counter(n.op_type for n in optimized.graph)
    linears = [name for name in weight_bits(optimized) if ".embeddings." not in f".{name}."]
    assert ops["MatMulNBits"] == len(linears), f"ORT rewrote the packed kernels: {ops}"
    assert ops["MatMulIntegerToFloat"] == 0, f"ORT widened weights to int8: {ops}"
    dequantized = [n.name for n in optimized.graph if n.op_type == "DequantizeLinear" and n.inputs[0] is not None
                   and n.inputs[0].const_value is not None and len(n.inputs[0].shape or ()) >= 2]
    assert dequantized == [], f"constant matrices dequantized at run time: {dequantized}"
    tables = [n for n in optimized.graph if n.op_type == "Gather" and n.inputs[0] is not None
              and n.inputs[0].dtype in (ir.DataType.INT8, ir.DataType.UINT8)]
    assert tables, "ORT folded the embedding tables to float"
    floats = [v.name for v in optimized.graph.initializers.values() if v.dtype == ir.DataType.FLOAT
              and v.shape is not None and len(v.shape) == 2 and ".encoder." in f".{v.name}"]
    assert floats == [], f"ORT made float copies of encoder matrices: {floats}"


def test_postcondition_catches_a_weight_left_wide(tiny_export: Path) -> None:
    model = ir.load(tiny_export / "model.onnx")
    assert unpacked_weight_copies(model), "a canonical graph still has DQ -> MatMul weights: must be reported"
    lower_model(model, "cpu-small")
    assert unpacked_weight_copies(model) == []
    node = next(n for n in model.graph if n.op_type == "MatMulNBits")
    node.attributes["bits"] = ir.AttrInt64("bits", 8)
    assert unpacked_weight_copies(model), "an 8-bit kernel for a low-bit weight must be reported"


def test_small_refuses_an_already_lowered_model(tiny_export: Path, tmp_path: Path) -> None:
    lowered = lower(tiny_export / "model.onnx", "cpu-small", tmp_path / "model.cpu-small.onnx")
    with pytest.raises(LoweringError, match="already lowered"):
        lower(lowered, "cpu-small", tmp_path / "again.onnx")
