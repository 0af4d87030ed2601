"""cpu-w8a8 stores 3-bit weights at 3 bits per value: exact unpacking, folded by ORT, same logits, smaller file."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

import qbert_deploy.runtimes.lowering as lowering
from qbert_deploy.runtimes.bitpack import UINT2_OPSET, pack_3bit, unpack_3bit, unpack_3bit_nodes
from qbert_deploy.runtimes.graph_checks import INTEGER_GEMMS
from qbert_deploy.runtimes.lowering import LoweringError, lower
from qbert_deploy.runtimes.session import open_session
from tests.qdq_variants import requantized
from tests.tiny import text_batch

UNPACK_OPS = ("BitShift", "BitwiseAnd", "BitwiseXor")
# bytes of unpack nodes, names and types one packed weight may add to the file (~1.3 KB uint4, ~1.5 KB int4 measured
# on the tiny BERT): the tiny BERT's 64-wide weights save less than that, BERT-base's 768 x 768 ones save 72 KB each
SITE_COST = 1600


def _sizes(n: int) -> tuple[int, int]:
    """(bytes in an int4 container, bytes packed at 3 bits) for n values."""
    return -(-n // 2), 3 * -(-n // 8)


@pytest.mark.parametrize("uint2", [False, True], ids=["uint8-low", "uint2-low"])
@pytest.mark.parametrize("size", [1, 7, 8, 9, 61, 4096])
def test_planes_hold_3_bits_per_value(size: int, uint2: bool) -> None:
    values = np.random.default_rng(size).integers(0, 8, size)
    low, high = pack_3bit(values, uint2)
    stored = len(ir.tensor(low).tobytes()) + len(ir.tensor(high).tobytes())  # as written to the file
    assert stored == _sizes(size)[1], f"{size} values in {stored} bytes"
    np.testing.assert_array_equal(unpack_3bit(low, high, size), values, err_msg=f"round trip of {size} values")


def test_pack_refuses_values_beyond_3_bits() -> None:
    with pytest.raises(LoweringError, match="do not fit in 3 unsigned bits"):
        pack_3bit(np.array([0, 8]))


def _unpack_model(values: np.ndarray, offset: int, opset: int) -> onnx.ModelProto:
    """A graph with no inputs: the planes of `values` + the unpack chain + the int8 Cast of cpu-w8a8."""
    graph = ir.Graph([], [], nodes=[], opset_imports={"": opset}, name="unpack")
    planes = []
    for name, array in zip(("low", "high"), pack_3bit(values + offset, opset >= UINT2_OPSET), strict=True):
        tensor = ir.tensor(array, name=name)
        value = ir.val(name, tensor.dtype, ir.Shape(array.shape), const_value=tensor)
        graph.register_initializer(value)
        planes.append(value)
    nodes, unpacked = unpack_3bit_nodes(graph, planes[0], planes[1], values.shape, offset, "unpack")
    graph.extend(nodes)
    cast = ir.node("Cast", [unpacked], attributes={"to": ir.DataType.INT8}, name="widen")
    out = cast.outputs[0]
    out.name, out.dtype, out.shape = "weight", ir.DataType.INT8, ir.Shape(values.shape)
    graph.append(cast)
    graph.outputs.append(cast.outputs[0])
    return ir.serde.serialize_model(ir.Model(graph, ir_version=10))


@pytest.mark.parametrize("opset", [21, 25])
@pytest.mark.parametrize("shape", [(5, 7), (8, 3), (64, 128)])
@pytest.mark.parametrize("signed", [False, True])
def test_unpack_chain_gives_the_container_integers(shape: tuple[int, int], signed: bool, opset: int) -> None:
    offset = 4 if signed else 0
    values = np.random.default_rng(shape[0]).integers(-offset, 8 - offset, shape)
    model = _unpack_model(values, offset, opset)
    onnx.checker.check_model(model, full_check=True)
    (reference,) = ReferenceEvaluator(model).run(None, {})
    (folded,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})
    for name, got in (("onnx.reference", reference), ("onnxruntime", folded)):
        assert got.dtype == np.int8 and got.shape == shape, f"{name}: {got.dtype} {got.shape}"
        np.testing.assert_array_equal(got, values, err_msg=f"{name}, signed={signed}, shape {shape}")


def _three_bit(canonical: Path, kind: str = "weight_q") -> dict[str, np.ndarray]:
    """The stored integers of every 3-bit weight (or, with `kind`, its zero points) of a canonical file, by module."""
    model = ir.load(canonical)
    bits = json.loads(model.metadata_props["qbert.weight_bits"])
    out = {}
    for module, b in bits.items():
        value = model.graph.initializers.get(f"{module}.{kind}")
        if b == 3 and value is not None and value.const_value is not None:
            out[module] = np.asarray(value.const_value.numpy()).astype(np.int32)
    return out


def _evaluate(model: onnx.ModelProto, name: str) -> np.ndarray:
    """`name` computed by onnx.reference from the nodes and initializers it depends on (no graph inputs)."""
    produced_by = {out: node for node in model.graph.node for out in node.output}
    inits = {init.name: init for init in model.graph.initializer}
    needed, todo, used = [], [name], set()
    while todo:
        node = produced_by.get(todo.pop())
        if node is not None and id(node) not in {id(n) for n in needed}:
            needed.append(node)
            todo.extend(i for i in node.input if i)
            used.update(i for i in node.input if i in inits)
    order = [n for n in model.graph.node if any(n is m for m in needed)]
    sub = onnx.helper.make_graph(order, "sub", [], [onnx.helper.make_value_info(name, onnx.TypeProto())],
                                 [inits[i] for i in sorted(used)])
    (value,) = ReferenceEvaluator(onnx.helper.make_model(sub, opset_imports=model.opset_import)).run(None, {})
    return np.asarray(value)


@pytest.fixture
def three_bit(tiny_export: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """The tiny BERT with 3-bit weights: (symmetric, opset) from the parameter (opset 25: uint2 low planes)."""
    symmetric, opset = request.param
    path = requantized(tiny_export / "model.onnx", tmp_path / "model.onnx", 3, symmetric=symmetric)
    if opset != 21:
        model = ir.load(path)
        model.opset_imports[""] = opset
        ir.save(model, path)
    return path


VARIANTS = pytest.mark.parametrize("three_bit", [(False, 21), (True, 21), (False, 25), (True, 25)],
                                   ids=["uint4", "int4", "uint4-opset25", "int4-opset25"], indirect=True)


@VARIANTS
def test_lowered_3bit_weights_are_packed_exactly(three_bit: Path, tmp_path: Path) -> None:
    packed = lower(three_bit, "cpu-w8a8", tmp_path / "packed.onnx", pack_3bit=True)
    plain = lower(three_bit, "cpu-w8a8", tmp_path / "plain.onnx", pack_3bit=False)
    stored = _three_bit(three_bit)
    assert len(stored) == 12, f"expected 12 3-bit Linears in the tiny BERT, found {len(stored)}"
    model = onnx.load(str(packed))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    inits = {init.name: init for init in model.graph.initializer}
    gemms = {n.name: n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"}
    zero_points = _three_bit(three_bit, "weight_zero_point")
    for module, values in stored.items():
        assert f"{module}.weight_q" not in inits, f"{module}: the int4 container is still in the file"
        planes = [inits[f"{module}.weight_q3_{p}"] for p in ("low", "high")]
        assert planes[0].data_type == (onnx.TensorProto.UINT2 if opset >= UINT2_OPSET else onnx.TensorProto.UINT8)
        assert sum(len(p.raw_data) for p in planes) == _sizes(values.size)[1], f"{module}: not 3 bits per value"
        gemm = gemms[f"{module}/MatMulIntegerToFloat"]
        got = _evaluate(model, gemm.input[1])
        assert got.dtype == np.int8, f"{module}: the integer GEMM reads {got.dtype}"
        np.testing.assert_array_equal(got, values, err_msg=f"{module}: unpacked integers differ")
        if zero_points[module].any():
            zero = _evaluate(model, gemm.input[5])
            np.testing.assert_array_equal(zero, zero_points[module], err_msg=f"{module}: zero points differ")
    counts = json.loads({p.key: p.value for p in model.metadata_props}["qbert.lowering"])["passes"]
    assert counts["pack_3bit_weights"] == len(stored), counts
    saved = sum(_sizes(v.size)[0] - _sizes(v.size)[1] for v in stored.values())
    cost = plain.stat().st_size - packed.stat().st_size - saved
    assert -SITE_COST * len(stored) <= cost <= 0, (
        f"file shrank by {plain.stat().st_size - packed.stat().st_size} bytes for {saved} bytes of weights saved")


@VARIANTS
def test_ort_folds_the_unpacking_into_the_integer_kernels(three_bit: Path, tmp_path: Path) -> None:
    packed = lower(three_bit, "cpu-w8a8", tmp_path / "packed.onnx", pack_3bit=True)
    plain = lower(three_bit, "cpu-w8a8", tmp_path / "plain.onnx", pack_3bit=False)
    optimized = tmp_path / "optimized.onnx"
    got = open_session(packed, optimized_model_path=optimized).run(["logits"], text_batch())[0]
    expected = open_session(plain).run(["logits"], text_batch())[0]
    graph = onnx.load(str(optimized)).graph
    ops = Counter(node.op_type for node in graph.node)
    linears = len(_three_bit(three_bit))
    assert sum(ops[op] for op in INTEGER_GEMMS) == ops["MatMulIntegerToFloat"] == linears, ops
    left = [n.name for n in graph.node if n.op_type in UNPACK_OPS or "unpack3" in n.name]
    assert left == [], f"unpacking left for run time: {left}"
    np.testing.assert_array_equal(got, expected, err_msg="packing changed the logits")


def test_packing_skips_other_bit_widths(tiny_export: Path) -> None:
    model = ir.load(tiny_export / "model.onnx")  # 4-bit weights
    assert lowering.lower_model(model, "cpu-w8a8")["pack_3bit_weights"] == 0
    assert not any(name.endswith(("weight_q3_low", "weight_q3_high")) for name in model.graph.initializers)


def test_3bit_weights_outside_4bit_containers_are_left_alone(tiny_export: Path, tmp_path: Path) -> None:
    model = ir.load(requantized(tiny_export / "model.onnx", tmp_path / "model.onnx", 8))  # int8/uint8 containers
    model.metadata_props["qbert.weight_bits"] = json.dumps(dict.fromkeys(_linear_names(model), 3))
    assert lowering.lower_model(model, "cpu-w8a8")["pack_3bit_weights"] == 0


def _linear_names(model: ir.Model) -> list[str]:
    return [m for m in json.loads(model.metadata_props["qbert.weight_bits"]) if ".embeddings." not in f".{m}."]


def test_a_3bit_recipe_with_4bit_integers_is_refused(tiny_export: Path, tmp_path: Path) -> None:
    model = ir.load(requantized(tiny_export / "model.onnx", tmp_path / "model.onnx", 4))
    bits = json.loads(model.metadata_props["qbert.weight_bits"])
    module = "bert.encoder.layer.1.output.dense"
    values = model.graph.initializers[f"{module}.weight_q"].const_value
    assert values is not None and int(values.numpy().astype(np.int32).max()) > 7, "need a value beyond 3 bits"
    model.metadata_props["qbert.weight_bits"] = json.dumps({**bits, module: 3})
    with pytest.raises(LoweringError, match=f"{module}: recipe says 3 bits"):
        lowering.lower_model(model, "cpu-w8a8")



def test_packing_is_for_files_only(tiny_export: Path, tmp_path: Path) -> None:
    """In memory (a session lowering the canonical model) packing would only cost start-up time and RAM."""
    canonical = requantized(tiny_export / "model.onnx", tmp_path / "model.onnx", 3)
    counts = {for_file: lowering.lower_model(ir.load(canonical), "cpu-w8a8", for_file=for_file)
              for for_file in (True, False)}
    assert counts[True]["pack_3bit_weights"] == 12 and "pack_3bit_weights" not in counts[False], counts
    lowered = lower(canonical, "cpu-w8a8", tmp_path / "model.cpu-w8a8.onnx", pack_3bit=True)
    in_memory = open_session(canonical, profile="cpu-w8a8").run(["logits"], text_batch())[0]
    np.testing.assert_array_equal(in_memory, open_session(lowered, profile="cpu-w8a8").run(["logits"], text_batch())[0])


def test_lower_keeps_3bit_weights_in_int4_unless_asked(tiny_export: Path, tmp_path: Path) -> None:
    """By default the file keeps int4 containers, so ORT unpacks nothing at session start; `--pack-3bit` packs."""
    canonical = requantized(tiny_export / "model.onnx", tmp_path / "model.onnx", 3)
    files = {pack: lower(canonical, "cpu-w8a8", tmp_path / f"packed-{pack}.onnx", pack_3bit=pack)
             for pack in (True, False)}
    passes = {pack: json.loads(ir.load(path).metadata_props["qbert.lowering"])["passes"]
              for pack, path in files.items()}
    assert passes[True]["pack_3bit_weights"] == 12 and "pack_3bit_weights" not in passes[False], passes
    default = json.loads(ir.load(lower(canonical, "cpu-w8a8", tmp_path / "default.onnx")).metadata_props[
        "qbert.lowering"])["passes"]
    assert "pack_3bit_weights" not in default, default
    ops = Counter(n.op_type for n in ir.load(files[False]).graph)
    assert ops["BitShift"] == 0, ops
    logits = {pack: open_session(path, profile="cpu-w8a8").run(["logits"], text_batch())[0]
              for pack, path in files.items()}
    np.testing.assert_array_equal(logits[True], logits[False])


def test_export_cli_packs_lowered_3bit_weights_only_when_asked(tmp_path: Path) -> None:
    """`qbert-export --lower cpu-w8a8` writes int4 containers (the memory-lean default); `--pack-3bit` packs."""
    from qbert_deploy.checkpoint import save_checkpoint
    from qbert_deploy.cli.export import main as export_main
    from qbert_deploy.recipe import Recipe, WeightQuant
    from tests.tiny import tiny_checkpoint

    save_checkpoint(tiny_checkpoint(Recipe(default=WeightQuant(bits=3, groups=4))), tmp_path / "model.pt")
    passes = {}
    for flags in ((), ("--pack-3bit",)):
        out = tmp_path / ("packed" if flags else "default")
        assert export_main([str(tmp_path / "model.pt"), "-o", str(out), "--lower", "cpu-w8a8", *flags]) == 0
        lowered = ir.load(out / "model.cpu-w8a8.onnx")
        passes[bool(flags)] = json.loads(lowered.metadata_props["qbert.lowering"])["passes"]
    assert "pack_3bit_weights" not in passes[False] and passes[True]["pack_3bit_weights"] == 12, passes
