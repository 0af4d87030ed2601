"""Numbers that compare one backend's predictions and logits with a reference's."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile
# Median |logit error| in output steps that a backend reproducing the ONNX spec (onnx.reference, ORT's canonical
# graph) may show against PyTorch fake-quant: the gate's default and the export's parity check. The median, not the
# maximum: a float sum ordered differently can put one activation on the other side of an 8-bit step, which moves
# that row's logits by several steps in a healthy model; a wrong export moves most of them.
EXACT_MEDIAN_STEPS = 0.5


def output_step(logits: np.ndarray, bits: int = 8) -> float:
    """Step of an 8-bit quantizer over the reference logits' range: the unit tolerances are given in."""
    span = float(logits.max() - min(logits.min(), 0.0)) if logits.size else 0.0
    return max(span, 1e-12) / (2**bits - 1)


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion, in [0, 1]: honest near 0 and 1 and for small samples."""
    if total <= 0:
        raise ValueError("a confidence interval needs at least one example")
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of examples (0..1) whose argmax prediction is the same."""
    if a.shape != b.shape:
        raise ValueError(f"cannot compare predictions of shapes {a.shape} and {b.shape}")
    return float((a.argmax(-1) == b.argmax(-1)).mean()) if len(a) else 1.0


def sqnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of `other` against `reference`, in dB (inf when identical)."""
    noise = float(np.sum((reference.astype(np.float64) - other) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-30) / noise)


@dataclass(frozen=True)
class ErrorStats:
    """Absolute error of `other` against `reference`, with the error also in 8-bit output quantization steps."""

    max_abs: float
    median_abs: float
    p99_abs: float
    sqnr_db: float
    step: float

    @property
    def max_steps(self) -> float:
        return self.max_abs / self.step

    @property
    def p99_steps(self) -> float:
        return self.p99_abs / self.step

    @property
    def median_steps(self) -> float:
        return self.median_abs / self.step

    def to_json(self) -> dict[str, Any]:
        out = asdict(self) | {"max_steps": self.max_steps, "p99_steps": self.p99_steps,
                              "median_steps": self.median_steps}
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def error_stats(reference: np.ndarray, other: np.ndarray, step: float | None = None) -> ErrorStats:
    """Error statistics over every element; `step` defaults to the 8-bit step of the reference's range."""
    if reference.shape != other.shape:
        raise ValueError(f"cannot compare tensors of shapes {reference.shape} and {other.shape}")
    if not np.isfinite(other).all():
        return ErrorStats(math.inf, math.inf, math.inf, -math.inf, step or output_step(reference))
    error = np.abs(reference.astype(np.float64) - other.astype(np.float64)).ravel()
    if error.size == 0:
        return ErrorStats(0.0, 0.0, 0.0, math.inf, 1.0)
    return ErrorStats(float(error.max()), float(np.median(error)), float(np.percentile(error, 99)),
                      sqnr_db(reference, other), step or output_step(reference))
