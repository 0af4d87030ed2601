"""Issue 12 (a)+(b): recipe version 2, physically pruned models, mixed bits inside one matrix, and their export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from transformers import BertForSequenceClassification

from qbert_deploy.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from qbert_deploy.exporters.onnx_export import export_checkpoint
from qbert_deploy.models.build import build_model, make_checkpoint
from qbert_deploy.models.prune import restructure
from qbert_deploy.models.quantizer import group_qparams, quantize_rows
from qbert_deploy.models.wrap import calibrate, quantize_model
from qbert_deploy.recipe import Recipe, WeightQuant
from qbert_deploy.runtimes.lowering import lower
from qbert_deploy.structure import LayerPlan, Structure
from qbert_deploy.validation.parity import parity_check
from tests.harness import run_cli
from tests.tiny import LABELS, _tokenizer_texts, calibration_batches, text_batch, tiny_config

L0 = "bert.encoder.layer.0"
L1 = "bert.encoder.layer.1"
HEAD_SIZE = 16  # tiny: hidden 64, 4 heads
# Layer 0 keeps heads 3 and 1 (stored in that order, 4 and 8 bits: not yet ordered by width) and 96 FFN neurons in
# blocks of 32 at 2, 8, 4 bits; layer 1 loses every head and keeps 64 neurons.
STRUCTURE = Structure(layers={
    0: LayerPlan(heads=(3, 1), head_bits=(4, 8), intermediate_size=96, ffn_bits=(2, 8, 4)),
    1: LayerPlan(heads=(), intermediate_size=64, ffn_bits=(8, 3)),
}, ffn_block=32)


def pruned_checkpoint(structure: Structure = STRUCTURE, seed: int = 0) -> Checkpoint:
    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_config())
    model.config._attn_implementation = "eager"
    model.eval()
    recipe = Recipe(default=WeightQuant(bits=4, groups=4), structure=structure)
    restructure(model, structure)
    quantize_model(model, recipe)
    calibrate(model, calibration_batches(seed=seed))
    return make_checkpoint(model, recipe, list(LABELS), _tokenizer_texts())


def initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_recipe_v2_round_trips_and_v1_stays_v1() -> None:
    recipe = Recipe(default=WeightQuant(bits=4, groups=4), structure=STRUCTURE)
    assert recipe.version == 2
    assert Recipe.loads(recipe.dumps()) == recipe
    plain = Recipe()
    assert plain.version == 1 and "structure" not in plain.to_json()


def test_pruned_model_is_physically_smaller() -> None:
    checkpoint = pruned_checkpoint()
    state = checkpoint.state_dict
    assert tuple(state[f"{L0}.attention.self.query.weight"].shape) == (2 * HEAD_SIZE, 64)
    assert tuple(state[f"{L0}.attention.output.dense.weight"].shape) == (64, 2 * HEAD_SIZE)
    assert tuple(state[f"{L0}.intermediate.dense.weight"].shape) == (96, 64)
    assert tuple(state[f"{L0}.output.dense.weight"].shape) == (64, 96)
    assert not any(k.startswith(f"{L1}.attention.self.") for k in state)
    assert tuple(state[f"{L1}.attention.output.dense.bias"].shape) == (64,)
    # model.pt alone rebuilds it, and the rebuilt model computes what the saved one did
    rebuilt = build_model(checkpoint)
    batch = {k: torch.from_numpy(v) for k, v in text_batch().items()}
    with torch.no_grad():
        logits = rebuilt(**batch).logits
    assert logits.shape == (len(text_batch()["input_ids"]), 2)
    assert rebuilt.bert.encoder.layer[0].attention.self.num_attention_heads == 2


@pytest.mark.parametrize("opset", [21, 25])
def test_pruned_mixed_export_is_exact_and_matches_pytorch(tmp_path: Path, opset: int) -> None:
    checkpoint = pruned_checkpoint(seed=opset)
    result = export_checkpoint(checkpoint, tmp_path / "out", opset=opset)
    inits = initializers(result.model_path)
    # pruned heads and FFN blocks are absent: no Q/K/V at all in layer 1, smaller matrices in layer 0
    assert not [n for n in inits if n.startswith(f"{L1}.attention.self.")]
    assert inits[f"{L0}.attention.output.dense.weight_q"].shape == (2 * HEAD_SIZE, 64)
    assert inits[f"{L0}.output.dense.weight_q"].shape == (96, 64)
    assert inits[f"{L1}.output.dense.weight_q"].shape == (64, 64)

    # rows of each width stored at their own width, widest first, with exactly the PyTorch quantizer's integers
    model = onnx.load(str(result.model_path))
    types = {t.name: t.data_type for t in model.graph.initializer}
    query = checkpoint.state_dict[f"{L0}.attention.self.query.weight"]
    for bits, rows, dtype in ((8, slice(HEAD_SIZE, 2 * HEAD_SIZE), onnx.TensorProto.UINT8),
                              (4, slice(0, HEAD_SIZE), onnx.TensorProto.UINT4)):
        name = f"{L0}.attention.self.query.w{bits}"
        expected = quantize_rows(query[rows], group_qparams(query[rows], bits, None, False)).numpy()
        np.testing.assert_array_equal(inits[f"{name}.weight_q"].astype(np.int32).T, expected, err_msg=name)
        assert types[f"{name}.weight_q"] == dtype
    ffn = checkpoint.state_dict[f"{L0}.intermediate.dense.weight"]
    two_bit = f"{L0}.intermediate.dense.w2.weight_q"
    expected = quantize_rows(ffn[:32], group_qparams(ffn[:32], 2, None, False)).numpy()
    np.testing.assert_array_equal(inits[two_bit].astype(np.int32).T, expected)
    assert types[two_bit] == (onnx.TensorProto.UINT2 if opset >= 25 else onnx.TensorProto.UINT4)

    # ORT (optimizations off) and onnx.reference match PyTorch fake-quant within 2 output steps
    for line in parity_check(build_model(checkpoint), result.model_path, text_batch()):
        assert line.argmax_agreement == 1.0, line.line()
        assert line.max_error_steps <= 2.0, line.line()


def all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes of the graph and of its If branches."""
    out = []
    for node in graph.node:
        out.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                out += all_nodes(attr.g)
    return out


