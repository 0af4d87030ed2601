"""Per encoder layer facts for reports: bits from the export's metadata, sensitivity from the checkpoint if any."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from qbert_deploy.families import layer_index as encoder_layer_index

_LAYER = re.compile(r"layer[._/-]?(\d+)")
_SENSITIVITY = re.compile(r"sensitiv|hessian|omega|eigen", re.IGNORECASE)


def layer_index(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def bits_per_layer(weight_bits: Mapping[str, int]) -> dict[int, float]:
    """Mean weight bits of each encoder layer's quantized Linears."""
    found: dict[int, list[int]] = defaultdict(list)
    for name, bits in weight_bits.items():
        index = encoder_layer_index(name)
        if index is not None:
            found[index].append(bits)
    return {i: sum(v) / len(v) for i, v in sorted(found.items())}


def sensitivity_per_layer(metrics: Mapping[str, Any]) -> dict[int, float]:
    """Per-layer sensitivity if the checkpoint recorded one (e.g. 'sensitivity.layer.3': 1.2, or a list
    under 'sensitivity'); empty when it did not."""
    found: dict[int, float] = {}
    for key, value in metrics.items():
        if not _SENSITIVITY.search(key):
            continue
        if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
            return {i: float(v) for i, v in enumerate(value)}
        index = layer_index(key)
        if index is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            found[index] = float(value)
    return dict(sorted(found.items()))
