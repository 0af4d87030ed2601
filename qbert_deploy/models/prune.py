"""Physical pruning and per-subgroup bits: a BERT rebuilt with only the heads and FFN neurons a structure keeps.

Pruned heads and neurons are removed (smaller Linears), never masked. A layer with no heads left skips attention
(its output is LayerNorm(x + the output projection's bias), what attention with zero heads computes); a layer with
no FFN neurons left skips the feed-forward the same way. Rows of Q, K, V (per head) and of `intermediate.dense`
(per FFN block) may each have their own bit width: `MixedQuantLinear` fake-quantizes every row at its width.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from qbert_deploy.models.modules import QuantLinear
from qbert_deploy.models.quantizer import fake_quant_weight
from qbert_deploy.recipe import WeightQuant
from qbert_deploy.structure import Structure

_LAYER = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)$")
HEAD_ROWS = ("attention.self.query", "attention.self.key", "attention.self.value")
FFN_ROWS = "intermediate.dense"


class BiasOnly(nn.Module):
    """What is left of a Linear whose inputs were all pruned: its bias."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())


class BiasResidualNorm(nn.Module):
    """BertSelfOutput/BertOutput with no inputs left: LayerNorm(residual + bias)."""

    def __init__(self, source: Any) -> None:
        super().__init__()
        dense = source.dense
        assert isinstance(dense, (nn.Linear, QuantLinear, BiasOnly)) and dense.bias is not None
        self.dense = BiasOnly(dense.bias)
        self.LayerNorm = source.LayerNorm

    def forward(self, hidden_states: torch.Tensor | None, input_tensor: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.LayerNorm(input_tensor + self.dense.bias)
        return out


class SkippedAttention(nn.Module):
    """A BertAttention with every head pruned."""

    def __init__(self, attention: Any) -> None:
        super().__init__()
        self.output = BiasResidualNorm(attention.output)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return self.output(None, hidden_states), None


class SkippedIntermediate(nn.Module):
    """A BertIntermediate with every neuron pruned (its output is never read)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states


def _select(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A Linear with only the output rows (dim 0) or input columns (dim 1) in `index`, in that order."""
    index = index.to(linear.weight.device)
    weight = linear.weight.detach().index_select(dim, index).clone()
    out_features, in_features = weight.shape
    bias = linear.bias is not None
    new = nn.Linear(in_features, out_features, bias=bias, device=weight.device, dtype=weight.dtype)
    new.weight = nn.Parameter(weight)
    if linear.bias is not None:
        kept = linear.bias.detach().index_select(0, index) if dim == 0 else linear.bias.detach()
        new.bias = nn.Parameter(kept.clone())
    return new


def encoder_layers(model: nn.Module) -> dict[int, tuple[str, Any]]:
    """Encoder layer index -> (module name, module); typed Any: HF layers' submodules are reached by attribute."""
    found: dict[int, tuple[str, Any]] = {}
    for name, module in model.named_modules():
        match = _LAYER.search(name)
        if match:
            found[int(match.group(1))] = (name, module)
    return found


def head_index(heads: Sequence[int], head_size: int) -> torch.Tensor:
    """Rows of Q/K/V (or columns of the attention output) that belong to `heads`, in that order."""
    if not heads:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(h * head_size, (h + 1) * head_size) for h in heads])


def restructure(model: nn.Module, structure: Structure,
                neurons: Mapping[int, torch.Tensor] | None = None) -> None:
    """Prune `model` (an unpruned HF BERT) in place to what `structure` keeps.

    `neurons[layer]` picks which FFN neurons (and in which order) are kept; by default the first
    `intermediate_size` (the right shapes for loading a pruned state dict).
    """
    for index, (_, layer) in encoder_layers(model).items():
        plan = structure.plan(index)
        if plan.heads is not None:
            attention = layer.attention
            if not plan.heads:
                layer.attention = SkippedAttention(attention)
            else:
                self_attention = attention.self
                rows = head_index(plan.heads, self_attention.attention_head_size)
                for name in ("query", "key", "value"):
                    setattr(self_attention, name, _select(getattr(self_attention, name), rows, 0))
                attention.output.dense = _select(attention.output.dense, rows, 1)
                self_attention.num_attention_heads = len(plan.heads)
                self_attention.all_head_size = len(plan.heads) * self_attention.attention_head_size
        if plan.intermediate_size is not None:
            if plan.intermediate_size == 0:
                layer.output = BiasResidualNorm(layer.output)
                layer.intermediate = SkippedIntermediate()
            else:
                kept = neurons[index] if neurons and index in neurons else torch.arange(plan.intermediate_size)
                layer.intermediate.dense = _select(layer.intermediate.dense, kept, 0)
                layer.output.dense = _select(layer.output.dense, kept, 1)


