"""Run every backend over the same tokenized batches and summarize each against the PyTorch references."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qbert_deploy.checkpoint import Checkpoint
from qbert_deploy.data.tsv import Example
from qbert_deploy.families import TEXT_INPUTS
from qbert_deploy.validation.backends import (
    FAKEQUANT,
    FP32,
    MASTER,
    BackendRun,
    BackendSpec,
    Batch,
    make_runner,
    run_backend,
)
from qbert_deploy.validation.profiles import CANONICAL
from qbert_deploy.validation.stats import ErrorStats, agreement, error_stats, wilson_interval
from qbert_deploy.validation.task_data import Evaluation, main_agreement


def dataset_digest(examples: Sequence[Example]) -> str:
    """Hash of the examples' texts and labels: a baseline is only comparable on the same data."""
    h = hashlib.sha256()
    for e in examples:
        h.update(f"{e.text}\t{e.text_pair or ''}\t{e.label}\n".encode())
    return h.hexdigest()


def tokenize(tokenizer: Any, examples: Sequence[Example], batch_size: int, max_length: int,
             inputs: Sequence[str] = TEXT_INPUTS) -> list[Batch]:
    """Batches of the model's `inputs` (its family's)."""
    from qbert_deploy.data.batches import encode

    return [encode(tokenizer, examples[i:i + batch_size], max_length, inputs)
            for i in range(0, len(examples), batch_size)]


@dataclass(frozen=True)
class BackendSummary:
    name: str
    description: str
    examples: int
    accuracy: float  # percent
    ci_low: float
    ci_high: float
    agreement_fakequant: float  # percent
    agreement_fp32: float  # with the fine-tuned fp32 model, or model.pt's master weights in a run without it
    error: ErrorStats  # logits against PyTorch fake-quant
    median_batch_ms: float
    examples_per_second: float
    model: str | None
    exact: bool = False  # must reproduce the ONNX spec numerically (the spec and the canonical profile)
    metric: str = "accuracy"  # what `accuracy` holds: the task's main metric (percent)
    metrics: dict[str, float] = field(default_factory=dict)  # every metric of the task (percent)
    agreements: dict[str, float] = field(default_factory=dict)  # every agreement with PyTorch fake-quant (percent)

    def to_json(self) -> dict[str, Any]:
        extra = ({"metric": self.metric, "metrics": self.metrics, "agreements_fakequant": self.agreements}
                 if self.metrics else {})
        return extra | {"name": self.name, "description": self.description, "examples": self.examples,
                "accuracy": self.accuracy, "accuracy_ci95": [self.ci_low, self.ci_high],
                "agreement_fakequant": self.agreement_fakequant, "agreement_fp32": self.agreement_fp32,
                "logit_error_vs_fakequant": self.error.to_json(), "median_batch_ms": self.median_batch_ms,
                "examples_per_second": self.examples_per_second, "model": self.model}


def float_reference(runs: dict[str, BackendRun]) -> str:
    """The float model agreement is counted against: the fine-tuned fp32 model when the run has it."""
    return FP32 if FP32 in runs else MASTER


def summarize(runs: dict[str, BackendRun], labels: np.ndarray) -> list[BackendSummary]:
    reference, fp32 = runs[FAKEQUANT].logits, runs[float_reference(runs)].logits
    step = error_stats(reference, reference).step
    out = []
    for name, run in runs.items():
        correct = int((run.logits.argmax(-1) == labels).sum())
        low, high = wilson_interval(correct, len(labels))
        out.append(BackendSummary(
            name=name, description=run.spec.describe(), examples=len(labels),
            accuracy=100.0 * correct / len(labels), ci_low=100.0 * low, ci_high=100.0 * high,
            agreement_fakequant=100.0 * agreement(run.logits, reference),
            agreement_fp32=100.0 * agreement(run.logits, fp32),
            error=error_stats(reference, run.logits, step), median_batch_ms=run.median_batch_ms,
            examples_per_second=run.examples_per_second,
            model=str(run.model_path) if run.model_path else None,
            exact=run.spec.is_onnx and run.spec.profile == CANONICAL))
    return out


def summarize_task(runs: dict[str, BackendRun], evaluation: Evaluation) -> list[BackendSummary]:
    """Token classification, QA and embeddings: the task's metrics and agreements (validation/task_data.py)."""
    reference, fp32 = runs[FAKEQUANT].logits, runs[float_reference(runs)].logits
    step = error_stats(evaluation.compared(reference), evaluation.compared(reference)).step
    out = []
    for name, run in runs.items():
        metrics = evaluation.score(run.logits)
        if evaluation.reference_score is not None:
            metrics = evaluation.reference_score(run.logits, fp32) | metrics
        agreements = evaluation.agree(run.logits, reference)
        value = metrics[evaluation.metric]
        out.append(BackendSummary(
            name=name, description=run.spec.describe(), examples=evaluation.examples, accuracy=value,
            ci_low=value, ci_high=value, agreement_fakequant=main_agreement(agreements),
            agreement_fp32=main_agreement(evaluation.agree(run.logits, fp32)),
            error=error_stats(evaluation.compared(reference), evaluation.compared(run.logits), step),
            median_batch_ms=run.median_batch_ms, examples_per_second=run.examples_per_second,
            model=str(run.model_path) if run.model_path else None,
            exact=run.spec.is_onnx and run.spec.profile == CANONICAL, metric=evaluation.metric, metrics=metrics,
            agreements=agreements))
    return out


def run_all(specs: Sequence[BackendSpec], checkpoint: Checkpoint, export_dir: Path, batches: Sequence[Batch],
            workdir: Path, threads: int | None, progress: Callable[[str], None] = print) -> dict[str, BackendRun]:
    runs = {}
    for spec in specs:
        progress(f"running {spec.name}: {spec.describe()}")
        runner, path = make_runner(spec, checkpoint, export_dir, workdir, threads)
        runs[spec.name] = run_backend(spec, runner, batches, path)
    return runs
