"""BERT, DistilBERT and RoBERTa through every step: module naming, Hessian, allocation, export, lowering,
layerwise validation and serving, on tiny random models of each family; anything else is refused in one line."""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import numpy_helper

from qbert_deploy.checkpoint import Checkpoint
from qbert_deploy.exporters.onnx_export import export_checkpoint
from qbert_deploy.families import FAMILIES, family, is_encoder_linear, layer_index, short_name
from qbert_deploy.models.build import build_model, estimated_parameters
from qbert_deploy.models.hessian import encoder_layers, sensitivity
from qbert_deploy.models.quantizer import group_qparams, quantize_rows
from qbert_deploy.models.workflow import layer_of, mixed_recipe
from qbert_deploy.models.wrap import embedding_modules, quantizable_linears
from qbert_deploy.recipe import Recipe, WeightQuant
from qbert_deploy.runtimes.lowering import lower
from qbert_deploy.runtimes.serving.model import ServedModel
from qbert_deploy.runtimes.session import open_session
from qbert_deploy.validation.backends import BackendSpec
from qbert_deploy.validation.layerwise import capture_onnx, capture_torch, watched_modules
from qbert_deploy.validation.parity import output_step, parity_check
from qbert_deploy.validation.profiles import CANONICAL
from tests.tiny import FAMILIES as FAMILY_NAMES
from tests.tiny import text_batch, tiny_checkpoint, tiny_model

BITS = (2, 3, 4, 5, 6, 7, 8)
LAYERS, LINEARS = 2, 12


@cache
def _checkpoint(model_type: str) -> Checkpoint:
    return tiny_checkpoint(model_type=model_type)


@cache
def _export(model_type: str, root: Path) -> Path:
    out = root / model_type
    export_checkpoint(_checkpoint(model_type), out, opset=21)
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_module_names_layers_and_embeddings(model_type: str) -> None:
    fam = family(model_type)
    model = tiny_model(model_type)
    linears = quantizable_linears(model)
    expected = [f"{fam.layer_prefix}.{i}.{name}" for i in range(LAYERS) for name in fam.linears]
    assert linears == expected, linears
    assert [name for name, _ in encoder_layers(model)] == [f"{fam.layer_prefix}.{i}" for i in range(LAYERS)]
    assert [layer_of(name) for name in linears] == [i for i in range(LAYERS) for _ in fam.linears]
    assert [n.rpartition(".")[2] for n in embedding_modules(model)] == list(fam.embeddings)
    assert not any(is_encoder_linear(n) for n, _ in model.named_modules() if "classifier" in n or "pooler" in n)
    for name in linears:
        assert isinstance(model.get_submodule(f"{fam.layer_prefix}.{layer_of(name)}.{fam.layer_norm}"),
                          torch.nn.LayerNorm)
    assert estimated_parameters(json.loads(model.config.to_json_string()), 2) == \
        sum(p.numel() for p in model.parameters())


def test_layer_index_and_short_names_cover_each_family() -> None:
    assert layer_index("distilbert.transformer.layer.11.ffn.lin1") == 11
    assert layer_index("roberta.embeddings.word_embeddings") is None
    assert layer_index("bert.encoder.layers_norm.3") is None
    assert short_name("bert.encoder.layer.3.attention.self.query") == "L3.query"
    assert short_name("distilbert.transformer.layer.0.attention.q_lin") == "L0.att.q_lin"


