"""qbert-deploy: deploy Q-BERT-style ultra-low-precision BERTs to ONNX Runtime.

The pipeline, as the commands run it:

    checkpoint = qbert_deploy.quantize("out", model="my-bert", train="train.tsv", dev="dev.tsv", avg_bits=3)
    result = qbert_deploy.export(checkpoint, "out/export", lower=["cpu-w8a8"])
    report = qbert_deploy.validate(result.out_dir, "out/model.pt", "dev.tsv")
    session = qbert_deploy.load_session(result.out_dir)          # an onnxruntime.InferenceSession

`calibrate` quantizes a fine-tuned model without training, from plain texts. Each function is the code path of
its command (qbert-quantize, qbert-export, qbert-validate), so options and errors are the same. Everything is
imported on first use, so `import qbert_deploy` is light and `qbert_deploy.runtimes` works where torch is absent.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnxruntime

    from qbert_deploy.checkpoint import Checkpoint
    from qbert_deploy.exporters.onnx_export import ExportResult
    from qbert_deploy.validation.report import Report

__version__ = "0.1.0"

PathLike = str | os.PathLike[str]

_API = {
    "Recipe": "qbert_deploy.recipe",
    "WeightQuant": "qbert_deploy.recipe",
    "RecipeError": "qbert_deploy.recipe",
    "Checkpoint": "qbert_deploy.checkpoint",
    "CheckpointError": "qbert_deploy.checkpoint",
    "load_checkpoint": "qbert_deploy.checkpoint",
    "save_checkpoint": "qbert_deploy.checkpoint",
    "quantize_model": "qbert_deploy.models.wrap",
    "build_model": "qbert_deploy.models.build",
    "make_checkpoint": "qbert_deploy.models.build",
    "export_checkpoint": "qbert_deploy.exporters.onnx_export",
    "open_session": "qbert_deploy.runtimes.session",
    "check_export": "qbert_deploy.exporters.check",
    "save_safetensors_checkpoint": "qbert_deploy.safetensors_format",
    "MissingExtra": "qbert_deploy.extras",
    "ParityError": "qbert_deploy.validation.parity",
}
_PIPELINE = ["calibrate", "export", "load_session", "quantize", "validate"]

__all__ = ["__version__", *sorted([*_API, *_PIPELINE])]


def quantize(out: PathLike, *, model: PathLike | None = None, train: PathLike | None = None,
             dev: PathLike | None = None, method: str = "qbert", bits: int | None = None,
             avg_bits: float | None = None, budget_mb: float | None = None, preset: str | None = None,
             recipe: PathLike | None = None, **options: Any) -> Checkpoint:
    """Fine-tune, measure Hessian sensitivity, allocate bits and quantize (QAT or PTQ): `out`/model.pt, returned.

    Runs what `qbert-quantize -o OUT --model MODEL --train TRAIN --dev DEV ...` runs, resuming from `out` after a
    crash. `model` is a Hugging Face BERT, DistilBERT or RoBERTa folder (default: MiniLM-L6, the [demo] extra);
    `train`/`dev` GLUE-style TSV, CoNLL or SQuAD files (default: the movie reviews). Give one of `bits` (uniform),
    `avg_bits` or `budget_mb` (Hessian-allocated), `preset` (mp23, mp24, ...) or `recipe` (a JSON file). Every
    other qbert-quantize option is a keyword with `_` for `-`: finetune_steps=200, qat_steps=100, groups=128,
    bit_choices=(2, 3, 4, 8), max_length=128, ... A bad value raises ValueError with the command's message.
    """
    from qbert_deploy.checkpoint import load_checkpoint
    from qbert_deploy.quantize_run import options as quantize_options
    from qbert_deploy.quantize_run import run

    args = quantize_options(out, model=model, train=train, dev=dev, method=method, bits=bits, avg_bits=avg_bits,
                            budget_mb=budget_mb, preset=preset, recipe=recipe, **options)
    run(args)
    return load_checkpoint(Path(out) / "model.pt")


def calibrate(model: PathLike, texts: Sequence[str], out: PathLike, *, bits: int = 8, groups: int = 128,
              labels: Sequence[str] | None = None, max_length: int = 128, batch_size: int = 32) -> Checkpoint:
    """Quantize a fine-tuned Hugging Face sequence classifier without training: `out` (a model.pt), returned.

    Weights get `bits` (2..8) with `groups` groups per matrix (min/max, asymmetric), embeddings and activations
    8 bits; the activation ranges are observed on `texts` (a few hundred typical inputs, no labels needed).
    `labels` are the head's label names (default: the model's id2label). For training (QAT), Hessian-allocated
    mixed precision or clipping methods, use `quantize`.
    """
    import torch
    from transformers import AutoTokenizer

    from qbert_deploy.checkpoint import save_checkpoint
    from qbert_deploy.data.batches import encode
    from qbert_deploy.data.tsv import Example
    from qbert_deploy.families import family_of
    from qbert_deploy.models.build import make_checkpoint, tokenizer_files
    from qbert_deploy.models.task import load_base
    from qbert_deploy.models.wrap import calibrate as observe_ranges
    from qbert_deploy.models.wrap import quantize_model
    from qbert_deploy.recipe import Recipe, WeightQuant
    from qbert_deploy.runtimes.export_dir import labels_of, read_json

    if not texts:
        raise ValueError("calibrate() needs at least one text to observe activation ranges on")
    config_path = Path(model) / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{model}: not a Hugging Face model directory (no config.json)")
    config = read_json(config_path)
    names = list(labels) if labels else labels_of(config, config_path)
    recipe = Recipe(default=WeightQuant(bits=bits, groups=groups))
    network = load_base(Path(model), names).eval()
    quantize_model(network, recipe)
    tokenizer = AutoTokenizer.from_pretrained(model)
    inputs = family_of(config).inputs
    examples = [Example(text, 0) for text in texts]
    batches = ({k: torch.from_numpy(v) for k, v in encode(tokenizer, examples[i:i + batch_size], max_length,
                                                             inputs).items()}
               for i in range(0, len(examples), batch_size))
    observe_ranges(network, batches)
    with tempfile.TemporaryDirectory(prefix="qbert-calibrate-") as work:
        checkpoint = make_checkpoint(network, recipe, names, tokenizer_files(tokenizer, Path(work)),
                                     max_length=max_length)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(checkpoint, out)
    return checkpoint


def export(checkpoint: Checkpoint | PathLike, out: PathLike, *, lower: Sequence[str] = (), opset: int = 21,
           deploy: str | None = None, parity: bool = True, pack_3bit: bool = False,
           echo: Callable[[str], None] | None = None) -> ExportResult:
    """Export a model.pt (a path or a loaded Checkpoint) to the directory `out`, as `qbert-export` does.

    Writes QDQ ONNX with packed low-bit weights (model.onnx; opset 25 stores 2-bit weights as int2), config.json,
    the tokenizer and qbert_recipe.json, plus one model.PROFILE.onnx per profile in `lower` (cpu-w8a8,
    weight-only, cuda, cuda-fp16, cuda-fused, tensorrt); `deploy="cpu-w8a8"` makes `out` a deployment folder
    whose model.onnx is that profile's file (the canonical graph becomes model.canonical.onnx); `pack_3bit` stores
    the lowered files' 3-bit weights at 3 bits per value (smaller files, twice the peak memory at session start).
    The directory is checked, and with `parity` PyTorch fake-quant is compared with the file on text-like inputs
    (ParityError when the median error exceeds 0.5 output steps), before it replaces `out`: never half written.
    `echo` receives the parity lines.
    """
    from qbert_deploy.checkpoint import Checkpoint, load_checkpoint
    from qbert_deploy.exporters.onnx_export import export_checkpoint
    from qbert_deploy.validation.parity import export_verifier

    loaded = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    return export_checkpoint(loaded, out, opset=opset, lower=lower, pack_3bit=pack_3bit, deploy=deploy,
                             verify=export_verifier(loaded, echo or (lambda line: None)) if parity else None)


def validate(export_dir: PathLike, checkpoint: PathLike, data: PathLike, *, report_dir: PathLike | None = None,
             baseline: PathLike | None = None, write_baseline: PathLike | None = None,
             echo: Callable[[str], None] = print, **settings: Any) -> Report:
    """Compare an export with PyTorch on labelled `data` (an embedding model: texts), as `qbert-validate` does;
    `report.failures` is the gate.

    Backends: the fine-tuned fp32 model, PyTorch master weights and fake-quant, ORT with optimizations off, and
    ORT per profile (by default every profile the export holds plus the one qbert-serve ships). `settings` are
    `qbert_deploy.validation.run.Settings` fields: profiles=["canonical", "cpu-w8a8"], providers, batch_size,
    max_length, limit, layerwise, max_drop, min_agreement, max_error_steps, max_drop_vs_fp32, and for embedding
    models probe_train, min_cosine, min_neighbours. `report_dir`
    gets report.json, report.md and plots; `echo` the tables the command prints.
    """
    from qbert_deploy.validation.run import Settings, check_settings
    from qbert_deploy.validation.run import validate as run_validation

    for key in ("fp32", "probe_train"):
        if settings.get(key) is not None:
            settings[key] = Path(settings[key])
    options = Settings(**settings)
    check_settings(options)
    with tempfile.TemporaryDirectory(prefix="qbert-validate-") as work:
        return run_validation(Path(export_dir), Path(checkpoint), Path(data), options, Path(work),
                              baseline=_path(baseline), new_baseline=_path(write_baseline),
                              report_dir=_path(report_dir), progress=echo)


def _path(path: PathLike | None) -> Path | None:
    return None if path is None else Path(path)


def load_session(export_dir: PathLike, *, profile: str | None = None, providers: Sequence[str] = ("cpu",),
                 threads: int | None = None) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session on an export directory, as qbert-serve opens it.

    `profile=None` runs the first available provider's fast profile (cpu-w8a8 on the CPU): model.PROFILE.onnx
    when the export holds it, else model.onnx lowered in memory; "canonical" runs model.onnx as written. Inputs
    are int64 input_ids, attention_mask (and token_type_ids for BERT), any batch and length; the output is logits.
    """
    from qbert_deploy.runtimes.serving.model import open_served, served_file
    from qbert_deploy.runtimes.session import first_available

    served = served_file(export_dir, profile, first_available(providers))
    return open_served(served, providers, threads=threads)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'qbert_deploy' has no attribute {name!r}")
