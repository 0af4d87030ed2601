"""The validation report: JSON for machines, Markdown for people, PNG plots; written as one directory, atomically."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qbert_deploy.atomic import atomic_dir
from qbert_deploy.validation.backends import FP32, MASTER
from qbert_deploy.validation.gate import Failure, Tolerance
from qbert_deploy.validation.harness import BackendSummary
from qbert_deploy.validation.layerwise import LayerError, first_departure
from qbert_deploy.validation.plots import bits_plot, layer_error_plot

REPORT_FORMAT = "qbert-validate-report"


@dataclass
class Report:
    export_dir: str
    checkpoint: str
    checkpoint_sha256: str
    data: dict[str, Any]
    settings: dict[str, Any]
    summaries: list[BackendSummary]
    bits: dict[int, float]
    sensitivity: dict[int, float]
    layers: dict[str, list[LayerError]] = field(default_factory=dict)
    layer_tolerance: float = 0.0
    layer_examples: int = 0
    tolerance: Tolerance | None = None
    baseline: str | None = None
    failures: list[Failure] = field(default_factory=list)
    fp32: dict[str, Any] = field(default_factory=dict)  # Fp32Choice.to_json(), plus accuracy and drops when it ran
    notes: list[str] = field(default_factory=list)  # the run's notes and warnings, as printed

    def departures(self) -> dict[str, str | None]:
        return {name: first_departure(errors, self.layer_tolerance) for name, errors in self.layers.items()}

    def to_json(self) -> dict[str, Any]:
        gate = None
        if self.tolerance is not None:
            gate = {"baseline": self.baseline, "max_drop": self.tolerance.max_drop,
                    "max_drop_vs_fp32": self.tolerance.max_drop_vs_fp32,
                    "max_error_steps": self.tolerance.max_error_steps,
                    "relative": self.tolerance.relative, "min_agreement": self.tolerance.min_agreement,
                    "passed": not self.failures, "failures": [vars(f) for f in self.failures]}
        layerwise = None
        if self.layers:
            layerwise = {"tolerance_median_steps": self.layer_tolerance, "examples": self.layer_examples,
                         "first_departure": self.departures(),
                         "backends": {k: [e.to_json() for e in v] for k, v in self.layers.items()}}
        return {"format": REPORT_FORMAT, "version": 1, "export_dir": self.export_dir, "checkpoint": self.checkpoint,
                "checkpoint_sha256": self.checkpoint_sha256, "data": self.data, "settings": self.settings,
                "fp32": self.fp32 or None, "notes": self.notes,
                "backends": [s.to_json() for s in self.summaries], "layerwise": layerwise, "gate": gate,
                "bits_per_layer": {str(k): v for k, v in self.bits.items()},
                "sensitivity_per_layer": {str(k): v for k, v in self.sensitivity.items()} or None}


def _num(value: float, digits: int = 3) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}g}"


def backend_table(summaries: Sequence[BackendSummary]) -> str:
    """The per-backend table (Markdown), also what docs/RESULTS.md quotes."""
    metric = summaries[0].metric.replace("_", " ") if summaries else "accuracy"
    interval = " (95% CI)" if metric == "accuracy" else ""
    floating = "fp32" if any(s.name == FP32 for s in summaries) else "master weights"
    lines = [f"| backend | {metric} %{interval} | agree fake-quant % | agree {floating} % | max abs err "
             "| median abs err | p99 abs err | SQNR dB | max err (steps) | ms/batch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        e = s.error
        value = f"{s.accuracy:.2f}" + (f" ({s.ci_low:.1f}-{s.ci_high:.1f})" if interval else "")
        lines.append(f"| {s.name} | {value} | {s.agreement_fakequant:.2f} | "
                     f"{s.agreement_fp32:.2f} | {_num(e.max_abs)} | {_num(e.median_abs)} | {_num(e.p99_abs)} | "
                     f"{_num(e.sqnr_db)} | {_num(e.max_steps)} | {s.median_batch_ms:.1f} |")
    return "\n".join(lines)


def fp32_table(summaries: Sequence[BackendSummary], drops: Mapping[str, float], unit: str = "pp") -> str:
    """Each backend's drop below the fine-tuned fp32 model: the quantization loss (empty without an fp32 row)."""
    if not drops:
        return ""
    metric = summaries[0].metric.replace("_", " ")
    lines = [f"| backend | {metric} % | drop vs fp32 ({unit}) |", "|---|---|---|"]
    lines += [f"| {s.name} | {s.accuracy:.2f} | {drops[s.name]:.2f} |" for s in summaries if s.name in drops]
    return "\n".join(lines)