def check_structure(structure: Structure, config: Mapping[str, Any]) -> None:
    structure.check_model(int(config["num_hidden_layers"]), int(config["num_attention_heads"]),
                          int(config["intermediate_size"]))


def subgroup_row_bits(model: nn.Module, structure: Structure) -> dict[str, tuple[int, ...]]:
    """Module name -> bit width of each output row, for the Linears whose subgroups carry their own bits."""
    out: dict[str, tuple[int, ...]] = {}
    for index, (prefix, layer) in encoder_layers(model).items():
        plan = structure.plan(index)
        if plan.head_bits and not isinstance(layer.attention, SkippedAttention):
            size = layer.attention.self.attention_head_size
            rows = tuple(b for b in plan.head_bits for _ in range(size))
            out.update({f"{prefix}.{name}": rows for name in HEAD_ROWS})
        if plan.ffn_bits:
            out[f"{prefix}.{FFN_ROWS}"] = tuple(b for b in plan.ffn_bits for _ in range(structure.ffn_block))
    return out


def mixed_fake_quant(weight: torch.Tensor, row_bits: Sequence[int], symmetric: bool) -> torch.Tensor:
    """Per-row fake quantization, each row at its own width (the same function as uniform rows, per width)."""
    bits = torch.tensor(row_bits)
    out = torch.zeros_like(weight)
    for width in sorted(set(row_bits)):
        rows = torch.nonzero(bits == width).flatten().to(weight.device)
        out = out.index_copy(0, rows, fake_quant_weight(weight.index_select(0, rows), width, None, symmetric))
    return out


class MixedQuantLinear(QuantLinear):
    """A QuantLinear whose output rows have their own bit widths (one scale and zero point per row)."""

    def __init__(self, linear: nn.Linear, spec: WeightQuant, activation_bits: int | None,
                 row_bits: Sequence[int]) -> None:
        super().__init__(linear, spec, activation_bits)
        if len(row_bits) != self.out_features:
            raise ValueError(f"{len(row_bits)} row bit widths for a Linear with {self.out_features} rows")
        self.row_bits = tuple(int(b) for b in row_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        weight = mixed_fake_quant(self.weight, self.row_bits, self.spec.symmetric)
        return nn.functional.linear(x, weight, self.bias)

    def permute_rows(self, order: torch.Tensor) -> None:
        self.weight = nn.Parameter(self.weight.detach().index_select(0, order).clone())
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias.detach().index_select(0, order).clone())
        self.row_bits = tuple(self.row_bits[i] for i in order.tolist())


def _permute_columns(module: nn.Module, order: torch.Tensor) -> None:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    module.weight = nn.Parameter(weight.detach().index_select(1, order).clone())


def _width_order(bits: Sequence[int]) -> torch.Tensor | None:
    """A stable order that makes equal widths contiguous (widest first), or None when they already are."""
    order = sorted(range(len(bits)), key=lambda i: -bits[i])
    return None if order == list(range(len(bits))) else torch.tensor(order)


def order_by_bits(model: nn.Module) -> int:
    """Permute heads and FFN neurons so that rows of one width are contiguous in each mixed matrix.

    The permutation is folded into the neighbours (Q, K, V rows with the attention output's columns; FFN rows with
    the FFN output's columns), so the function is unchanged and the export needs no runtime Gather. Returns the
    number of layers permuted.
    """
    done = 0
    for _, layer in encoder_layers(model).values():
        attention = layer.attention
        if not isinstance(attention, SkippedAttention) and isinstance(attention.self.query, MixedQuantLinear):
            size = attention.self.attention_head_size
            heads = _width_order(attention.self.query.row_bits[::size])
            if heads is not None:
                rows = head_index(heads.tolist(), size)
                for name in ("query", "key", "value"):
                    getattr(attention.self, name).permute_rows(rows)
                _permute_columns(attention.output.dense, rows)
                done += 1
        dense = getattr(layer.intermediate, "dense", None)
        if isinstance(dense, MixedQuantLinear):
            neurons = _width_order(dense.row_bits)
            if neurons is not None:
                dense.permute_rows(neurons)
                _permute_columns(layer.output.dense, neurons)
                done += 1
    return done
