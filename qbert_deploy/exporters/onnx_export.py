"""The export pass: model.pt -> canonical QDQ ONNX with packed low-bit weights and per-group scales."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import torch
from torch import nn

from qbert_deploy.atomic import atomic_dir
from qbert_deploy.checkpoint import Checkpoint
from qbert_deploy.exporters import torch_ops
from qbert_deploy.exporters.check import check_export, weights_sha256
from qbert_deploy.exporters.export_modules import to_export_modules
from qbert_deploy.exporters.passes import (
    dedicate_input_quant,
    name_quant_nodes,
    pack_weights,
    simplify,
    strip_metadata,
    strip_prefix,
)
from qbert_deploy.exporters.size_report import size_markdown, size_report
from qbert_deploy.families import TEXT_INPUTS, family, family_of
from qbert_deploy.models.build import build_model, estimated_parameters
from qbert_deploy.models.hf_compat import export_attention
from qbert_deploy.models.prune import order_by_bits
from qbert_deploy.runtimes.export_dir import (
    CANONICAL_FILE,
    DEPLOYED_CANONICAL_FILE,
    DEPLOYED_KEY,
    RECIPE_FILE,
    model_files,
    record_files,
)
from qbert_deploy.runtimes.lowering import lower as lower_file
from qbert_deploy.runtimes.lowering import lowered_path, profile_info
from qbert_deploy.runtimes.trained_length import MAX_LENGTH_KEY, TEXT_PAIRS_KEY
from qbert_deploy.tasks import FEATURE, architecture, task_kind
from qbert_deploy.tasks.embeddings import pooling_of_model, write_sentence_transformers_files

SUPPORTED_OPSETS = (21, 25)
EXPORT_OPSET = 21  # what the exporter emits; a newer target only widens the types Q/DQ may take
INPUT_NAMES = TEXT_INPUTS  # the most a graph takes; DistilBERT's and RoBERTa's have no token_type_ids


class ExportError(ValueError):
    """The checkpoint cannot be exported as asked."""


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    model_path: Path
    size: dict[str, Any]
    lowered: dict[str, Path] = field(default_factory=dict)  # profile -> OUT/model.<profile>.onnx


class LogitsOnly(nn.Module):
    """The model as a function of its family's inputs to its task's outputs (logits, or QA's start/end logits):
    the exported signature."""

    def __init__(self, model: nn.Module, outputs: tuple[str, ...] = ("logits",)) -> None:
        super().__init__()
        self.model = model
        self.outputs = outputs
        self.mask: Callable[[torch.Tensor], torch.Tensor] = lambda mask: mask  # see hf_compat.export_attention
        config = getattr(model, "config", None)
        self.zero_token_types = config is not None and "token_type_embeddings" in family(config.model_type).embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if token_type_ids is None and self.zero_token_types:
            # RoBERTa's one token type as zeros: transformers 5 would gather it from a buffer by position id
            token_type_ids = torch.zeros_like(input_ids)
        types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        if getattr(self.model, "pools_tokens", False):  # pooling reads the graph's 2-D mask, not the attention's
            types["pooling_mask"] = attention_mask
        out = self.model(input_ids=input_ids, attention_mask=self.mask(attention_mask), **types)
        tensors: tuple[torch.Tensor, ...] = tuple(out[name] for name in self.outputs)
        return tensors[0] if len(tensors) == 1 else tensors


def _versions() -> dict[str, str]:
    found = {}
    for package in ("torch", "onnx", "onnxruntime", "onnxscript", "onnx-ir", "transformers", "qbert-deploy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    return found


def _torch_export(model: nn.Module, max_positions: int, inputs: tuple[str, ...] = TEXT_INPUTS,
                  outputs: tuple[str, ...] = ("logits",)) -> ir.Model:
    wrapped = LogitsOnly(model, outputs).eval()
    example = (torch.ones(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long),
               torch.zeros(2, 8, dtype=torch.long))[:len(inputs)]
    batch = torch.export.Dim("batch", max=1 << 16)
    sequence = torch.export.Dim("sequence", min=2, max=max_positions)
    dims = {0: batch, 1: sequence}
    quiet = io.StringIO()
    with (export_attention(model) as wrapped.mask, warnings.catch_warnings(), contextlib.redirect_stdout(quiet),
          contextlib.redirect_stderr(quiet)):
        warnings.simplefilter("ignore")
        # The exporter and its graph optimizer narrate every step at INFO; a user only needs our summary.
        for name in ("torch", "onnxscript", "onnx_ir"):
            logging.getLogger(name).setLevel(logging.ERROR)
        program = torch.onnx.export(
            wrapped, example, dynamo=True, opset_version=EXPORT_OPSET, optimize=False,
            input_names=list(inputs), output_names=list(outputs),
            dynamic_shapes={name: dims for name in inputs},
            custom_translation_table=torch_ops.TRANSLATION_TABLE, verbose=False)
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    model_ir: ir.Model = program.model
    simplify(model_ir)
    strip_prefix(model_ir, "model.")
    return model_ir


def _fp32_bytes(checkpoint: Checkpoint) -> int:
    """float32 bytes of the model's weights; a pruned model is compared with its unpruned fp32 model."""
    if checkpoint.recipe.structure is not None:
        return 4 * estimated_parameters(checkpoint.config, len(checkpoint.labels))
    return sum(t.numel() * 4 for t in checkpoint.state_dict.values() if t.is_floating_point())


def export_checkpoint(checkpoint: Checkpoint, out_dir: str | os.PathLike[str], opset: int = 21,
                      lower: Sequence[str] = (), pack_3bit: bool = False,
                      verify: Callable[[Path], None] | None = None, deploy: str | None = None) -> ExportResult:
    """Export `checkpoint` into `out_dir` (created or replaced whole; never left half written).

    `lower` also writes model.<profile>.onnx for each profile (3-bit weights in int4 containers unless `pack_3bit`).
    `deploy` makes a deployment folder: that profile's lowered graph is its model.onnx, the file Optimum and other
    tools load by default, and the canonical graph is model.canonical.onnx (recorded in qbert_recipe.json).
    Everything happens in a temporary directory beside `out_dir`: the files are written, their sha256 recorded in
    qbert_recipe.json, the directory passes `check_export` (what `qbert-export --check` runs) and then
    `verify(temporary model.onnx)` (the CLI's parity check); only then does it take the place of `out_dir`. Any
    failure or interrupt before that leaves `out_dir` as it was.
    """
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(f"opset {opset} is not supported; choose one of {SUPPORTED_OPSETS}")
    deployed = profile_info(deploy).name if deploy is not None else None
    profiles = list(dict.fromkeys(profile_info(name).name for name in [*lower, *([deployed] if deployed else [])]))
    _check_replaceable(Path(out_dir))
    model = build_model(checkpoint)
    order_by_bits(model)  # rows of one width contiguous in each mixed matrix (a no-op when already so)
    specs = to_export_modules(model)
    family = family_of(checkpoint.config)
    graph = _torch_export(model, family.max_tokens(checkpoint.config), family.inputs,
                          task_kind(checkpoint.task).outputs)
    pack_weights(graph, specs, opset)
    dedicate_input_quant(graph)
    strip_metadata(graph)
    name_quant_nodes(graph, specs)
    graph.opset_imports[""] = opset
    graph.producer_name, graph.producer_version = "qbert-deploy", _versions().get("qbert-deploy", "0")
    graph.graph.name = "qbert"
    bits = {name: spec.bits for name, spec in specs.items()}
    weights_digest = weights_sha256(graph)
    graph.metadata_props.update({
        "qbert.format_version": "1",
        "qbert.recipe": checkpoint.recipe.dumps(),
        "qbert.recipe_sha256": checkpoint.recipe.digest(),
        "qbert.checkpoint_sha256": checkpoint.digest(),
        "qbert.weights_sha256": weights_digest,
        "qbert.weight_bits": json.dumps(bits, sort_keys=True),
        "qbert.labels": json.dumps(checkpoint.labels),
        "qbert.task": checkpoint.task,
        "qbert.versions": json.dumps(_versions(), sort_keys=True),
    })
    if checkpoint.max_length is not None:  # the length it was trained at, for validation and serving to read
        graph.metadata_props[MAX_LENGTH_KEY] = str(checkpoint.max_length)
    if checkpoint.text_pairs is not None:  # which text form qbert-serve's /classify takes
        graph.metadata_props[TEXT_PAIRS_KEY] = "true" if checkpoint.text_pairs else "false"
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        model_path = tmp / "model.onnx"
        ir.save(graph, model_path)
        try:
            onnx.checker.check_model(str(model_path), full_check=True)
        except onnx.checker.ValidationError as err:
            raise ExportError(f"exported model fails the ONNX checker: {str(err).splitlines()[0]}") from None
        report = size_report(graph, specs, _fp32_bytes(checkpoint), model_path.stat().st_size)
        _write_side_files(tmp, checkpoint, report, weights_digest, deployed)
        for profile in profiles:
            lower_file(model_path, profile, lowered_path(tmp, profile), pack_3bit=pack_3bit)
        if deployed is not None:
            model_path = _as_deployment(tmp, deployed)
        files = model_files(tmp)
        record_files(tmp, [files.canonical.name, *(path.name for path in files.lowered.values())])
        failed = [r for r in check_export(tmp) if not r.ok]
        if failed:
            raise ExportError(f"the export fails its own check, {failed[0].name}: {failed[0].detail}")
        if verify is not None:
            verify(model_path)
    return ExportResult(out, out / files.canonical.name, report,
                        {profile: out / path.name for profile, path in files.lowered.items()})


def _as_deployment(folder: Path, profile: str) -> Path:
    """Put the files of an export folder in a deployment folder's places for `profile` (qbert_recipe.json already
    names it); returns where the canonical graph now is."""
    canonical = folder / DEPLOYED_CANONICAL_FILE
    (folder / CANONICAL_FILE).rename(canonical)
    lowered_path(folder, profile).rename(folder / CANONICAL_FILE)
    return canonical


def _check_replaceable(out: Path) -> None:
    """The export dir is replaced whole, so never take the place of a folder that is not an earlier export."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "model.onnx").is_file():
        raise ExportError(f"{out}: a non-empty directory that is not an export (no model.onnx); "
                          "refusing to replace it")


def _write_side_files(folder: Path, checkpoint: Checkpoint, report: dict[str, Any], weights_digest: str,
                      deployed: str | None) -> None:
    config = dict(checkpoint.config)
    if checkpoint.task == FEATURE:  # no head: no label keys (transformers' defaults stay out of the way)
        for key in ("id2label", "label2id", "num_labels"):
            config.pop(key, None)
    else:
        config["id2label"] = {str(i): label for i, label in enumerate(checkpoint.labels)}
        config["label2id"] = {label: i for i, label in enumerate(checkpoint.labels)}
        config["num_labels"] = len(checkpoint.labels)
    # what Optimum and transformers pipelines read to pick the head
    config["architectures"] = [architecture(str(config.get("model_type", "bert")), checkpoint.task)]
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name, text in checkpoint.tokenizer_files.items():
        (folder / name).write_text(text, encoding="utf-8")
    recipe = checkpoint.recipe.to_json() | {"checkpoint_sha256": checkpoint.digest(), "weights_sha256": weights_digest}
    if deployed is not None:  # a deployment folder (`_as_deployment` puts its files in place)
        recipe[DEPLOYED_KEY] = deployed
    (folder / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
    (folder / "size_report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    (folder / "size_report.md").write_text(size_markdown(report))
    if checkpoint.task == FEATURE:  # also a sentence-transformers directory, pooling as in the graph
        write_sentence_transformers_files(folder, pooling_of_model(checkpoint.config),
                                          int(config.get("hidden_size", config.get("dim", 0))), checkpoint.max_length)
