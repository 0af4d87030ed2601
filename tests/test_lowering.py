"""Runtime lowering: integer kernels in ORT's optimized graph, logits equal to the canonical graph's, ORT pitfalls."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import qbert_deploy.runtimes.lowering as lowering
from qbert_deploy.runtimes.graph_checks import INTEGER_GEMMS, blocked_int8_pitfalls, cuda_violations
from qbert_deploy.runtimes.lowering import (
    MATMULNBITS_ACCURACY_LEVEL,
    PROFILES,
    LoweringError,
    lower,
    lower_model,
    lowered_path,
    profile_info,
)
from qbert_deploy.runtimes.session import open_session
from qbert_deploy.validation.parity import output_step
from tests.qdq_variants import requantized
from tests.tiny import text_batch

CPU_PROFILES = ("cpu-w8a8", "cpu-small", "weight-only", "cuda")  # cuda's form (MatMulNBits) also runs on the CPU EP


def _logits(path: Path, optimize: bool, dump: Path | None = None) -> np.ndarray:
    session = open_session(path, optimize=optimize, optimized_model_path=dump)
    return np.asarray(session.run(["logits"], text_batch())[0])


def _linears(path: Path) -> list[str]:
    bits = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["qbert.weight_bits"])
    return [name for name in bits if ".embeddings." not in f".{name}."]


def _histogram(path: Path) -> Counter[str]:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def test_public_api_is_what_it_claims() -> None:
    assert PROFILES == ("cpu-w8a8", "cpu-small", "weight-only", "cuda", "cuda-fp16", "cuda-fused", "cuda-fused-w8",
                        "tensorrt")
    for name in lowering.__all__:
        assert hasattr(lowering, name), name


def test_cpu_w8a8_runs_every_encoder_linear_in_an_integer_kernel(tiny_export: Path, tmp_path: Path) -> None:
    lowered = lower(tiny_export / "model.onnx", "cpu-w8a8", tmp_path / "model.cpu-w8a8.onnx")
    optimized = tmp_path / "optimized.onnx"
    _logits(lowered, optimize=True, dump=optimized)
    graph = onnx.load(str(optimized)).graph
    ops = Counter(node.op_type for node in graph.node)
    integer = sum(ops[op] for op in INTEGER_GEMMS)
    linears = _linears(tiny_export / "model.onnx")
    assert integer == len(linears), f"{integer} integer GEMMs for {len(linears)} quantized Linears: {ops}"
    produced_by = {out: node for node in graph.node for out in node.output}
    float_behind_dq = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm", "FusedMatMul")
                       and any(produced_by.get(i) is not None and produced_by[i].op_type == "DequantizeLinear"
                               for i in n.input)]
    assert float_behind_dq == [], f"float GEMMs still fed by DequantizeLinear: {float_behind_dq}"
    assert ops["If"] == 0 and ops["MultiHeadAttention"] == 2, \
        f"attention core not fused (one masked MultiHeadAttention) in each of the 2 layers: {ops}"
    assert ops["SkipLayerNormalization"] == 0, f"ORT formed its slower SkipLayerNormalization: {ops}"


def test_cpu_w8a8_keeps_the_file_packed(tiny_export: Path, tmp_path: Path) -> None:
    canonical = tiny_export / "model.onnx"
    lowered = lower(canonical, "cpu-w8a8", tmp_path / "lowered.onnx")
    assert lowered.stat().st_size <= canonical.stat().st_size * 1.02, (lowered.stat().st_size,
                                                                        canonical.stat().st_size)
    types = {v.dtype for v in ir.load(lowered).graph.initializers.values() if (v.name or "").endswith(".weight_q")}
    assert ir.DataType.UINT4 in types, f"weights should stay packed on disk, found {types}"


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("profile", CPU_PROFILES)
def test_lowered_logits_match_canonical(tiny_export: Path, tmp_path: Path, bits: int, profile: str) -> None:
    canonical = requantized(tiny_export / "model.onnx", tmp_path / "model.onnx", bits)
    expected = _logits(canonical, optimize=False)
    got = _logits(lower(canonical, profile, tmp_path / f"model.{profile}.onnx"), optimize=True)
    steps = float(np.abs(got - expected).max()) / output_step(expected)
    assert steps <= 2.0, f"{profile} at {bits} bits: logits off by {steps:.2f} output steps"
    assert (got.argmax(-1) == expected.argmax(-1)).all(), f"{profile} at {bits} bits changes predictions"


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_signed_weights_lower_exactly(tiny_export: Path, tmp_path: Path, bits: int) -> None:
    canonical = requantized(tiny_export / "model.onnx", tmp_path / "model.onnx", bits, symmetric=True)
    expected = _logits(canonical, optimize=False)
    for profile in CPU_PROFILES:
        got = _logits(lower(canonical, profile, tmp_path / f"model.{profile}.onnx"), optimize=True)
        steps = float(np.abs(got - expected).max()) / output_step(expected)
        assert steps <= 2.0, f"{profile}, signed {bits}-bit: off by {steps:.2f} output steps"


def test_gather_then_dequantize_is_exact(tiny_export: Path, tmp_path: Path) -> None:
    lowered = lower(tiny_export / "model.onnx", "cpu-w8a8", tmp_path / "lowered.onnx")
    model = ir.load(lowered)
    tables = [n.name for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0] is not None
              and any(u.node.op_type == "Gather" for u in n.outputs[0].uses())]
    assert tables == [], f"whole embedding tables still dequantized: {tables}"
    expected = _logits(tiny_export / "model.onnx", optimize=False)
    got = _logits(lowered, optimize=False)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg="spec-level logits changed")


def test_matmulnbits_accuracy_level_is_pinned(tiny_export: Path, tmp_path: Path) -> None:
    for profile in ("weight-only", "cuda"):
        model = ir.load(lower(tiny_export / "model.onnx", profile, tmp_path / f"{profile}.onnx"))
        nodes = [n for n in model.graph if n.op_type == "MatMulNBits"]
        assert len(nodes) == len(_linears(tiny_export / "model.onnx")), f"{profile}: {len(nodes)} MatMulNBits"
        levels = {n.name: n.attributes["accuracy_level"].as_int() if "accuracy_level" in n.attributes else None
                  for n in nodes}
        assert set(levels.values()) == {MATMULNBITS_ACCURACY_LEVEL}, f"{profile}: accuracy levels {levels}"
        config = profile_info(profile).session_config
        assert config["session.qdq_matmulnbits_accuracy_level"] == str(MATMULNBITS_ACCURACY_LEVEL)
        record = json.loads(model.metadata_props["qbert.lowering"])
        assert record["profile"] == profile and str(MATMULNBITS_ACCURACY_LEVEL) in record["numerics"], record


def _bad_blocked_int8_graph() -> ir.Model:
    """The pattern ORT 1.32 fuses wrongly: blocked int8 weight + activation Q/DQ, no Q after the MatMul."""
    x = ir.val("x", ir.DataType.FLOAT, [2, 32])
    init = {}
    arrays: dict[str, np.ndarray] = {"w": np.ones((32, 4), np.int8), "w_scale": np.ones((2, 4), np.float32),
                                     "a_scale": np.array(0.1, np.float32), "a_zp": np.array(128, np.uint8)}
    for name, array in arrays.items():
        init[name] = ir.val(name, const_value=ir.tensor(array, name=name))
    q = ir.node("QuantizeLinear", [x, init["a_scale"], init["a_zp"]], name="q")
    dq = ir.node("DequantizeLinear", [q.outputs[0], init["a_scale"], init["a_zp"]], name="dq")
    w_dq = ir.node("DequantizeLinear", [init["w"], init["w_scale"]], attributes={"axis": 0, "block_size": 16},
                   name="w_dq")
    matmul = ir.node("MatMul", [dq.outputs[0], w_dq.outputs[0]], name="bad_matmul")
    graph = ir.Graph([x], matmul.outputs, nodes=[q, dq, w_dq, matmul], initializers=list(init.values()),
                     opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def test_blocked_int8_checker_catches_the_wrong_result_pattern() -> None:
    model = _bad_blocked_int8_graph()
    assert blocked_int8_pitfalls(model.graph) == ["bad_matmul"]
    # with a QuantizeLinear after the MatMul the pattern is the (correct) QLinearMatMul one
    graph = model.graph
    matmul = next(n for n in graph if n.name == "bad_matmul")
    scale = ir.val("y_scale", const_value=ir.tensor(np.array(1.0, np.float32), name="y_scale"))
    graph.register_initializer(scale)
    graph.append(ir.node("QuantizeLinear", [matmul.outputs[0], scale], name="y_q"))
    assert blocked_int8_pitfalls(graph) == []


def test_blocked_weights_are_refused(tiny_export: Path) -> None:
    model = ir.load(tiny_export / "model.onnx")
    dq = next(n for n in model.graph if (n.name or "").endswith("query/weight_dequantize"))
    dq.attributes["block_size"] = ir.AttrInt64("block_size", 16)
    with pytest.raises(LoweringError, match="per-output-channel"):
        lower_model(model, "cpu-w8a8")


@pytest.mark.parametrize("profile", PROFILES)
def test_no_profile_emits_the_blocked_int8_pattern(tiny_export: Path, tmp_path: Path, profile: str) -> None:
    model = ir.load(lower(tiny_export / "model.onnx", profile, tmp_path / "lowered.onnx"))
    assert blocked_int8_pitfalls(model.graph) == []


def test_cuda_rules_on_a_2bit_graph(tiny_export: Path, tmp_path: Path) -> None:
    canonical = requantized(tiny_export / "model.onnx", tmp_path / "model.onnx", 2)
    before = cuda_violations(ir.load(canonical).graph)
    assert any("int2" in p for p in before), f"the checker must see the int2 weights: {before}"
    model = ir.load(lower(canonical, "cuda", tmp_path / "model.cuda.onnx"))
    assert cuda_violations(model.graph) == []
    bits = {n.attributes["bits"].as_int() for n in model.graph if n.op_type == "MatMulNBits"}
    assert bits == {4}, f"2-bit weights must run in CUDA's 4-bit kernel, got {bits}"
    integer = [n.op_type for n in model.graph if n.op_type in INTEGER_GEMMS]
    assert integer == [], f"the CUDA EP has no integer GEMMs: {integer}"
    attention = [n for n in model.graph if n.op_type == "MultiHeadAttention"]
    assert len(attention) == 2, "each of the tiny model's 2 attention cores should be one MultiHeadAttention"
    assert profile_info("cuda").provider_options["CUDAExecutionProvider"] == {"use_tf32": "0"}


def test_cuda_fp16_form_keeps_io_types_and_predictions(tiny_export: Path, tmp_path: Path) -> None:
    canonical = tiny_export / "model.onnx"
    lowered = lower(canonical, "cuda-fp16", tmp_path / "model.cuda-fp16.onnx")
    model = ir.load(lowered)
    assert cuda_violations(model.graph) == []
    floats = {v.dtype for v in model.graph.initializers.values() if v.dtype.is_floating_point()}
    assert floats == {ir.DataType.FLOAT16}, f"float initializers left in fp32: {floats}"
    assert model.graph.outputs[0].dtype == ir.DataType.FLOAT, "logits must stay float32 for callers"
    ops = Counter(n.op_type for n in model.graph)
    assert ops["MultiHeadAttention"] == 2 and ops["MatMulNBits"] == len(_linears(canonical)), ops
    # The CPU EP has fp16 kernels for all of it: check the numerics here, the speed on a GPU.
    expected = _logits(canonical, optimize=False)
    got = ort.InferenceSession(str(lowered), providers=["CPUExecutionProvider"]).run(["logits"], text_batch())[0]
    assert (got.argmax(-1) == expected.argmax(-1)).all(), "fp16 changed a prediction"
    assert np.abs(got - expected).max() <= 8 * output_step(expected), "fp16 drifted beyond 8 output steps"


def test_tensorrt_form_is_symmetric_int8(tiny_export: Path, tmp_path: Path) -> None:
    canonical = tiny_export / "model.onnx"
    model = ir.load(lower(canonical, "tensorrt", tmp_path / "model.tensorrt.onnx"))
    for node in model.graph:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.inputs) > 2:
            zp = node.inputs[2]
            assert zp is not None and zp.const_value is not None
            assert zp.dtype == ir.DataType.INT8, f"{node.name}: zero point type {zp.dtype}"
            if not any(u.node.op_type == "Gather" for u in node.outputs[0].uses()):
                assert not np.asarray(zp.const_value.numpy()).any(), f"{node.name}: non-zero zero point"
    expected = _logits(canonical, optimize=False)
    got = _logits(tmp_path / "model.tensorrt.onnx", optimize=False)
    steps = float(np.abs(got - expected).max()) / output_step(expected)
    assert steps <= 8.0, f"symmetric activations moved the logits by {steps:.2f} output steps"


def test_tensorrt_refuses_8bit_asymmetric_weights_that_do_not_fit(tiny_export: Path, tmp_path: Path) -> None:
    model = ir.load(requantized(tiny_export / "model.onnx", tmp_path / "model.onnx", 8))
    value = model.graph.initializers["bert.encoder.layer.0.attention.self.query.weight_q"]
    q = value.const_value.numpy().copy()  # type: ignore[union-attr]
    q[0, 0], q[1, 0] = 0, 255  # a column spanning the whole uint8 range cannot be centred into int8
    value.const_value = ir.tensor(q, name=value.name)
    with pytest.raises(LoweringError, match="symmetric"):
        lower_model(model, "tensorrt")


def test_bad_inputs_give_clear_errors(tiny_export: Path, tmp_path: Path) -> None:
    canonical = tiny_export / "model.onnx"
    with pytest.raises(LoweringError, match="unknown lowering profile 'gpu'"):
        lower(canonical, "gpu", tmp_path / "x.onnx")
    with pytest.raises(LoweringError, match="no such model file"):
        lower(tmp_path / "missing.onnx", "cpu-w8a8", tmp_path / "x.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(LoweringError, match="not a readable ONNX model"):
        lower(tmp_path / "junk.onnx", "cpu-w8a8", tmp_path / "x.onnx")
    with pytest.raises(LoweringError, match="must not replace"):
        lower(canonical, "cpu-w8a8", canonical)
    once = lower(canonical, "cpu-w8a8", tmp_path / "once.onnx")
    with pytest.raises(LoweringError, match="already lowered"):
        lower(once, "weight-only", tmp_path / "twice.onnx")
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "twice.onnx").exists()
    assert lowered_path(tmp_path, "cuda") == tmp_path / "model.cuda.onnx"


def test_lowered_file_runs_in_plain_onnxruntime(tiny_export: Path, tmp_path: Path) -> None:
    """No qbert_deploy needed at run time: a bare InferenceSession with default options."""
    lowered = lower(tiny_export / "model.onnx", "cpu-w8a8", tmp_path / "model.cpu-w8a8.onnx")
    session = ort.InferenceSession(str(lowered), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], text_batch())[0]
    assert logits.shape == (len(text_batch()["input_ids"]), 2) and np.isfinite(logits).all()


def test_weight_only_keeps_2bit_weights_in_the_2bit_kernel(tiny_export: Path, tmp_path: Path) -> None:
    canonical = requantized(tiny_export / "model.onnx", tmp_path / "model.onnx", 2)
    model = ir.load(lower(canonical, "weight-only", tmp_path / "model.weight-only.onnx"))
    bits = {n.attributes["bits"].as_int() for n in model.graph if n.op_type == "MatMulNBits"}
    assert bits == {2}, f"weight-only should keep 2-bit weights at 2 bits, got {bits}"


@pytest.fixture(scope="module")
def k72_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny export whose FFN has 72 neurons: output.dense's input width K = 72 is not a multiple of 16."""
    from qbert_deploy.exporters.onnx_export import export_checkpoint
    from tests.tiny import tiny_checkpoint

    out = tmp_path_factory.mktemp("k72") / "export"
    export_checkpoint(tiny_checkpoint(intermediate=72), out, opset=21)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_only_pads_an_input_width_that_is_not_a_multiple_of_16(k72_export: Path, tmp_path: Path,
                                                                      bits: int) -> None:
    """MatMulNBits stores K in whole blocks: the last block is padded, and the logits match the canonical graph."""
    canonical = requantized(k72_export / "model.onnx", tmp_path / "model.onnx", bits)
    expected = _logits(canonical, optimize=False)
    for profile in ("weight-only", "cuda"):
        lowered = lower(canonical, profile, tmp_path / f"model.{profile}.onnx")
        widths = {n.attributes["K"].as_int() for n in ir.load(lowered).graph if n.op_type == "MatMulNBits"}
        assert 72 in widths, f"{profile}: no MatMulNBits with K = 72 ({widths})"
        got = _logits(lowered, optimize=True)
        steps = float(np.abs(got - expected).max()) / output_step(expected)
        assert steps <= 2.0, f"{profile}, {bits}-bit, K = 72: off by {steps:.2f} output steps"
