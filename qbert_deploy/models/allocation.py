"""Bits per encoder layer from a budget: more sensitive layers (higher Omega) never get fewer bits.

Among the assignments that are monotone in sensitivity and fit the budget, pick the one with the least
expected loss increase sum_i Omega_i * step_i^2, where a b-bit step is proportional to 2^-b (second-order
model of the loss: curvature times quantization noise variance). Ties go to the smaller model.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

BIT_CHOICES = (2, 3, 4, 8)


def _monotone(count: int, choices: Sequence[int]) -> list[tuple[int, ...]]:
    """Non-increasing bit sequences of length `count` (most sensitive layer first)."""
    ordered = sorted(set(choices), reverse=True)
    return [tuple(combo) for combo in itertools.combinations_with_replacement(ordered, count)]


def allocate_bits(omega: Sequence[float], layer_params: Sequence[int], *, average_bits: float | None = None,
                  budget_bytes: float | None = None, fixed_bytes: float = 0.0,
                  choices: Sequence[int] = BIT_CHOICES) -> list[int]:
    """Bits for each layer (same order as `omega`).

    `average_bits`: parameter-weighted mean bits of the layers must not exceed it. `budget_bytes`: layer bytes
    (params x bits / 8) plus `fixed_bytes` (everything else in the model) must not exceed it.
    """
    if len(omega) != len(layer_params) or not omega:
        raise ValueError("omega and layer sizes must be non-empty and of the same length")
    if (average_bits is None) == (budget_bytes is None):
        raise ValueError("give exactly one target: average bits or a size budget")
    if not choices or any(b not in range(2, 9) for b in choices):
        raise ValueError(f"bit choices must be in 2..8, got {list(choices)}")
    if any(not v == v for v in omega):  # NaN
        raise ValueError("sensitivities contain NaN")
    order = sorted(range(len(omega)), key=lambda i: -omega[i])  # most sensitive first
    total = sum(layer_params)
    best: tuple[float, float, list[int]] | None = None
    for combo in _monotone(len(omega), choices):
        bits = [0] * len(omega)
        for rank, layer in enumerate(order):
            bits[layer] = combo[rank]
        weight_bits = sum(n * b for n, b in zip(layer_params, bits, strict=True))
        if average_bits is not None and weight_bits > average_bits * total + 1e-9:
            continue
        if budget_bytes is not None and weight_bits / 8 + fixed_bytes > budget_bytes + 1e-9:
            continue
        cost = sum(w * 4.0 ** (-b) for w, b in zip(omega, bits, strict=True))
        key = (cost, weight_bits)
        if best is None or key < best[:2]:
            best = (cost, weight_bits, bits)
    if best is None:
        target = f"an average of {average_bits} bits" if average_bits is not None else \
            f"{budget_bytes / 2**20:.3f} MB" if budget_bytes is not None else "the target"
        raise ValueError(f"no allocation from bits {sorted(set(choices))} fits {target}")
    return best[2]


def uniform_reason(bits: Sequence[int], omega: Sequence[float], choices: Sequence[int], target: str) -> str | None:
    """Why `allocate_bits` gave every layer the same width although `choices` offer others (None if it did not).

    Moving one bit from a layer to another at width b multiplies one cost term by 4 and the other by 1/4, so a mix
    only pays off where sensitivities differ by more than 4x; otherwise the uniform width that meets the target
    exactly is the cheapest allocation.
    """
    widths = sorted(set(choices))
    if len(set(bits)) != 1 or len(widths) < 2:
        return None
    width = bits[0]
    lower, higher = [b for b in widths if b < width], [b for b in widths if b > width]
    if not higher:
        return f"every layer got {width} bits, the widest of the bit choices: {target} allows them all"
    if not lower:
        return f"every layer got {width} bits, the narrowest of the bit choices: nothing wider fits {target}"
    spread = max(omega) / max(min(omega), 1e-30)
    why = (f"the layers' sensitivities (Omega) differ by {spread:.1f}x, less than the 4x at which moving a bit "
           "between two layers lowers the expected loss" if spread < 4 else
           "no mix of the bit choices that fits costs less")
    return (f"every layer got {width} bits: a uniform {width}-bit allocation fits {target}, and {why}; "
            f"use --bit-choices {max(lower)},{min(higher)} for a mix")
