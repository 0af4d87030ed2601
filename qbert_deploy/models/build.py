"""Between model.pt and a live PyTorch model: build, validate shapes against the config, and save back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from qbert_deploy.checkpoint import Checkpoint, CheckpointError, Fp32Reference
from qbert_deploy.families import Family, UnsupportedModelError, family_of
from qbert_deploy.models.hf_compat import ATTENTION
from qbert_deploy.models.prune import check_structure, restructure, subgroup_row_bits
from qbert_deploy.models.quantizer import resolve_groups
from qbert_deploy.models.wrap import (
    activation_ranges,
    embedding_modules,
    load_activation_ranges,
    quantizable_linears,
    quantize_model,
)
from qbert_deploy.recipe import Recipe, RecipeError
from qbert_deploy.structure import StructureError
from qbert_deploy.tasks import DEFAULT_TASK, FEATURE, task_kind

MAX_PARAMETERS = 2_000_000_000
# Per-key ceilings, generous for any BERT (BERT-large: 1024 hidden, 24 layers, 4096 intermediate, 30522 vocab):
# they bound what a crafted config can make us build before the parameter total is even computed. Keys are
# BertConfig's; other families' own names for them come from `qbert_deploy.families`.
CONFIG_LIMITS = {"hidden_size": 65_536, "num_hidden_layers": 1_024, "num_attention_heads": 1_024,
                 "intermediate_size": 262_144, "vocab_size": 4_000_000, "max_position_embeddings": 1_048_576,
                 "type_vocab_size": 1_024}


def _sizes(config: dict[str, Any], family: Family) -> dict[str, Any]:
    """The config's sizes under BertConfig's key names (type_vocab_size 0 for a family without token types)."""
    sizes = {key: family.config_value(config, key) for key in CONFIG_LIMITS}
    if "token_type_embeddings" not in family.embeddings:
        sizes["type_vocab_size"] = 0
    return sizes


def estimated_parameters(config: dict[str, Any], num_labels: int) -> int:
    """Parameters of a sequence classifier from the config alone, to refuse before building anything (every
    family's layer and head have the same shapes: four hidden x hidden Linears, the FFN, two LayerNorms; a
    hidden x hidden pre-classifier and the classifier)."""
    sizes = _sizes(config, family_of(config))
    h, i = sizes["hidden_size"], sizes["intermediate_size"]
    embeddings = (sizes["vocab_size"] + sizes["max_position_embeddings"] + sizes["type_vocab_size"]) * h + 2 * h
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
    head = (h * h + h) + (h * num_labels + num_labels)
    return int(embeddings + sizes["num_hidden_layers"] * layer + head)


def bert_config(config: dict[str, Any], num_labels: int = 2) -> PretrainedConfig:
    """The Hugging Face config of any supported family (the name predates DistilBERT and RoBERTa)."""
    try:
        family = family_of(config)
    except UnsupportedModelError as err:
        raise CheckpointError(f"config {err}") from None
    sizes = _sizes(config, family)
    for key, limit in CONFIG_LIMITS.items():
        value = sizes[key]
        if key == "type_vocab_size" and value == 0:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
            raise CheckpointError(f"config '{family.config_keys.get(key, key)}' must be an integer in "
                                  f"1..{limit:,}, got {value!r}")
    if sizes["hidden_size"] % sizes["num_attention_heads"]:
        keys = [family.config_keys.get(k, k) for k in ("hidden_size", "num_attention_heads")]
        raise CheckpointError(f"config {keys[0]} {sizes['hidden_size']} is not a multiple of "
                              f"{keys[1]} {sizes['num_attention_heads']}")
    if family.max_tokens(config) < 2:
        raise CheckpointError(f"config max_position_embeddings {sizes['max_position_embeddings']} leaves no room "
                              "for a sequence")
    params = estimated_parameters(config, num_labels)
    if params > MAX_PARAMETERS:
        raise CheckpointError(f"config describes {params:,} parameters, more than the {MAX_PARAMETERS:,} "
                              "this tool accepts")
    try:
        config_class = type(AutoConfig.for_model(family.model_type))
        built: PretrainedConfig = config_class.from_dict(config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"config is not a valid {family.model_type} config: {err}") from None
    return built


def _float_model(config: PretrainedConfig, num_labels: int, task: str = DEFAULT_TASK) -> nn.Module:
    import transformers

    if task == FEATURE:  # encoder + pooling, no head
        from qbert_deploy.models.embedding import EmbeddingModel

        return EmbeddingModel.from_config(config)
    config.num_labels = num_labels
    # Eager attention: plain ops, a graph every exporter and ORT fusion understands.
    model: nn.Module = getattr(transformers, task_kind(task).auto_class).from_config(
        config, attn_implementation=ATTENTION)
    return model


def _rows(model: nn.Module, name: str) -> int:
    weight = model.get_submodule(name).weight
    assert isinstance(weight, torch.Tensor)
    return int(weight.shape[0])


def check_recipe_fits(recipe: Recipe, model: nn.Module) -> None:
    """Every module's group count must divide its output rows; names must exist."""
    linears = quantizable_linears(model)
    try:
        recipe.check_modules(linears)
    except RecipeError as err:
        raise CheckpointError(str(err)) from None
    mixed = subgroup_row_bits(model, recipe.structure) if recipe.structure is not None else {}
    for name in linears:
        rows = _rows(model, name)
        if name in mixed:
            if len(mixed[name]) != rows:
                raise CheckpointError(f"layer {name}: the structure gives {len(mixed[name])} row bit widths for "
                                      f"{rows} rows")
            continue  # one group per row, each at its subgroup's width
        try:
            resolve_groups(rows, recipe.for_module(name).groups)
        except ValueError as err:
            raise CheckpointError(f"layer {name}: {err}") from None
    if recipe.embedding is not None:
        for name in embedding_modules(model):
            rows = _rows(model, name)
            try:
                resolve_groups(rows, recipe.embedding.groups)
            except ValueError as err:
                raise CheckpointError(f"embedding {name}: {err}") from None