def test_a_fourth_family_is_one_table_entry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The docstring's example entry, added to the table and nothing else, takes ELECTRA through the export."""
    import qbert_deploy.families as families

    match = re.search(r'"electra": (Family\(.*?\)),\n', families.__doc__ or "", re.S)
    assert match, "the module docstring shows how to add a family"
    entry = eval(match.group(1), vars(families))  # our own docstring
    monkeypatch.setitem(FAMILIES, "electra", entry)
    checkpoint = tiny_checkpoint(model_type="electra")
    names = quantizable_linears(build_model(checkpoint))
    assert len(names) == LINEARS and all(n.startswith("electra.encoder.layer.") for n in names), names
    result = export_checkpoint(checkpoint, tmp_path / "out")
    for line in parity_check(build_model(checkpoint), result.model_path, text_batch(model_type="electra")):
        assert line.argmax_agreement == 1.0 and line.max_error_steps <= 2.0, line.line()
    gemms = [n for n in ir.load(lower(result.model_path, "cpu-w8a8", tmp_path / "w8a8.onnx")).graph
             if n.op_type == "MatMulIntegerToFloat"]
    assert len(gemms) == LINEARS


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_hessian_and_allocation_per_layer(model_type: str) -> None:
    model = tiny_model(model_type, hidden=16, heads=2, intermediate=16)
    batch = {k: torch.from_numpy(v) for k, v in text_batch(model_type=model_type).items()}
    sens = sensitivity(model, [{**batch, "labels": torch.tensor([0, 1] * 4)}], iters=3)
    assert sens.layers == [f"{family(model_type).layer_prefix}.{i}" for i in range(LAYERS)]
    assert all(np.isfinite(sens.omega)) and all(v > 0 for v in sens.omega), sens.omega
    recipe = mixed_recipe(model, Recipe(default=WeightQuant(bits=8, groups=2)), sens, (2, 4), average_bits=3.0)
    bits = [recipe.for_module(f"{layer}.{family(model_type).linears[-1]}").bits for layer in sens.layers]
    assert sorted(bits) == [2, 4], bits
    assert len(recipe.overrides) == LINEARS


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_export_integers_and_parity_for_every_bit_width_at_128_groups(model_type: str, tmp_path: Path) -> None:
    # hidden 128, FFN 256: 128 groups divide every encoder Linear's rows
    names = quantizable_linears(tiny_model(model_type, hidden=128, intermediate=256))
    overrides = {name: WeightQuant(bits=BITS[i % len(BITS)], groups=128, symmetric=i % 3 == 0)
                 for i, name in enumerate(names)}
    recipe = Recipe(default=WeightQuant(bits=8, groups=128)).with_overrides(overrides)
    checkpoint = tiny_checkpoint(recipe, model_type=model_type, hidden=128, intermediate=256)
    result = export_checkpoint(checkpoint, tmp_path / "out", opset=25)
    graph = onnx.load(str(result.model_path))
    assert [i.name for i in graph.graph.input] == list(family(model_type).inputs)
    inits = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    for name in names:
        spec = checkpoint.recipe.for_module(name)
        weight = checkpoint.state_dict[f"{name}.weight"]
        params = group_qparams(weight, spec.bits, spec.groups, spec.symmetric)
        stored = inits[f"{name}.weight_q"].astype(np.int32).T
        np.testing.assert_array_equal(stored, quantize_rows(weight, params).numpy(), err_msg=name)
        scale, _ = params.per_row(weight.shape[0])
        np.testing.assert_array_equal(inits[f"{name}.weight_scale"], scale.numpy(), err_msg=name)
    assert {spec.bits for spec in recipe.overrides.values()} == set(BITS)
    for line in parity_check(build_model(checkpoint), result.model_path, text_batch(model_type=model_type)):
        assert line.argmax_agreement == 1.0 and line.max_error_steps <= 2.0, f"{model_type}: {line.line()}"


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_cpu_w8a8_has_every_linear_in_an_integer_gemm_and_fused_attention(model_type: str, exports: Path,
                                                                          tmp_path: Path) -> None:
    canonical = _export(model_type, exports) / "model.onnx"
    lowered = lower(canonical, "cpu-w8a8", tmp_path / "lowered.onnx")
    model = ir.load(lowered)
    gemms = [n.name or "" for n in model.graph if n.op_type == "MatMulIntegerToFloat"]
    expected = {f"{name}" for name in quantizable_linears(build_model(_checkpoint(model_type)))}
    assert {g.split("/")[0] for g in gemms} == expected and len(gemms) == LINEARS, gemms
    ops = Counter(n.op_type for n in model.graph)
    # One masked MultiHeadAttention per layer, no flash-kernel If: answers must not depend on the batch's padding.
    assert ops["MatMul"] == 0 and ops["Softmax"] == 0 and ops["If"] == 0 and ops["MultiHeadAttention"] == LAYERS, ops
    optimized = tmp_path / "optimized.onnx"
    for feed in (text_batch(model_type=model_type), text_batch(["one unpadded sentence"], model_type=model_type)):
        reference = np.asarray(open_session(canonical, optimize=False).run(["logits"], feed)[0])
        got = np.asarray(open_session(lowered, optimized_model_path=optimized).run(["logits"], feed)[0])
        steps = float(np.abs(got - reference).max()) / output_step(reference)
        assert steps <= 2.0, f"{model_type}: cpu-w8a8 logits off by {steps:.2f} output steps"
    ran = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    assert ran["MatMulIntegerToFloat"] == LINEARS, ran


