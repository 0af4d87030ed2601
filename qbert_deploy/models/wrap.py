"""Swap a Hugging Face encoder's Linears and embeddings for quantized modules, as a recipe says (any family in
`qbert_deploy.families`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from qbert_deploy.families import FAMILIES, SUPPORTED, is_encoder_linear
from qbert_deploy.models.modules import ActQuant, QuantEmbedding, QuantLinear
from qbert_deploy.models.prune import MixedQuantLinear, subgroup_row_bits
from qbert_deploy.recipe import Recipe

# Embedding tables of every family, by their last name; encoder Linears are the families' own (Q-BERT quantizes
# those; the pooler and the task head stay float).
EMBEDDINGS = tuple(dict.fromkeys(name for f in FAMILIES.values() for name in f.embeddings))


def quantizable_linears(model: nn.Module) -> list[str]:
    """Names of the encoder Linears that a recipe may quantize, in module order."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, QuantLinear)) and is_encoder_linear(name):
            names.append(name)
    return names


def embedding_modules(model: nn.Module) -> list[str]:
    """The embedding tables in the families' order (word, position, token type), whatever order the model's
    implementation defines them in (transformers 5's RoBERTa defines token types before positions)."""
    found = [name for name, module in model.named_modules()
             if isinstance(module, (nn.Embedding, QuantEmbedding)) and name.rpartition(".")[2] in EMBEDDINGS]
    return sorted(found, key=lambda name: EMBEDDINGS.index(name.rpartition(".")[2]))


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def quantize_model(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Replace modules in place with their quantized versions; the float master weights are shared, not copied."""
    linears = quantizable_linears(model)
    if not linears:
        raise ValueError(f"the model has no encoder Linears to quantize (supported families: {', '.join(SUPPORTED)})")
    recipe.check_modules(linears)
    row_bits = subgroup_row_bits(model, recipe.structure) if recipe.structure is not None else {}
    for name in linears:
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear):
            spec = recipe.for_module(name)
            _set_submodule(model, name, MixedQuantLinear(module, spec, recipe.activation_bits, row_bits[name])
                           if name in row_bits else QuantLinear(module, spec, recipe.activation_bits))
    if recipe.embedding is not None:
        for name in embedding_modules(model):
            module = model.get_submodule(name)
            if isinstance(module, nn.Embedding):
                _set_submodule(model, name, QuantEmbedding(module, recipe.embedding))
    return model


def act_quantizers(model: nn.Module) -> Iterator[tuple[str, ActQuant]]:
    for name, module in model.named_modules():
        if isinstance(module, ActQuant):
            yield name, module


def activation_ranges(model: nn.Module) -> dict[str, list[float]]:
    """Observed [min, max] of every activation quantizer, by the name of the module it belongs to."""
    return {name.removesuffix(".input_quant"): [float(q.range[0]), float(q.range[1])]
            for name, q in act_quantizers(model) if bool(q.initialized)}


def load_activation_ranges(model: nn.Module, ranges: dict[str, list[float]]) -> None:
    quantizers = dict(act_quantizers(model))
    expected = {name.removesuffix(".input_quant") for name in quantizers}
    missing, unknown = sorted(expected - set(ranges)), sorted(set(ranges) - expected)
    if missing or unknown:
        raise ValueError(f"activation ranges do not match the model: missing {missing[:3]}, unknown {unknown[:3]}")
    for name, (lo, hi) in ranges.items():
        quantizer = quantizers[f"{name}.input_quant"]
        assert isinstance(quantizer, ActQuant)
        quantizer.range.copy_(torch.tensor([lo, hi]))
        quantizer.initialized.fill_(True)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> None:
    """Observe activation ranges (EMA) over `batches` without changing weights."""
    quantizers = [q for _, q in act_quantizers(model)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for q in quantizers:
        q.calibrating = True
    try:
        for batch in batches:
            model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        for q in quantizers:
            q.calibrating = False
        model.train(was_training)
