"""The `cuda-fused` GPU profiles: graph form checked here, numerics on the CPU EP (ORT has CPU kernels for every
op of the fp16 graph), speed only on a GPU (`@pytest.mark.gpu`)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qbert_deploy.runtimes.attention_fusion import fuse_attention
from qbert_deploy.runtimes.graph_checks import cuda_violations, weight_sites
from qbert_deploy.runtimes.lowering import lower, matmulnbits_4bit, ort_transformer_fusions, profile_info
from qbert_deploy.runtimes.lowering_passes import fold_activation_qdq, gather_then_dequantize, pack_qkv_matmulnbits
from qbert_deploy.runtimes.session import open_session
from qbert_deploy.validation.parity import output_step
from tests.qdq_variants import requantized
from tests.tiny import text_batch

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
LAYERS, LINEARS = 2, 12  # the tiny BERT: 2 layers of 6 Linears
# fp16 math and float (not 8-bit) activations against the canonical graph, in 8-bit output steps of the logits' range
TOLERANCE_STEPS = 4.0


def _canonical_logits(canonical: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(open_session(canonical, optimize=False).run(["logits"], feed)[0])


@pytest.mark.parametrize(("profile", "bits"), [("cuda-fused", 4), ("cuda-fused-w8", 8)])
def test_fused_profile_graph_form(tiny_export: Path, tmp_path: Path, profile: str, bits: int) -> None:
    model = ir.load(lower(tiny_export / "model.onnx", profile, tmp_path / f"model.{profile}.onnx"))
    ops = Counter(n.op_type for n in model.graph)
    assert ops["QuantizeLinear"] == 0 and ops["DequantizeLinear"] == 0, f"activation Q/DQ left: {ops}"
    assert ops["MultiHeadAttention"] == LAYERS, ops
    assert ops["SkipLayerNormalization"] == 2 * LAYERS + 1, f"embeddings + 2 per layer: {ops}"
    assert ops["BiasGelu"] == LAYERS, ops
    assert ops["LayerNormalization"] == 0 and ops["Gelu"] == 0, ops
    nbits = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert len(nbits) == LINEARS - 2 * LAYERS, "Q, K and V are one MatMulNBits per layer"
    assert {n.attributes["bits"].as_int() for n in nbits} == {bits}
    assert ops["Split"] == LAYERS, ops
    packed_qkv = [n for n in nbits if n.name and n.name.endswith("/qkv_MatMulNBits")]
    assert len(packed_qkv) == LAYERS and all(n.attributes["N"].as_int() == 3 * 64 for n in packed_qkv)
    for node in nbits:  # weights stay packed integers: N x blocks x (block * bits / 8) bytes
        packed = node.inputs[1]
        assert packed is not None and packed.dtype == ir.DataType.UINT8 and packed.shape is not None
        k, n, block = (node.attributes[a].as_int() for a in ("K", "N", "block_size"))
        assert tuple(packed.shape) == (n, -(-k // block), block * bits // 8), node.name
    encoder_norms = [n for n in model.graph if n.op_type == "SkipLayerNormalization" and ".encoder." in str(
        n.inputs[2].name if n.inputs[2] is not None else "")]
    assert len(encoder_norms) == 2 * LAYERS and all(len(n.inputs) == 5 and n.inputs[4] is not None
                                                     for n in encoder_norms), "the Linear's bias belongs inside"
    floats = {v.dtype for v in model.graph.initializers.values() if v.dtype.is_floating_point()}
    assert floats == {ir.DataType.FLOAT16}, floats
    assert model.graph.outputs[0].dtype == ir.DataType.FLOAT, "logits stay float32 for callers"
    assert cuda_violations(model.graph) == []
    info = json.loads(model.metadata_props["qbert.lowering"])
    assert "Q/DQ folded" in info["numerics"] and info["numerics"] == profile_info(profile).numerics
    assert info["passes"]["fold_activation_qdq"] == LINEARS and info["passes"]["ort_transformer_fusions"] > 0
    assert info["passes"]["pack_qkv_matmulnbits"] == LAYERS


@pytest.mark.parametrize("profile", ["cuda-fused", "cuda-fused-w8"])
def test_fused_profile_numerics_on_the_cpu(tiny_export: Path, tmp_path: Path, profile: str) -> None:
    canonical = tiny_export / "model.onnx"
    lowered = lower(canonical, profile, tmp_path / f"model.{profile}.onnx")
    session = ort.InferenceSession(str(lowered), providers=["CPUExecutionProvider"])
    for feed in (text_batch(), text_batch(["one unpadded sentence"])):
        expected = _canonical_logits(canonical, feed)
        got = np.asarray(session.run(["logits"], feed)[0])
        steps = float(np.abs(got - expected).max()) / output_step(expected)
        assert steps <= TOLERANCE_STEPS, f"{profile}: logits off by {steps:.2f} output steps"
        assert (got.argmax(-1) == expected.argmax(-1)).all(), f"{profile} changed a prediction"


def test_folding_changes_only_the_activation_rounding(tiny_export: Path, tmp_path: Path) -> None:
    """The fold alone, in fp32: weights untouched, the logits move by less than the 8-bit activations' rounding."""
    canonical = tiny_export / "model.onnx"
    model = ir.load(canonical)
    weights_before = len(list(weight_sites(model.graph)))
    assert fold_activation_qdq(model) == LINEARS
    assert len(list(weight_sites(model.graph))) == weights_before == LINEARS
    assert not [n for n in model.graph if n.op_type == "QuantizeLinear"]
    folded = tmp_path / "folded.onnx"
    ir.save(model, folded)
    feed = text_batch()
    expected = _canonical_logits(canonical, feed)
    got = np.asarray(open_session(folded, optimize=False).run(["logits"], feed)[0])
    assert not np.array_equal(got, expected), "folding the activation quantizers must change the numbers"
    assert float(np.abs(got - expected).max()) / output_step(expected) <= TOLERANCE_STEPS