def task_table(summaries: Sequence[BackendSummary]) -> str:
    """Every metric and every agreement of a token-classification or QA run (empty for sequences)."""
    if not summaries or not summaries[0].metrics:
        return ""
    metrics, agreements = list(summaries[0].metrics), list(summaries[0].agreements)
    header = [m.replace("_", " ") + " %" for m in metrics] + [a.replace("_", " ") + " %" for a in agreements]
    lines = ["| backend | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for s in summaries:
        cells = [f"{s.metrics[m]:.2f}" for m in metrics] + [f"{s.agreements[a]:.2f}" for a in agreements]
        lines.append(f"| {s.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _layer_table(report: Report) -> str:
    backends = list(report.layers)
    modules = [e.module for e in report.layers[backends[0]]]
    lines = ["| module | " + " | ".join(backends) + " |", "|---|" + "---|" * len(backends)]
    for i, module in enumerate(modules):
        cells = []
        for b in backends:
            err = report.layers[b][i].error
            cells.append("n/a" if err is None else f"{_num(err.median_steps, 2)} / {_num(err.p99_steps, 2)}")
        lines.append(f"| {module} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(report: Report) -> str:
    out = [f"# qbert-validate report: {report.export_dir}", "",
           f"- checkpoint: `{report.checkpoint}` (sha256 {report.checkpoint_sha256[:12]})",
           f"- data: `{report.data['path']}`, {report.data['examples']} examples",
           f"- settings: {', '.join(f'{k}={v}' for k, v in report.settings.items())}",
           *(f"- {note}" for note in report.notes), "",
           "Logit errors are against PyTorch fake-quant; steps are 8-bit steps of its logits' range. "
           "pytorch-fp32 is the fine-tuned fp32 model quantization started from; pytorch-master-weights is "
           "model.pt's float weights after quantization-aware training.", "",
           backend_table(report.summaries), ""]
    drops = report.fp32.get("drops") or {}
    unit = report.tolerance.unit() if report.tolerance is not None else "pp"
    if drops:
        out += ["## Quantization drop vs the fine-tuned fp32 model", "", fp32_table(report.summaries, drops, unit), ""]
    else:
        out += ["## Quantization drop vs the fine-tuned fp32 model", "",
                "No pytorch-fp32 row: " + report.fp32.get("message", "no fp32 reference"), ""]
    if task_table(report.summaries):
        out += [f"## {report.data.get('task', 'task')} metrics and agreement with PyTorch fake-quant", "",
                task_table(report.summaries), ""]
    if report.layers:
        out += ["## Layerwise", "",
                f"median / p99 |error| in 8-bit steps of each PyTorch fake-quant tensor, over "
                f"{report.layer_examples} examples' real tokens; a module departs when its median exceeds "
                f"{report.layer_tolerance:g} steps.", ""]
        for name, module in report.departures().items():
            if name == MASTER:
                out.append(f"- {name}: the quantization error itself (float weights against fake-quant)")
            else:
                out.append(f"- {name}: first departure **{module}**" if module else f"- {name}: within tolerance")
        out += ["", _layer_table(report), "", "![per-layer error](layer_error.png)", ""]
    out += ["## Bits per layer", "", "![bits per layer](bits.png)", ""]
    if report.tolerance is not None:
        t = report.tolerance
        verdict = "PASSED" if not report.failures else f"FAILED ({len(report.failures)} checks)"
        against = f"baseline `{report.baseline}`" if report.baseline else "no baseline"
        vs_fp32 = f", max drop vs fp32 {t.max_drop_vs_fp32:g} {t.unit()}" if t.max_drop_vs_fp32 is not None else ""
        out += ["## Gate", "", f"{verdict}: {against}, max drop {t.max_drop:g} {t.unit()}{vs_fp32}, min agreement "
                f"{t.min_agreement:g}%, median logit error <= {t.max_error_steps:g} steps (spec and canonical).", ""]
        if report.failures:
            out += ["| backend | check | value | limit |", "|---|---|---|---|"]
            out += [f"| {f.backend} | {f.check} | {f.value} | {f.limit} |" for f in report.failures]
            out.append("")
    return "\n".join(out)


def _finite(value: Any) -> Any:
    """JSON has no Infinity or NaN: write null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_report(folder: Path, report: Report) -> None:
    """report.json, report.md and the plots, replacing `folder` whole."""
    with atomic_dir(folder) as tmp:
        (tmp / "report.json").write_text(json.dumps(_finite(report.to_json()), indent=2, allow_nan=False) + "\n",
                                         encoding="utf-8")
        (tmp / "report.md").write_text(markdown(report), encoding="utf-8")
        bits_plot(tmp / "bits.png", report.bits, report.sensitivity)
        if report.layers:
            layer_error_plot(tmp / "layer_error.png", report.layers, report.layer_tolerance)
