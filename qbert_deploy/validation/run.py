"""One validation run, end to end: check the pair, read the data, run the backends, compare, gate, report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbert_deploy.checkpoint import Checkpoint, load_checkpoint
from qbert_deploy.data.tsv import read_tsv
from qbert_deploy.families import family_of
from qbert_deploy.tasks import SEQUENCE
from qbert_deploy.validation.backends import FAKEQUANT, FP32, BackendRun, Batch, backend_specs, onnx_model_path
from qbert_deploy.validation.gate import Tolerance, check, read_baseline, write_baseline
from qbert_deploy.validation.harness import run_all, summarize, summarize_task, tokenize
from qbert_deploy.validation.layers import bits_per_layer, sensitivity_per_layer
from qbert_deploy.validation.layerwise import (
    DEFAULT_TOLERANCE_STEPS,
    LayerError,
    capture_onnx,
    capture_torch,
    compare_layers,
    first_departure,
    watched_modules,
)
from qbert_deploy.validation.provenance import check_match, read_export_info
from qbert_deploy.validation.report import Report, backend_table, task_table, write_report
from qbert_deploy.validation.task_data import prepare, spread


@dataclass(frozen=True)
class Settings:
    providers: Sequence[str] = ("cpu",)
    profiles: Sequence[str] = ("canonical",)
    batch_size: int = 32
    max_length: int = 128
    threads: int | None = None
    limit: int | None = None
    layerwise: bool = False
    layer_examples: int = 32
    layer_tolerance: float = DEFAULT_TOLERANCE_STEPS
    max_drop: float = 0.5
    relative: bool = False
    min_agreement: float = 99.0
    max_error_steps: float = 0.5


def load_tokenizer(export_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(export_dir))
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{export_dir}: cannot load the export's tokenizer ({first[:200]})") from None


def layerwise(checkpoint: Checkpoint, runs: dict[str, BackendRun], batch: Batch,
              threads: int | None) -> dict[str, list[LayerError]]:
    """Per watched module, every backend's error against PyTorch fake-quant (fp32 shows the quantization error)."""
    from qbert_deploy.models.build import build_model
    from qbert_deploy.models.wrap import quantizable_linears

    fake_quant = build_model(checkpoint)
    names = watched_modules(fake_quant)
    linears = set(quantizable_linears(fake_quant))
    reference = capture_torch(fake_quant, batch, names)
    order = list(reference)
    mask = batch["attention_mask"]
    out = {FP32: compare_layers(reference, capture_torch(build_model(checkpoint, quantized=False), batch, order),
                                mask)}
    for name, run in runs.items():
        if run.spec.is_onnx and run.model_path is not None:
            exposed = capture_onnx(run.model_path, run.spec, batch, order, linears, threads)
            out[name] = compare_layers(reference, exposed, mask)
    return out


def validate(export_dir: Path, checkpoint_path: Path, data_path: Path, settings: Settings, workdir: Path,
             baseline: Path | None = None, new_baseline: Path | None = None, report_dir: Path | None = None,
             progress: Callable[[str], None] = print) -> Report:
    checkpoint = load_checkpoint(checkpoint_path)
    inputs = family_of(checkpoint.config).inputs  # an unsupported architecture stops before any work
    info = read_export_info(export_dir)
    check_match(info, checkpoint, str(checkpoint_path))
    tokenizer = load_tokenizer(export_dir)
    evaluation = prepare(checkpoint.task, data_path, checkpoint.labels, tokenizer, settings.batch_size,
                         settings.max_length, settings.limit, inputs)
    examples = spread(read_tsv(data_path, checkpoint.labels), settings.limit) if checkpoint.task == SEQUENCE else []
    digest = evaluation.digest
    baseline_accuracy = read_baseline(baseline, digest) if baseline is not None else None
    specs = backend_specs(settings.providers, settings.profiles)
    for spec in specs:  # resolve every profile before the long part, so a bad one fails fast
        if spec.is_onnx:
            onnx_model_path(spec, export_dir, workdir)
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    runs = run_all(specs, checkpoint, export_dir, evaluation.batches, workdir, settings.threads, progress)
    if evaluation.labels is not None:
        summaries = summarize(runs, evaluation.labels)
    else:
        summaries = summarize_task(runs, evaluation)
    progress(backend_table(summaries))
    if task_table(summaries):
        progress(task_table(summaries))
    layers: dict[str, list[LayerError]] = {}
    layer_count = min(settings.layer_examples, len(examples))
    if settings.layerwise and not examples:
        progress("layerwise comparison: sequence classification only; skipped")
    elif settings.layerwise:
        progress(f"layerwise comparison on {layer_count} examples")
        layers = layerwise(checkpoint, runs, tokenize(tokenizer, examples[:layer_count], layer_count,
                                                      settings.max_length, inputs)[0], settings.threads)
        for name, errors in layers.items():
            if name != FP32:
                module = first_departure(errors, settings.layer_tolerance)
                progress(f"{name}: first departure from PyTorch fake-quant: {module or 'none'}")
    tolerance = Tolerance(settings.max_drop, settings.relative, settings.min_agreement, settings.max_error_steps)
    failures = check(summaries, tolerance, baseline_accuracy)
    report = Report(
        export_dir=str(export_dir), checkpoint=str(checkpoint_path), checkpoint_sha256=info.checkpoint_sha256,
        data={"path": str(data_path), "examples": evaluation.examples, "sha256": digest, "task": checkpoint.task},
        settings={"providers": ",".join(settings.providers), "profiles": ",".join(settings.profiles),
                  "batch_size": settings.batch_size, "max_length": settings.max_length, "threads": settings.threads},
        summaries=summaries, bits=bits_per_layer(info.weight_bits),
        sensitivity=sensitivity_per_layer(checkpoint.metrics), layers=layers,
        layer_tolerance=settings.layer_tolerance, layer_examples=layer_count if layers else 0,
        tolerance=tolerance, baseline=str(baseline) if baseline else None, failures=failures)
    if new_baseline is not None:
        write_baseline(new_baseline, summaries, digest, info.checkpoint_sha256)
        progress(f"wrote baseline {new_baseline}")
    if report_dir is not None:
        write_report(report_dir, report)
        progress(f"wrote report {report_dir}/report.md")
    if FAKEQUANT not in runs:
        raise RuntimeError("internal error: the fake-quant reference did not run")
    return report
