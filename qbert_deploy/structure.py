"""Recipe version 2's structure: which attention heads and FFN neurons each encoder layer keeps, and their bits.

A pruned model is stored physically smaller (model.pt holds only the kept rows and columns), so the structure
says what each layer *has*, in stored order:
- `heads`: the original indices of the kept heads, in the order their rows are stored ([] = attention skipped);
- `head_bits`: one weight bit width per kept head, for that head's rows of Q, K and V;
- `intermediate_size`: kept FFN neurons (0 = feed-forward skipped);
- `ffn_bits`: one bit width per block of `ffn_block` consecutive stored neurons, for their rows of
  `intermediate.dense`.
Layers not listed are unpruned and quantized by the recipe's per-module specs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_FFN_BLOCK = 32
SUBGROUP_BITS = range(2, 9)


class StructureError(ValueError):
    """A structure that no model can have."""


def _int_list(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                       for v in value):
        raise StructureError(f"{where} must be a list of integers, got {value!r}")
    return tuple(value)


def _bits_list(value: Any, where: str) -> tuple[int, ...]:
    bits = _int_list(value, where)
    bad = [b for b in bits if b not in SUBGROUP_BITS]
    if bad:
        raise StructureError(f"{where}: bit widths must be in 2..8, got {bad[0]}")
    return bits


@dataclass(frozen=True)
class LayerPlan:
    heads: tuple[int, ...] | None = None
    head_bits: tuple[int, ...] | None = None
    intermediate_size: int | None = None
    ffn_bits: tuple[int, ...] | None = None

    def check(self, where: str, ffn_block: int) -> None:
        if self.heads is not None:
            if any(h < 0 for h in self.heads):
                raise StructureError(f"{where}: head indices must be >= 0, got {list(self.heads)}")
            if len(set(self.heads)) != len(self.heads):
                raise StructureError(f"{where}: head {_first_duplicate(self.heads)} is listed twice")
        if self.head_bits is not None:
            if self.heads is None:
                raise StructureError(f"{where}: 'head_bits' needs 'heads' (which heads the bits belong to)")
            if len(self.head_bits) != len(self.heads):
                raise StructureError(f"{where}: {len(self.head_bits)} head_bits for {len(self.heads)} kept heads")
        if self.intermediate_size is not None and self.intermediate_size < 0:
            raise StructureError(f"{where}: intermediate_size must be >= 0, got {self.intermediate_size}")
        if self.ffn_bits is not None:
            if self.intermediate_size is None:
                raise StructureError(f"{where}: 'ffn_bits' needs 'intermediate_size'")
            if len(self.ffn_bits) * ffn_block != self.intermediate_size:
                raise StructureError(f"{where}: {len(self.ffn_bits)} ffn_bits blocks of {ffn_block} neurons do not "
                                     f"make intermediate_size {self.intermediate_size}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.heads is not None:
            out["heads"] = list(self.heads)
        if self.head_bits is not None:
            out["head_bits"] = list(self.head_bits)
        if self.intermediate_size is not None:
            out["intermediate_size"] = self.intermediate_size
        if self.ffn_bits is not None:
            out["ffn_bits"] = list(self.ffn_bits)
        return out

    @classmethod
    def from_json(cls, data: Any, where: str) -> LayerPlan:
        if not isinstance(data, Mapping):
            raise StructureError(f"{where}: expected an object, got {type(data).__name__}")
        unknown = set(data) - {"heads", "head_bits", "intermediate_size", "ffn_bits"}
        if unknown:
            raise StructureError(f"{where}: unknown keys {sorted(unknown)}")
        size = data.get("intermediate_size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int)):
            raise StructureError(f"{where}: intermediate_size must be an integer, got {size!r}")
        return cls(
            heads=None if data.get("heads") is None else _int_list(data["heads"], f"{where}.heads"),
            head_bits=None if data.get("head_bits") is None else _bits_list(data["head_bits"], f"{where}.head_bits"),
            intermediate_size=size,
            ffn_bits=None if data.get("ffn_bits") is None else _bits_list(data["ffn_bits"], f"{where}.ffn_bits"))


def _first_duplicate(values: tuple[int, ...]) -> int:
    seen: set[int] = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    raise AssertionError("no duplicate")


@dataclass(frozen=True)
class Structure:
    layers: Mapping[int, LayerPlan] = field(default_factory=dict)
    ffn_block: int = DEFAULT_FFN_BLOCK

    def __post_init__(self) -> None:
        if isinstance(self.ffn_block, bool) or not isinstance(self.ffn_block, int) or self.ffn_block < 1:
            raise StructureError(f"ffn_block must be a positive integer, got {self.ffn_block!r}")
        for index, plan in self.layers.items():
            if index < 0:
                raise StructureError(f"structure names layer {index}; layers are numbered from 0")
            plan.check(f"structure layer {index}", self.ffn_block)

    def plan(self, layer: int) -> LayerPlan:
        return self.layers.get(layer, LayerPlan())

    def check_model(self, num_layers: int, num_heads: int, intermediate_size: int) -> None:
        """Against a config: layers and heads that exist, sizes no larger than the model's, something left."""
        for index, plan in sorted(self.layers.items()):
            where = f"structure layer {index}"
            if index >= num_layers:
                raise StructureError(f"{where}: the model has {num_layers} layers (0..{num_layers - 1})")
            missing = [h for h in plan.heads or () if h >= num_heads]
            if missing:
                raise StructureError(f"{where}: names head {missing[0]}, but the layer has {num_heads} heads "
                                     f"(0..{num_heads - 1})")
            if plan.intermediate_size is not None and plan.intermediate_size > intermediate_size:
                raise StructureError(f"{where}: intermediate_size {plan.intermediate_size} is larger than the "
                                     f"model's {intermediate_size}")
        kept_heads = sum(num_heads if self.plan(i).heads is None else len(self.plan(i).heads or ())
                         for i in range(num_layers))
        kept_neurons = sum(intermediate_size if self.plan(i).intermediate_size is None
                           else int(self.plan(i).intermediate_size or 0) for i in range(num_layers))
        if kept_heads == 0 and kept_neurons == 0:
            raise StructureError("the structure prunes every head of every layer and every FFN neuron: "
                                 "nothing of the encoder is left")

    def to_json(self) -> dict[str, Any]:
        return {"ffn_block": self.ffn_block,
                "layers": {str(i): plan.to_json() for i, plan in sorted(self.layers.items())}}

    @classmethod
    def from_json(cls, data: Any) -> Structure:
        if not isinstance(data, Mapping):
            raise StructureError(f"recipe 'structure' must be an object, got {type(data).__name__}")
        unknown = set(data) - {"ffn_block", "layers"}
        if unknown:
            raise StructureError(f"recipe 'structure' has unknown keys {sorted(unknown)}")
        layers = data.get("layers", {})
        if not isinstance(layers, Mapping):
            raise StructureError("structure 'layers' must be an object of layer index -> plan")
        parsed: dict[int, LayerPlan] = {}
        for key, value in layers.items():
            if not isinstance(key, str) or not key.isdigit():
                raise StructureError(f"structure layer key {key!r} is not a layer index")
            parsed[int(key)] = LayerPlan.from_json(value, f"structure layer {key}")
        return cls(layers=parsed, ffn_block=data.get("ffn_block", DEFAULT_FFN_BLOCK))


__all__ = ["DEFAULT_FFN_BLOCK", "LayerPlan", "Structure", "StructureError"]
