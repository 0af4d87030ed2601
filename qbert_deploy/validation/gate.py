"""The accuracy regression gate: every backend within tolerance of the baseline and of PyTorch."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbert_deploy.atomic import write_text_atomic
from qbert_deploy.validation.backends import FAKEQUANT, FP32, MASTER, REFERENCES
from qbert_deploy.validation.harness import BackendSummary
from qbert_deploy.validation.stats import EXACT_MEDIAN_STEPS

BASELINE_FORMAT = "qbert-validate-baseline"
# Version 2 adds the fine-tuned fp32 model's row (pytorch-fp32) and figure; in version 1, "pytorch-fp32" named
# model.pt's float master weights, read here as pytorch-master-weights.
BASELINE_VERSION = 2
READABLE_BASELINES = (1, 2)


class BaselineError(ValueError):
    """A baseline file that cannot be read or does not fit this run."""


@dataclass(frozen=True)
class Tolerance:
    max_drop: float = 0.5  # percentage points, or percent of the reference when relative
    relative: bool = False
    min_agreement: float = 99.0  # percent of predictions equal to PyTorch fake-quant (ONNX backends)
    # Median |logit error| vs PyTorch fake-quant in 8-bit output steps, for the backends that must reproduce the
    # ONNX spec (the spec itself and the canonical profile); lowered profiles may approximate by design
    # (e.g. MatMulNBits' int8 activations) and answer to the accuracy and agreement checks.
    max_error_steps: float = EXACT_MEDIAN_STEPS
    # Drop of every quantized backend (fake-quant and ONNX) below the fine-tuned fp32 model; None: reported only.
    max_drop_vs_fp32: float | None = None
    # Embedding models: least mean cosine and 10-nearest-neighbour overlap (0..1) of every quantized backend with
    # the fp32 model's embeddings; None: reported only.
    min_cosine: float | None = None
    min_neighbours: float | None = None

    def drop(self, reference: float, value: float) -> float:
        """How far `value` fell below `reference`, in the unit `max_drop` is given in."""
        fall = reference - value
        return 100.0 * fall / reference if self.relative and reference > 0 else fall

    def unit(self) -> str:
        return "% rel" if self.relative else "pp"


@dataclass(frozen=True)
class Failure:
    backend: str
    check: str
    value: str
    limit: str


@dataclass(frozen=True)
class Baseline:
    accuracies: dict[str, float]  # backend name -> accuracy (percent), in this version's names
    version: int

    @property
    def ungated(self) -> frozenset[str]:
        """Backends this baseline cannot know, so their absence is no failure: a version 1 baseline predates the
        fine-tuned fp32 row."""
        return frozenset({FP32}) if self.version == 1 else frozenset()


def write_baseline(path: Path, summaries: Sequence[BackendSummary], dataset_sha256: str,
                   checkpoint_sha256: str, fp32: dict[str, Any] | None = None) -> None:
    """`fp32`: the fine-tuned fp32 model's figure and where it came from (None: the run had no fp32 row)."""
    data = {"format": BASELINE_FORMAT, "version": BASELINE_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "dataset_sha256": dataset_sha256, "checkpoint_sha256": checkpoint_sha256, "fp32": fp32,
            "backends": {s.name: {"accuracy": round(s.accuracy, 4), "examples": s.examples,
                                  "agreement_fakequant": round(s.agreement_fakequant, 4)} for s in summaries}}
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_baseline(path: Path, dataset_sha256: str) -> dict[str, float]:
    """Backend name -> baseline accuracy (percent). The baseline must come from the same examples."""
    return load_baseline(path, dataset_sha256).accuracies