def test_fused_profile_on_2bit_weights_keeps_cuda_rules(tiny_export: Path, tmp_path: Path) -> None:
    canonical = requantized(tiny_export / "model.onnx", tmp_path / "model.onnx", 2)
    model = ir.load(lower(canonical, "cuda-fused", tmp_path / "model.cuda-fused.onnx"))
    assert cuda_violations(model.graph) == []
    assert {n.attributes["bits"].as_int() for n in model.graph if n.op_type == "MatMulNBits"} == {4}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and onnxruntime-gpu")
@pytest.mark.parametrize("profile", ["cuda-fused", "cuda-fused-w8"])
def test_fused_profile_runs_on_the_gpu(tiny_export: Path, tmp_path: Path, profile: str) -> None:
    canonical = tiny_export / "model.onnx"
    lowered = lower(canonical, profile, tmp_path / f"model.{profile}.onnx")
    session = open_session(lowered, providers=("cuda",), profile=profile)
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    feed = text_batch()
    expected = _canonical_logits(canonical, feed)
    got = np.asarray(session.run(["logits"], feed)[0])
    assert float(np.abs(got - expected).max()) / output_step(expected) <= TOLERANCE_STEPS
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_packed_qkv_is_exactly_the_three_projections(tiny_export: Path) -> None:
    """In fp32 on the CPU EP, one MatMulNBits + Split gives bitwise the logits of the three MatMulNBits."""
    def logits(pack: bool) -> np.ndarray:
        model = ir.load(tiny_export / "model.onnx")
        for rewrite in (gather_then_dequantize, fuse_attention, fold_activation_qdq, ort_transformer_fusions,
                        matmulnbits_4bit):
            rewrite(model)
        if pack:
            assert pack_qkv_matmulnbits(model) == LAYERS
        session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
        return np.asarray(session.run(["logits"], text_batch())[0])

    np.testing.assert_array_equal(logits(pack=True), logits(pack=False))
