"""Issue 2 acceptance: exported integers, ORT and onnx.reference against PyTorch fake-quant, packed sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qbert_deploy.checkpoint import Checkpoint
from qbert_deploy.exporters.onnx_export import export_checkpoint
from qbert_deploy.models.build import build_model
from qbert_deploy.models.quantizer import group_qparams, quantize_rows
from qbert_deploy.models.wrap import quantizable_linears
from qbert_deploy.recipe import Recipe, WeightQuant
from qbert_deploy.validation.parity import parity_check
from tests.tiny import text_batch, tiny_checkpoint

HEADS = 4
BITS = (2, 3, 4, 5, 6, 7, 8)


def mixed_recipe(groups: int | None, symmetric: bool = False) -> Recipe:
    """Every bit width 2..8 across the tiny model's 12 encoder Linears."""
    names = quantizable_linears(build_model(tiny_checkpoint(), quantized=False))
    overrides = {name: WeightQuant(bits=BITS[i % len(BITS)], groups=groups, symmetric=symmetric and i % 2 == 0)
                 for i, name in enumerate(names)}
    return Recipe(default=WeightQuant(bits=8, groups=groups)).with_overrides(overrides)


def initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("opset", [21, 25])
@pytest.mark.parametrize("groups", [1, HEADS, None], ids=["G1", "Gheads", "Grow"])
def test_export_matches_pytorch(tmp_path: Path, groups: int | None, opset: int) -> None:
    checkpoint = tiny_checkpoint(mixed_recipe(groups, symmetric=groups == HEADS), seed=opset + (groups or 0))
    result = export_checkpoint(checkpoint, tmp_path / "out", opset=opset)
    onnx.checker.check_model(str(result.model_path), full_check=True)
    inits = initializers(result.model_path)
    model = build_model(checkpoint)

    # The integers in the file are the PyTorch quantizer's integers, exactly.
    for name in quantizable_linears(model):
        spec = checkpoint.recipe.for_module(name)
        weight = checkpoint.state_dict[f"{name}.weight"]
        params = group_qparams(weight, spec.bits, spec.groups, spec.symmetric)
        expected = quantize_rows(weight, params).numpy()
        stored = inits[f"{name}.weight_q"].astype(np.int32).T
        np.testing.assert_array_equal(stored, expected, err_msg=f"{name} ({spec.bits} bits)")
        scale, zero_point = params.per_row(weight.shape[0])
        np.testing.assert_array_equal(inits[f"{name}.weight_scale"], scale.numpy(), err_msg=name)
        np.testing.assert_array_equal(inits[f"{name}.weight_zero_point"].astype(np.int32), zero_point.numpy())

    # ORT (optimizations off) and the ONNX reference executor compute what PyTorch fake-quant computes.
    for result_line in parity_check(model, result.model_path, text_batch()):
        assert result_line.argmax_agreement == 1.0, result_line.line()
        assert result_line.max_error_steps <= 2.0, result_line.line()


def weight_bytes(checkpoint: Checkpoint, path: Path) -> int:
    model = onnx.load(str(path))
    names = {f"{n}.weight_q" for n in quantizable_linears(build_model(checkpoint, quantized=False))}
    return sum(len(t.raw_data) for t in model.graph.initializer if t.name in names)


def test_low_bit_files_really_shrink(tmp_path: Path) -> None:
    sizes = {}
    for bits in (2, 4, 8):
        checkpoint = tiny_checkpoint(Recipe(default=WeightQuant(bits=bits, groups=HEADS)))
        result = export_checkpoint(checkpoint, tmp_path / f"w{bits}", opset=25)
        sizes[bits] = (weight_bytes(checkpoint, result.model_path), result.model_path.stat().st_size)
    encoder_elements = 2 * (4 * 64 * 64 + 2 * 64 * 128)
    assert sizes[8][0] == encoder_elements, sizes
    assert sizes[4][0] == encoder_elements // 2, sizes
    assert sizes[2][0] == encoder_elements // 4, sizes
    assert sizes[2][1] < sizes[4][1] < sizes[8][1], sizes


def test_three_bits_use_int4_and_two_bits_need_opset_25(tmp_path: Path) -> None:
    names = ("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.key")
    recipe = Recipe(default=WeightQuant(bits=8, groups=HEADS)).with_overrides(
        {names[0]: WeightQuant(bits=3, groups=HEADS), names[1]: WeightQuant(bits=2, groups=HEADS)})
    checkpoint = tiny_checkpoint(recipe)
    types = {}
    for opset in (21, 25):
        path = export_checkpoint(checkpoint, tmp_path / str(opset), opset=opset).model_path
        types[opset] = {t.name: t.data_type for t in onnx.load(str(path)).graph.initializer}
    uint4, uint2 = onnx.TensorProto.UINT4, onnx.TensorProto.UINT2
    assert types[21][f"{names[0]}.weight_q"] == uint4
    assert types[21][f"{names[1]}.weight_q"] == uint4
    assert types[25][f"{names[1]}.weight_q"] == uint2
    assert types[25][f"{names[1]}.weight_zero_point"] == uint2


def test_export_directory_contents(tiny_export: Path, tiny_ckpt: Checkpoint) -> None:
    names = {p.name for p in tiny_export.iterdir()}
    assert {"model.onnx", "config.json", "qbert_recipe.json", "size_report.json", "tokenizer.json"} <= names, names
    model = onnx.load(str(tiny_export / "model.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert Recipe.loads(meta["qbert.recipe"]) == tiny_ckpt.recipe
    assert meta["qbert.checkpoint_sha256"] == tiny_ckpt.digest()
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    assert all(isinstance(d[0], str) and isinstance(d[1], str) for d in dims), f"axes not dynamic: {dims}"
    node_names = {n.name for n in model.graph.node}
    assert "bert.encoder.layer.1.output.dense/MatMul" in node_names
    assert "bert.encoder.layer.1.output.dense/input_quantize" in node_names