def test_cpu_w8a8_keeps_every_linear_integer_with_its_own_head_count(tmp_path: Path) -> None:
    checkpoint = pruned_checkpoint()
    export = export_checkpoint(checkpoint, tmp_path / "out", opset=21).model_path
    lowered = lower(export, "cpu-w8a8", tmp_path / "model.cpu-w8a8.onnx")
    graph = onnx.load(str(lowered)).graph
    ops = [n.op_type for n in graph.node]
    assert "MatMul" not in ops, "a Linear left the integer GEMM"
    # layer 0: Q, K and V in two widths each, each width its own GEMM; layer 1 has no attention GEMMs at all
    gemms = [n.name for n in graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert not [g for g in gemms if g.startswith(f"{L1}.attention.self.")], gemms
    assert len([g for g in gemms if g.startswith(f"{L0}.attention.self.")]) == 6, gemms
    heads = {a.i for n in all_nodes(graph) if n.op_type == "MultiHeadAttention" for a in n.attribute
             if a.name == "num_heads"}
    assert heads == {2}
    feed = text_batch()
    canonical = ort.InferenceSession(str(export), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    fast = ort.InferenceSession(str(lowered), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(fast, canonical, atol=0.05)


def test_version_1_model_pt_still_loads(tmp_path: Path, tiny_model_pt: Path) -> None:
    payload = torch.load(tiny_model_pt, weights_only=True)
    assert payload["recipe"]["version"] == 1 and "structure" not in payload["recipe"]
    checkpoint = load_checkpoint(tiny_model_pt)
    assert checkpoint.recipe.version == 1 and checkpoint.recipe.structure is None
    export_checkpoint(checkpoint, tmp_path / "out")


def _with_structure(tmp_path: Path, structure: dict[str, object]) -> Path:
    payload = pruned_checkpoint().to_payload()
    payload["recipe"]["structure"] = structure
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("structure, message", [
    ({"layers": {"0": {"heads": [1, 7]}}}, "structure layer 0: names head 7, but the layer has 4 heads (0..3)"),
    ({"layers": {"5": {"heads": []}}}, "structure layer 5: the model has 2 layers (0..1)"),
    ({"layers": {"0": {"heads": [], "intermediate_size": 0}, "1": {"heads": [], "intermediate_size": 0}}},
     "the structure prunes every head of every layer and every FFN neuron: nothing of the encoder is left"),
])
def test_bad_structures_are_one_line_errors(tmp_path: Path, structure: dict[str, object], message: str) -> None:
    path = _with_structure(tmp_path, structure)
    with pytest.raises(CheckpointError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        build_model(load_checkpoint(path))
    out = tmp_path / "export"
    outcome = run_cli([str(path), "-o", str(out), "--no-parity"])
    assert outcome.code == 2 and outcome.clean_error and message in outcome.stderr, outcome.stderr
    assert not out.exists()


def test_save_load_round_trip(tmp_path: Path) -> None:
    checkpoint = pruned_checkpoint()
    save_checkpoint(checkpoint, tmp_path / "model.pt")
    loaded = load_checkpoint(tmp_path / "model.pt")
    assert loaded.recipe == checkpoint.recipe and loaded.digest() == checkpoint.digest()
