"""One validation run, end to end: check the pair, read the data, run the backends, compare, gate, report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbert_deploy.checkpoint import Checkpoint, load_checkpoint
from qbert_deploy.data.tsv import Columns, read_tsv
from qbert_deploy.families import family_of
from qbert_deploy.metrics import single_class_warning
from qbert_deploy.tasks import FEATURE, SEQUENCE
from qbert_deploy.validation.backends import FAKEQUANT, FP32, MASTER, BackendRun, Batch, backend_specs, onnx_model_path
from qbert_deploy.validation.gate import Tolerance, check, fp32_drops, load_baseline, write_baseline
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
from qbert_deploy.validation.profiles import default_profiles, served_profile
from qbert_deploy.validation.provenance import ExportInfo, check_match, read_export_info
from qbert_deploy.validation.reference import choose_fp32
from qbert_deploy.validation.report import Report, backend_table, fp32_table, task_table, write_report
from qbert_deploy.validation.task_data import prepare, spread

DEFAULT_MAX_LENGTH = 128  # for a model.pt and export that record no trained length


@dataclass(frozen=True)
class Settings:
    providers: Sequence[str] = ("cpu",)
    profiles: Sequence[str] | None = None  # None: canonical, every lowered file in the export, the served profile
    batch_size: int = 32
    max_length: int | None = None  # None: the length model.pt was trained at (DEFAULT_MAX_LENGTH if unrecorded)
    threads: int | None = None
    limit: int | None = None
    layerwise: bool = False
    layer_examples: int = 32
    layer_tolerance: float = DEFAULT_TOLERANCE_STEPS
    max_drop: float = 0.5
    relative: bool = False
    min_agreement: float = 99.0
    max_error_steps: float = 0.5
    fp32: Path | None = None  # the fine-tuned fp32 model's folder; None: the one model.pt records
    max_drop_vs_fp32: float | None = None
    columns: Columns | None = None  # TSV columns named by the user; None: found from the header
    probe_train: Path | None = None  # embeddings: labelled TSV the probe is trained on (MTEB's classification)
    min_cosine: float | None = None  # embeddings: least mean cosine to fp32 of every quantized backend (0..1)
    min_neighbours: float | None = None  # embeddings: least 10-nearest-neighbour overlap with fp32 (0..1)


def check_settings(settings: Settings) -> None:
    """The gate's numbers must mean something: a ValueError naming the option otherwise."""
    if settings.max_drop < 0 or not 0 <= settings.min_agreement <= 100 or settings.layer_tolerance <= 0 \
            or settings.max_error_steps <= 0:
        raise ValueError("--max-drop must be >= 0, --min-agreement in 0..100, --layer-tolerance and "
                         "--max-error-steps > 0")
    if settings.max_drop_vs_fp32 is not None and not 0 <= settings.max_drop_vs_fp32 < float("inf"):
        raise ValueError(f"--max-drop-vs-fp32 must be a number >= 0, got {settings.max_drop_vs_fp32:g}")
    for option, value in (("--min-cosine", settings.min_cosine), ("--min-neighbours", settings.min_neighbours)):
        if value is not None and not 0 <= value <= 1:
            raise ValueError(f"{option} must be in 0..1, got {value:g}")


def resolve_max_length(asked: int | None, checkpoint: Checkpoint, info: ExportInfo,
                       checkpoint_path: Path) -> tuple[int, str | None]:
    """The sequence length to validate at, and a note when it is not the one the model was trained at."""
    trained = checkpoint.max_length or info.max_length
    if asked is None:
        if trained is None:
            return DEFAULT_MAX_LENGTH, (f"note: {checkpoint_path} records no training length (written before it "
                                        f"was recorded): --max-length {DEFAULT_MAX_LENGTH}")
        return trained, None
    if trained is not None and asked != trained:
        return asked, (f"note: --max-length {asked} differs from the {trained} tokens the model was trained and "
                       "calibrated at")
    return asked, None


