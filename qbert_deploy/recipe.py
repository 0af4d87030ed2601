"""The quantization recipe: a typed, versioned, validated description of what gets quantized and how."""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from qbert_deploy.structure import Structure, StructureError

# Version 2 adds `structure` (pruned heads/neurons and per-subgroup bits); a recipe without one is still written
# as version 1, so earlier files keep their bytes and digests.
RECIPE_VERSION = 2
READABLE_VERSIONS = (1, 2)
SUPPORTED_BITS = range(2, 9)


class RecipeError(ValueError):
    """A recipe that cannot describe a valid quantized model."""


@dataclass(frozen=True)
class WeightQuant:
    """How one weight matrix is quantized. `groups=None` means one group per output row."""

    bits: int = 8
    groups: int | None = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in SUPPORTED_BITS:
            raise RecipeError(f"weight bits must be an integer in 2..8, got {self.bits!r}")
        if self.groups is not None and (isinstance(self.groups, bool) or not isinstance(self.groups, int)
                                        or self.groups < 1):
            raise RecipeError(f"groups must be a positive integer or 'row', got {self.groups!r}")
        if not isinstance(self.symmetric, bool):
            raise RecipeError(f"symmetric must be true or false, got {self.symmetric!r}")

    def to_json(self) -> dict[str, Any]:
        return {"bits": self.bits, "groups": "row" if self.groups is None else self.groups,
                "symmetric": self.symmetric}

    @classmethod
    def from_json(cls, data: Any, where: str) -> WeightQuant:
        if not isinstance(data, Mapping):
            raise RecipeError(f"{where}: expected an object, got {type(data).__name__}")
        unknown = set(data) - {"bits", "groups", "symmetric"}
        if unknown:
            raise RecipeError(f"{where}: unknown keys {sorted(unknown)}")
        groups = data.get("groups", 128)
        try:
            return cls(bits=data.get("bits", 8), groups=None if groups == "row" else groups,
                       symmetric=data.get("symmetric", False))
        except RecipeError as err:
            raise RecipeError(f"{where}: {err}") from None


@dataclass(frozen=True)
class Recipe:
    """Per-module weight quantization (a default plus overrides by module name), embeddings and activations.

    `activation_bits=None` leaves activations in float (weight-only quantization).
    """

    default: WeightQuant = field(default_factory=WeightQuant)
    overrides: Mapping[str, WeightQuant] = field(default_factory=dict)
    embedding: WeightQuant | None = field(default_factory=lambda: WeightQuant(bits=8, groups=None))
    activation_bits: int | None = 8
    method: str = "qbert"
    version: int | None = None  # None: the lowest version that can hold this recipe
    structure: Structure | None = None

    def __post_init__(self) -> None:
        if self.version is None:
            object.__setattr__(self, "version", 1 if self.structure is None else 2)
        if self.version not in READABLE_VERSIONS:
            raise RecipeError(f"recipe version {self.version} is not supported (this build reads "
                              f"{', '.join(map(str, READABLE_VERSIONS))})")
        if self.structure is not None and self.version == 1:
            raise RecipeError("a recipe with a 'structure' (pruning, per-subgroup bits) must be version 2")
        if self.activation_bits is not None and self.activation_bits != 8:
            raise RecipeError(f"activation bits must be 8 or null (float), got {self.activation_bits!r}")

    def for_module(self, name: str) -> WeightQuant:
        return self.overrides.get(name, self.default)

    def check_modules(self, quantizable: Iterable[str]) -> None:
        """Unknown override names are errors, never silently ignored."""
        known = sorted(set(quantizable))
        unknown = sorted(set(self.overrides) - set(known))
        if unknown:
            hints = []
            for name in unknown[:3]:
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
            more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
            raise RecipeError(f"recipe names modules the model does not have: {', '.join(hints)}{more}")

    def with_overrides(self, overrides: Mapping[str, WeightQuant]) -> Recipe:
        return replace(self, overrides=dict(overrides))

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "method": self.method,
            "default": self.default.to_json(),
            "overrides": {name: spec.to_json() for name, spec in sorted(self.overrides.items())},
            "embedding": None if self.embedding is None else self.embedding.to_json(),
            "activation_bits": self.activation_bits,
        } | ({} if self.structure is None else {"structure": self.structure.to_json()})

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    def digest(self) -> str:
        return hashlib.sha256(self.dumps().encode()).hexdigest()

    @classmethod
    def from_json(cls, data: Any) -> Recipe:
        if not isinstance(data, Mapping):
            raise RecipeError(f"a recipe is a JSON object, got {type(data).__name__}")
        unknown = set(data) - {"version", "method", "default", "overrides", "embedding", "activation_bits",
                               "structure"}
        if unknown:
            raise RecipeError(f"recipe has unknown keys {sorted(unknown)}")
        overrides = data.get("overrides", {})
        if not isinstance(overrides, Mapping):
            raise RecipeError("recipe 'overrides' must be an object of module name -> weight config")
        embedding = data.get("embedding", {"bits": 8, "groups": "row"})
        method = data.get("method", "qbert")
        if not isinstance(method, str):
            raise RecipeError(f"recipe 'method' must be a string, got {method!r}")
        try:
            structure = None if data.get("structure") is None else Structure.from_json(data["structure"])
        except StructureError as err:
            raise RecipeError(str(err)) from None
        return cls(
            version=data.get("version", 1),
            structure=structure,
            method=method,
            default=WeightQuant.from_json(data.get("default", {}), "default"),
            overrides={str(k): WeightQuant.from_json(v, f"overrides[{k}]") for k, v in overrides.items()},
            embedding=None if embedding is None else WeightQuant.from_json(embedding, "embedding"),
            activation_bits=data.get("activation_bits", 8),
        )

    @classmethod
    def loads(cls, text: str) -> Recipe:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecipeError(f"recipe is not valid JSON: {err}") from None
        return cls.from_json(data)


__all__ = ["RECIPE_VERSION", "Recipe", "RecipeError", "WeightQuant"]