@pytest.mark.parametrize("profile", ["weight-only", "cuda", "cuda-fp16", "tensorrt"])
@pytest.mark.parametrize("model_type", ["distilbert", "roberta"])
def test_every_profile_lowers_each_family(model_type: str, profile: str, exports: Path, tmp_path: Path) -> None:
    canonical = _export(model_type, exports) / "model.onnx"
    lowered = ir.load(lower(canonical, profile, tmp_path / "lowered.onnx"))
    info = json.loads(lowered.metadata_props["qbert.lowering"])
    assert info["linears"] == LINEARS, info
    if profile == "cuda":
        assert info["passes"]["fuse_attention"] == LAYERS, info
    if not profile.startswith("cuda"):  # the CUDA files need the CUDA provider to run
        feed = text_batch(model_type=model_type)
        reference = np.asarray(open_session(canonical, optimize=False).run(["logits"], feed)[0])
        got = np.asarray(open_session(tmp_path / "lowered.onnx").run(["logits"], feed)[0])
        assert got.shape == reference.shape and np.isfinite(got).all()


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_layerwise_exposes_every_watched_module(model_type: str, exports: Path) -> None:
    model = build_model(_checkpoint(model_type))
    names = watched_modules(model)
    assert len(names) == LINEARS + LAYERS
    batch = text_batch(model_type=model_type)
    reference = capture_torch(model, batch, names)
    exposed = capture_onnx(_export(model_type, exports) / "model.onnx",
                           BackendSpec("spec", "onnxruntime", profile=CANONICAL, optimize=False), batch,
                           list(reference), set(quantizable_linears(model)), threads=1)
    assert set(exposed) == set(names), sorted(set(names) - set(exposed))
    for name in names:
        assert exposed[name].shape == reference[name].shape, name
        step = output_step(reference[name])
        assert float(np.median(np.abs(exposed[name] - reference[name]))) <= 0.1 * step, name


@pytest.mark.parametrize("model_type", ["distilbert", "roberta"])
def test_served_model_feeds_only_the_graphs_inputs(model_type: str, exports: Path) -> None:
    served = ServedModel(_export(model_type, exports))
    assert served.input_names == ["input_ids", "attention_mask"]
    encoded = served.encode(["a gorgeous, moving film", "dull"])
    assert set(encoded.feeds) == {"input_ids", "attention_mask"}
    logits = served.run(encoded.feeds)
    reference = np.asarray(open_session(_export(model_type, exports) / "model.onnx").run(
        ["logits"], text_batch(["a gorgeous, moving film", "dull"], model_type=model_type))[0])
    np.testing.assert_allclose(logits, reference, atol=1e-5)
    # RoBERTa's positions start after its padding index (0 with this tokenizer): 130 positions hold 129 tokens
    assert served.max_length == (129 if model_type == "roberta" else 128), served.max_length


def test_unsupported_model_type_is_refused_naming_the_supported_ones() -> None:
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported; supported: bert, roberta, "
                                         r"distilbert"):
        family("gpt2")
    assert set(FAMILIES) == {"bert", "distilbert", "roberta"}