def resolve_profiles(asked: Sequence[str] | None, export_dir: Path,
                     providers: Sequence[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Per provider, the profiles to run, and notes: with --profile, where it leaves out what would be served."""
    if asked is None:
        return default_profiles(export_dir, providers), []
    notes = []
    for provider in providers:
        served = served_profile(provider)
        if served is not None and served not in asked:
            notes.append(f"note: --profile leaves out {served}, what qbert-serve runs on {provider} by default")
    return {provider: list(asked) for provider in providers}, notes


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
    out = {MASTER: compare_layers(reference, capture_torch(build_model(checkpoint, quantized=False), batch, order),
                                  mask)}
    for name, run in runs.items():
        if run.spec.is_onnx and run.model_path is not None:
            exposed = capture_onnx(run.model_path, run.spec, batch, order, linears, threads)
            out[name] = compare_layers(reference, exposed, mask)
    return out


def validate(export_dir: Path, checkpoint_path: Path, data_path: Path, settings: Settings, workdir: Path,
             baseline: Path | None = None, new_baseline: Path | None = None, report_dir: Path | None = None,
             progress: Callable[[str], None] = print) -> Report:
    if checkpoint_path.is_dir() and (checkpoint_path / "config.json").is_file() \
            and not (checkpoint_path / "qbert_checkpoint.json").is_file():
        raise ValueError(f"{checkpoint_path} is a Hugging Face model folder, not a qbert checkpoint: give the "
                         "quantized model.pt as --checkpoint and this folder as --fp32")
    checkpoint = load_checkpoint(checkpoint_path)
    inputs = family_of(checkpoint.config).inputs  # an unsupported architecture stops before any work
    info = read_export_info(export_dir)
    check_match(info, checkpoint, str(checkpoint_path))
    notes: list[str] = []

    def note(line: str) -> None:
        notes.append(line)
        progress(line)

    max_length, length_note = resolve_max_length(settings.max_length, checkpoint, info, checkpoint_path)
    if length_note:
        note(length_note)
    fp32 = choose_fp32(checkpoint, checkpoint_path, settings.fp32)
    note(fp32.message)
    profiles, profile_notes = resolve_profiles(settings.profiles, export_dir, settings.providers)
    for line in profile_notes:
        note(line)
    if checkpoint.task != FEATURE and (settings.min_cosine is not None or settings.min_neighbours is not None):
        raise ValueError(f"--min-cosine and --min-neighbours gate embedding models; this model is {checkpoint.task}")
    tokenizer = load_tokenizer(export_dir)
    examples = spread(read_tsv(data_path, checkpoint.labels, settings.columns),
                      settings.limit) if checkpoint.task == SEQUENCE else []
    if examples and checkpoint.text_pairs is not None and (examples[0].text_pair is not None) != checkpoint.text_pairs:
        raise ValueError(f"{data_path}: {'single texts' if checkpoint.text_pairs else 'sentence pairs'}, but the model "
                         f"was trained on {'sentence pairs' if checkpoint.text_pairs else 'single texts'}")
    evaluation = prepare(checkpoint.task, data_path, checkpoint.labels, tokenizer, settings.batch_size,
                         max_length, settings.limit, inputs, settings.columns, settings.probe_train)
    digest = evaluation.digest
    old_baseline = load_baseline(baseline, digest) if baseline is not None else None
    specs = backend_specs(settings.providers, profiles, fp32.folder)
    for spec in specs:  # resolve every profile before the long part, so a bad one fails fast
        if spec.is_onnx:
            onnx_model_path(spec, export_dir, workdir)
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    runs = run_all(specs, checkpoint, export_dir, evaluation.batches, workdir, settings.threads, progress)
    if evaluation.labels is not None:
        summaries = summarize(runs, evaluation.labels)
        for name, run in runs.items():
            warning = single_class_warning(run.logits.argmax(-1), evaluation.labels, checkpoint.labels, name)
            if warning:
                note(f"warning: {warning}")
    else:
        summaries = summarize_task(runs, evaluation)
    progress(backend_table(summaries))
    if task_table(summaries):
        progress(task_table(summaries))
    layers: dict[str, list[LayerError]] = {}
    # sequence classification: its examples; embeddings: the first texts as evaluated (token classification and QA
    # are not compared per layer)
    first_rows = min(evaluation.examples, len(evaluation.batches[0]["input_ids"])) if evaluation.batches else 0
    layer_count = min(settings.layer_examples, len(examples) if examples else
                      first_rows if checkpoint.task == FEATURE else 0)
    if settings.layerwise and not layer_count:
        progress("layerwise comparison: sequence classification and embeddings only; skipped")
    elif settings.layerwise:
        progress(f"layerwise comparison on {layer_count} examples")
        layer_batch = (tokenize(tokenizer, examples[:layer_count], layer_count, max_length, inputs)[0] if examples
                       else {k: v[:layer_count] for k, v in evaluation.batches[0].items()})
        layers = layerwise(checkpoint, runs, layer_batch, settings.threads)
        for name, errors in layers.items():
            if name != MASTER:
                module = first_departure(errors, settings.layer_tolerance)
                progress(f"{name}: first departure from PyTorch fake-quant: {module or 'none'}")
    tolerance = Tolerance(settings.max_drop, settings.relative, settings.min_agreement, settings.max_error_steps,
                          settings.max_drop_vs_fp32, settings.min_cosine, settings.min_neighbours)
    drops = fp32_drops(summaries, tolerance)
    if drops:
        progress(f"quantization drop vs the fine-tuned fp32 model ({fp32.folder}):\n"
                 + fp32_table(summaries, drops, tolerance.unit()))
    fp32_facts = fp32.to_json()
    if drops:
        fp32_facts |= {"accuracy": next(s.accuracy for s in summaries if s.name == FP32), "drops": drops}
    failures = check(summaries, tolerance, old_baseline.accuracies if old_baseline else None,
                     old_baseline.ungated if old_baseline else frozenset(),
                     "no fp32 model: " + ("model.pt records none" if fp32.origin == "none" else
                                          "the one model.pt records is missing or changed") + "; give --fp32 DIR")
    served = [served_profile(p) for p in settings.providers]
    report = Report(
        export_dir=str(export_dir), checkpoint=str(checkpoint_path), checkpoint_sha256=info.checkpoint_sha256,
        data={"path": str(data_path), "examples": evaluation.examples, "sha256": digest, "task": checkpoint.task},
        settings={"providers": ",".join(settings.providers),
                  "profiles": ";".join(f"{k}:{','.join(v)}" for k, v in profiles.items()),
                  "served_profiles": ",".join(p for p in served if p),
                  "batch_size": settings.batch_size, "max_length": max_length,
                  "trained_max_length": checkpoint.max_length or info.max_length, "threads": settings.threads},
        summaries=summaries, bits=bits_per_layer(info.weight_bits),
        sensitivity=sensitivity_per_layer(checkpoint.metrics), layers=layers,
        layer_tolerance=settings.layer_tolerance, layer_examples=layer_count if layers else 0,
        tolerance=tolerance, baseline=str(baseline) if baseline else None, failures=failures,
        fp32=fp32_facts, notes=notes)
    if new_baseline is not None:
        fp32_record = ({"accuracy": round(fp32_facts["accuracy"], 4), "path": str(fp32.folder),
                        "sha256": fp32.sha256} if drops else None)
        write_baseline(new_baseline, summaries, digest, info.checkpoint_sha256, fp32_record)
        progress(f"wrote baseline {new_baseline}")
    if report_dir is not None:
        write_report(report_dir, report)
        progress(f"wrote report {report_dir}/report.md")
    if FAKEQUANT not in runs:
        raise RuntimeError("internal error: the fake-quant reference did not run")
    return report