def _restructure(model: nn.Module, checkpoint: Checkpoint) -> None:
    """Prune a freshly built model to the recipe's structure (heads, FFN neurons), so pruned weights load."""
    structure = checkpoint.recipe.structure
    if structure is None:
        return
    try:
        check_structure(structure, checkpoint.config)
    except StructureError as err:
        raise CheckpointError(str(err)) from None
    restructure(model, structure)


def build_model(checkpoint: Checkpoint, quantized: bool = True) -> nn.Module:
    """The fake-quant model of a checkpoint (or its float model), in eval mode on the CPU."""
    config = bert_config(checkpoint.config, len(checkpoint.labels))
    with torch.device("meta"):
        skeleton = _float_model(config, len(checkpoint.labels), checkpoint.task)
    _restructure(skeleton, checkpoint)
    params = sum(p.numel() for p in skeleton.parameters())
    if params > MAX_PARAMETERS:
        raise CheckpointError(f"config describes {params:,} parameters, more than this tool accepts")
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in checkpoint.state_dict.items()}
    missing, unknown = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or unknown:
        raise CheckpointError(f"weights do not match the config: missing {missing[:3]}, unexpected {unknown[:3]}")
    skeleton_state = skeleton.state_dict()
    for name, shape in expected.items():
        if got[name] != shape:
            raise CheckpointError(f"weight {name} has shape {list(got[name])}, the config says {list(shape)}")
        if skeleton_state[name].is_floating_point() != checkpoint.state_dict[name].is_floating_point():
            raise CheckpointError(f"weight {name} has dtype {checkpoint.state_dict[name].dtype}, "
                                  f"the model needs {skeleton_state[name].dtype}")
    check_recipe_fits(checkpoint.recipe, skeleton)
    model = _float_model(config, len(checkpoint.labels), checkpoint.task)
    _restructure(model, checkpoint)
    model.load_state_dict(checkpoint.state_dict, strict=False)
    if quantized:
        quantize_model(model, checkpoint.recipe)
        if checkpoint.recipe.activation_bits is not None:
            try:
                load_activation_ranges(model, checkpoint.activation_ranges)
            except ValueError as err:
                raise CheckpointError(str(err)) from None
    return model.eval()


def float_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The Hugging Face weights of a (possibly wrapped) model, without quantizer state."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".input_quant." not in k}


def tokenizer_files(tokenizer: PreTrainedTokenizerBase, workdir: Path) -> dict[str, str]:
    """The tokenizer's files as text, to embed in model.pt."""
    tokenizer.save_pretrained(workdir)
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(workdir.iterdir())
            if p.is_file() and p.suffix in (".json", ".txt")}


def make_checkpoint(model: nn.Module, recipe: Recipe, labels: list[str], tokenizer_texts: dict[str, str],
                    metrics: dict[str, float] | None = None, task: str = DEFAULT_TASK, max_length: int | None = None,
                    fp32_reference: Fp32Reference | None = None, text_pairs: bool | None = None) -> Checkpoint:
    """model.pt's contents for a quantized (calibrated) model; `max_length` is the sequence length it was trained
    and calibrated at, `fp32_reference` the fine-tuned fp32 model it was quantized from (both for qbert-validate),
    `text_pairs` whether a sequence classifier reads sentence pairs (for qbert-serve)."""
    config = json.loads(model.config.to_json_string(use_diff=False))  # type: ignore[operator,union-attr]
    return Checkpoint(config=config, state_dict=float_state_dict(model), recipe=recipe,
                      activation_ranges=activation_ranges(model) if recipe.activation_bits else {},
                      labels=labels, tokenizer_files=tokenizer_texts, metrics=dict(metrics or {}), task=task,
                      max_length=max_length, fp32_reference=fp32_reference, text_pairs=text_pairs)