def load_baseline(path: Path, dataset_sha256: str) -> Baseline:
    """The baseline's accuracies under today's backend names, and its version."""
    if not path.is_file():
        raise BaselineError(f"{path}: no such baseline file (record one with --write-baseline)")
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BaselineError(f"{path}: not a JSON baseline ({err})") from None
    if not isinstance(data, dict) or data.get("format") != BASELINE_FORMAT:
        raise BaselineError(f"{path}: not a qbert-validate baseline (no '{BASELINE_FORMAT}' format marker)")
    version = data.get("version")
    if version not in READABLE_BASELINES:
        raise BaselineError(f"{path}: baseline version {version!r} is not supported")
    if data.get("dataset_sha256") != dataset_sha256:
        raise BaselineError(f"{path}: the baseline was measured on different examples than --data "
                            f"(dataset sha256 {str(data.get('dataset_sha256'))[:12]} vs {dataset_sha256[:12]})")
    backends = data.get("backends")
    if not isinstance(backends, dict):
        raise BaselineError(f"{path}: 'backends' must be an object")
    out = {}
    for name, entry in backends.items():
        value = entry.get("accuracy") if isinstance(entry, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
            raise BaselineError(f"{path}: backend {name!r} has no accuracy in 0..100")
        out[str(name)] = float(value)
    if version == 1 and FP32 in out:
        out[MASTER] = out.pop(FP32)
    return Baseline(out, int(version))


def check(summaries: Sequence[BackendSummary], tolerance: Tolerance,
          baseline: dict[str, float] | None, ungated: frozenset[str] = frozenset(),
          fp32_missing: str = "no fp32 reference") -> list[Failure]:
    """Every failed check. ONNX backends must also match PyTorch fake-quant in accuracy and predictions; with
    `max_drop_vs_fp32`, every quantized backend must stay that close to the fine-tuned fp32 model, and a run without
    one fails (`fp32_missing` says why). Backends in `ungated` may be absent from the baseline."""
    failures = []
    by_name = {s.name: s for s in summaries}
    reference = by_name[FAKEQUANT]
    limit = f"<= {tolerance.max_drop:g} {tolerance.unit()}"
    if tolerance.max_drop_vs_fp32 is not None:
        failures += _vs_fp32(summaries, tolerance, tolerance.max_drop_vs_fp32, fp32_missing)
    failures += _fidelity(summaries, tolerance, fp32_missing)
    for s in summaries:
        if baseline is not None and not (s.name in ungated and s.name not in baseline):
            if s.name not in baseline:
                failures.append(Failure(s.name, "baseline", "no entry", "refresh with --write-baseline"))
            elif (drop := tolerance.drop(baseline[s.name], s.accuracy)) > tolerance.max_drop:
                failures.append(Failure(s.name, "drop vs baseline",
                                        f"{drop:.2f} {tolerance.unit()} ({baseline[s.name]:.2f} -> {s.accuracy:.2f})",
                                        limit))
        if not s.name.startswith("ort-"):
            continue
        if (drop := tolerance.drop(reference.accuracy, s.accuracy)) > tolerance.max_drop:
            failures.append(Failure(s.name, "drop vs PyTorch fake-quant",
                                    f"{drop:.2f} {tolerance.unit()} ({reference.accuracy:.2f} -> {s.accuracy:.2f})",
                                    limit))
        if s.agreement_fakequant < tolerance.min_agreement:
            failures.append(Failure(s.name, "agreement with PyTorch fake-quant", f"{s.agreement_fakequant:.2f}%",
                                    f">= {tolerance.min_agreement:g}%"))
        # Catches a numerically wrong export even where the predictions happen not to flip.
        if s.exact and not s.error.median_steps <= tolerance.max_error_steps:
            failures.append(Failure(s.name, "median logit error vs PyTorch fake-quant",
                                    f"{s.error.median_steps:.3g} steps", f"<= {tolerance.max_error_steps:g} steps"))
    return failures


def _vs_fp32(summaries: Sequence[BackendSummary], tolerance: Tolerance, bound: float,
             missing: str) -> list[Failure]:
    limit = f"<= {bound:g} {tolerance.unit()}"
    fp32 = next((s for s in summaries if s.name == FP32), None)
    if fp32 is None:
        return [Failure(FP32, "drop vs fp32", missing, limit)]
    out = []
    for s in summaries:
        if s.name not in REFERENCES and (drop := tolerance.drop(fp32.accuracy, s.accuracy)) > bound:
            out.append(Failure(s.name, "drop vs fp32", f"{drop:.2f} {tolerance.unit()} ({fp32.accuracy:.2f} -> "
                                                       f"{s.accuracy:.2f})", limit))
    return out


FIDELITY = (("min_cosine", "mean_cosine_fp32", "mean cosine vs fp32"),
            ("min_neighbours", "neighbours_10_fp32", "10-NN overlap vs fp32"))


def _fidelity(summaries: Sequence[BackendSummary], tolerance: Tolerance, missing: str) -> list[Failure]:
    """--min-cosine and --min-neighbours: every quantized backend's embeddings against the fp32 model's."""
    asked = [(getattr(tolerance, option), key, label) for option, key, label in FIDELITY
             if getattr(tolerance, option) is not None]
    if not asked:
        return []
    if not any(s.name == FP32 for s in summaries):
        return [Failure(FP32, label, missing, f">= {bound:g}") for bound, _, label in asked]
    out = []
    for s in summaries:
        for bound, key, label in asked:
            if s.name not in REFERENCES and (value := s.metrics[key] / 100.0) < bound:
                out.append(Failure(s.name, label, f"{value:.4f}", f">= {bound:g}"))
    return out


def fp32_drops(summaries: Sequence[BackendSummary], tolerance: Tolerance) -> dict[str, float]:
    """Each other backend's drop below the fine-tuned fp32 model (empty without an fp32 row)."""
    fp32 = next((s for s in summaries if s.name == FP32), None)
    if fp32 is None:
        return {}
    return {s.name: tolerance.drop(fp32.accuracy, s.accuracy) for s in summaries if s.name != FP32}


def failure_table(failures: Sequence[Failure]) -> str:
    rows = [("backend", "check", "value", "limit")] + [(f.backend, f.check, f.value, f.limit) for f in failures]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
