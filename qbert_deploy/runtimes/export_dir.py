"""One validation of an export directory, shared by `qbert-export --check` and `qbert-serve`. Torch-free.

What a server needs from a directory, checked before it serves anything: config.json's types and their
consistency (`read_config`), the tokenizer (`load_tokenizer`), the graph's inputs and outputs against the config
(`check_signature`), and each model file against the sha256 qbert-export recorded for it in qbert_recipe.json
(`verify_file`). `--check` runs the same functions, so a directory it passes is one qbert-serve starts on. Every
problem is one `ExportDirError` line naming the file and the value.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tokenizers import Tokenizer

from qbert_deploy.atomic import write_text_atomic
from qbert_deploy.families import TEXT_INPUTS, Family, family_of
from qbert_deploy.tasks import (
    DEFAULT_TASK,
    FEATURE,
    QA,
    TOKEN,
    is_sentence_transformers_dir,
    task_kind,
    task_of_head,
)

RECIPE_FILE = "qbert_recipe.json"
FILES_KEY = "files"  # qbert_recipe.json: {file name: sha256 of its bytes} for model.onnx and each lowered file
# A deployment folder (`qbert-export --deploy PROFILE`) holds that profile's lowered graph as model.onnx, the file
# Optimum and other tools load by default, and the canonical graph as model.canonical.onnx; qbert_recipe.json names
# the profile under this key. Every reader finds its files through `model_files`.
DEPLOYED_KEY = "deployed"
CANONICAL_FILE = "model.onnx"
DEPLOYED_CANONICAL_FILE = "model.canonical.onnx"
MAX_POSITIONS = 1 << 20  # far above any encoder's table; beyond it tokenizers' truncation overflows
MAX_LABELS = 1 << 16  # a num_labels beyond this is a typo, and LABEL_i names for it would fill the memory
_LOWERED = re.compile(r"model\.(.+)\.onnx")


class ExportDirError(ValueError):
    """An export directory that cannot be served as it is."""


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, or a one-line error (unreadable, not JSON, or not an object)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ExportDirError(f"{path}: cannot read it ({type(err).__name__}: {str(err)[:160]})") from None
    if not isinstance(data, dict):
        raise ExportDirError(f"{path}: expected a JSON object, got a JSON {type(data).__name__}")
    return data


@dataclass(frozen=True)
class ModelFiles:
    """The ONNX files of an export directory: the canonical graph and each lowered profile's file."""

    canonical: Path
    lowered: dict[str, Path]  # profile -> file, by profile name
    deployed: str | None  # the profile served as model.onnx in a deployment folder, else None


def deployed_profile(folder: Path) -> str | None:
    """The profile a deployment folder's model.onnx is lowered for (qbert_recipe.json `deployed`), else None."""
    recipe = folder / RECIPE_FILE
    if not recipe.is_file():
        return None
    deployed = read_json(recipe).get(DEPLOYED_KEY)
    if deployed is not None and not (isinstance(deployed, str) and deployed and "/" not in deployed):
        raise ExportDirError(f"{recipe}: {DEPLOYED_KEY!r} must be a profile name, got {json.dumps(deployed)[:60]}")
    return deployed


def model_files(folder: str | os.PathLike[str]) -> ModelFiles:
    """Where the canonical and the lowered graphs of an export (or deployment) folder are."""
    folder = Path(folder)
    deployed = deployed_profile(folder)
    canonical = folder / (DEPLOYED_CANONICAL_FILE if deployed else CANONICAL_FILE)
    lowered = {match.group(1): p for p in folder.glob("model.*.onnx")
               if (match := _LOWERED.fullmatch(p.name)) and p != canonical}
    if deployed:
        lowered[deployed] = folder / CANONICAL_FILE
    return ModelFiles(canonical, dict(sorted(lowered.items())), deployed)


def _integer(config: Mapping[str, Any], key: str, path: Path, minimum: int, default: int | None = None,
             maximum: int | None = None) -> int:
    """config[key] as an int in [minimum, maximum]: JSON null, strings, floats, booleans and objects are refused."""
    if key not in config and default is None:
        raise ExportDirError(f"{path}: no {key}")
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ExportDirError(f"{path}: {key} must be an integer, got {json.dumps(value)[:60]}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"in {minimum}..{maximum}" if maximum is not None else f"at least {minimum}"
        raise ExportDirError(f"{path}: {key} must be {bound}, got {value}")
    return value


def labels_of(config: Mapping[str, Any], path: Path) -> list[str]:
    """Label names in id order: id2label (ids 0..n-1, each once), else LABEL_i for num_labels (default 2)."""
    id2label = config.get("id2label")
    if id2label is None or id2label == {}:
        return [f"LABEL_{i}" for i in range(_integer(config, "num_labels", path, 1, 2, MAX_LABELS))]
    if not isinstance(id2label, dict):
        raise ExportDirError(f"{path}: id2label must be an object of id -> name, got a JSON "
                             f"{type(id2label).__name__}")
    names: dict[int, str] = {}
    for key, name in id2label.items():
        if not (isinstance(key, str) and key.isdigit()) or not isinstance(name, str):
            raise ExportDirError(f"{path}: id2label entry {json.dumps(key)}: {json.dumps(name)[:40]} is not "
                                 "\"id\": \"name\"")
        names[int(key)] = name
    if sorted(names) != list(range(len(names))):
        raise ExportDirError(f"{path}: id2label ids must be 0..{len(names) - 1}, got {sorted(names)[:8]}")
    if "num_labels" in config and _integer(config, "num_labels", path, 1) != len(names):
        raise ExportDirError(f"{path}: num_labels is {config['num_labels']}, but id2label names {len(names)} labels")
    return [names[i] for i in range(len(names))]


@dataclass(frozen=True)
class ExportConfig:
    """config.json (and tokenizer_config.json) of an export, validated: what serving reads from them."""

    family: Family
    task: str
    labels: list[str]
    vocab_size: int
    type_vocab_size: int
    pad_id: int
    max_length: int  # the most tokens a sequence may have


def read_config(folder: str | os.PathLike[str]) -> ExportConfig:
    """The export's config.json, type-checked and consistent (pad id inside the vocabulary, room for a sequence)."""
    folder = Path(folder)
    path = folder / "config.json"
    config = read_json(path)
    try:
        family = family_of(config)
    except ValueError as err:
        raise ExportDirError(f"{path}: {err}") from None
    architectures = config.get("architectures")
    if architectures is not None and not (isinstance(architectures, list)
                                          and all(isinstance(a, str) for a in architectures)):
        raise ExportDirError(f"{path}: architectures must be a list of names, got {json.dumps(architectures)[:60]}")
    vocab_size = _integer(config, "vocab_size", path, 1)
    type_vocab_size = _integer(config, "type_vocab_size", path, 1, 2)
    pad = config.get("pad_token_id")
    pad_id = 0 if pad is None else _integer(config, "pad_token_id", path, 0)  # null: no pad token, pad with 0
    if pad_id >= vocab_size:
        raise ExportDirError(f"{path}: pad_token_id {pad_id} is outside the vocabulary (vocab_size {vocab_size})")
    positions = _integer(config, "max_position_embeddings", path, 1, 512, MAX_POSITIONS)
    offset = pad_id + 1 if family.position_offset_from_padding else 0  # RoBERTa's positions start after padding
    max_length = positions - offset
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        declared = read_json(tokenizer_config).get("model_max_length")
        if isinstance(declared, int) and not isinstance(declared, bool) and 0 < declared < 1_000_000:
            max_length = min(max_length, declared)  # HF writes a huge sentinel when unset
    if max_length < 2:  # the exported graph's sequence axis starts at 2 ([CLS] text [SEP] needs it anyway)
        raise ExportDirError(f"{path}: max_position_embeddings {positions} leaves {max_length} tokens per "
                             "sequence; at least 2 are needed")
    task = task_of_head(architectures)
    if task is None and is_sentence_transformers_dir(folder):
        task = FEATURE  # a headless encoder in a sentence-transformers directory is an embedding model
    task = task or DEFAULT_TASK
    labels = [] if task == FEATURE else labels_of(config, path)
    return ExportConfig(family, task, labels, vocab_size, type_vocab_size, pad_id, max_length)


def load_tokenizer(folder: str | os.PathLike[str], config: ExportConfig) -> Tokenizer:
    """The export's tokenizer.json as a `tokenizers.Tokenizer`; every id it can produce must be in the vocabulary."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise ExportDirError(f"{Path(folder)}: no tokenizer.json (qbert-serve tokenizes with it; vocab.txt alone "
                             "is not enough)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers library raises its own untyped exceptions
        raise ExportDirError(f"{path}: cannot load it ({str(err)[:200]})") from None
    largest = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    if largest >= config.vocab_size:
        raise ExportDirError(f"{path}: produces token id {largest}, outside the model's vocabulary "
                             f"(config.json vocab_size {config.vocab_size})")
    return tokenizer


class TensorInfo(Protocol):
    """What onnxruntime's NodeArg tells about a graph input or output."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> Sequence[int | str | None]: ...

    @property
    def type(self) -> str: ...


def _fixed(dim: int | str | None) -> bool:
    return isinstance(dim, int) and dim >= 0


def check_signature(config: ExportConfig, inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo],
                    path: Path) -> None:
    """The graph takes what qbert-serve feeds (int64 [batch, sequence], any batch and length) and gives the
    config's task outputs with one score per label."""
    names = [i.name for i in inputs]
    if "input_ids" not in names or not set(names) <= set(TEXT_INPUTS):
        raise ExportDirError(f"{path}: inputs {names} are not a subset of {list(TEXT_INPUTS)} with input_ids")
    for tensor in inputs:
        shape = list(tensor.shape)
        if tensor.type != "tensor(int64)" or len(shape) != 2:
            raise ExportDirError(f"{path}: input {tensor.name!r} is {tensor.type} {shape}; qbert-serve feeds "
                                 "int64 [batch, sequence]")
        fixed = [(axis, dim) for axis, dim in zip(("batch", "sequence"), shape, strict=True) if _fixed(dim)]
        if fixed:  # the batcher pads each batch to its own longest row, so no axis may be fixed
            raise ExportDirError(f"{path}: input {tensor.name!r} has a fixed {fixed[0][0]} size of {fixed[0][1]}; "
                                 "qbert-serve needs both axes dynamic")
    found = {o.name: list(o.shape) for o in outputs}
    ranks = {QA: 2, TOKEN: 3}
    embedding_ranks = {"last_hidden_state": 3, "sentence_embedding": 2}
    for name in task_kind(config.task).outputs:
        if name not in found:
            raise ExportDirError(f"{path}: no {name!r} output (a {config.task} model gives "
                                 f"{list(task_kind(config.task).outputs)}; outputs here: {list(found)})")
        shape = found[name]
        rank = embedding_ranks[name] if config.task == FEATURE else ranks.get(config.task, 2)
        if len(shape) != rank:
            raise ExportDirError(f"{path}: output {name!r} has rank {len(shape)} {shape}, a {config.task} model's "
                                 f"has rank {rank} (config.json architectures vs the graph)")
        last = shape[-1]
        if config.task not in (QA, FEATURE) and isinstance(last, int) and last >= 0:  # dynamic: checked at warm-up
            check_label_count(config, last, path)


def check_label_count(config: ExportConfig, scores: int, path: Path) -> None:
    """The config's labels against the scores per row the model gives."""
    if config.task not in (QA, FEATURE) and scores != len(config.labels):
        raise ExportDirError(f"{path}: the model gives {scores} scores per {'token' if config.task == TOKEN else 'row'}"
                             f", config.json names {len(config.labels)} labels ({', '.join(config.labels[:5])}"
                             f"{', ...' if len(config.labels) > 5 else ''})")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recorded_files(folder: Path) -> dict[str, str]:
    """The sha256 qbert_recipe.json records for each model file; an export written before the record has none."""
    records = read_json(folder / RECIPE_FILE).get(FILES_KEY, {})
    if not isinstance(records, dict) or not all(isinstance(v, str) for v in records.values()):
        raise ExportDirError(f"{folder / RECIPE_FILE}: {FILES_KEY!r} must be an object of file name -> sha256")
    return records


class UnverifiedFileError(ExportDirError):
    """A model file that does not match, or has no, sha256 recorded in qbert_recipe.json."""


def verify_file(folder: str | os.PathLike[str], path: str | os.PathLike[str]) -> str:
    """Check a model file of the export against the sha256 qbert_recipe.json records for it; returns the digest."""
    folder, path = Path(folder), Path(path)
    if not (folder / RECIPE_FILE).is_file():
        raise UnverifiedFileError(f"{folder}: no {RECIPE_FILE}, so {path.name} cannot be verified")
    records = recorded_files(folder)
    if not records:
        raise UnverifiedFileError(f"{folder / RECIPE_FILE}: records no sha256 of the model files (an export from "
                                  f"before they were recorded), so {path.name} cannot be verified; export again")
    if path.name not in records:
        raise UnverifiedFileError(f"{path}: {RECIPE_FILE} records no sha256 for it (only for "
                                  f"{', '.join(sorted(records))}), so it cannot be verified; lowered files come from "
                                  "qbert-export --lower or runtimes.lowering.lower_in_export")
    actual = file_sha256(path)
    if actual != records[path.name]:
        raise UnverifiedFileError(f"{path}: sha256 {actual[:12]} differs from the {records[path.name][:12]} recorded "
                                  f"in {RECIPE_FILE}: the file changed after export")
    return actual


def record_files(folder: Path, names: Sequence[str]) -> None:
    """Record the sha256 of these model files in the export's qbert_recipe.json (rewritten atomically)."""
    data = read_json(folder / RECIPE_FILE)
    records = dict(data.get(FILES_KEY) or {})
    records.update({name: file_sha256(folder / name) for name in names})
    data[FILES_KEY] = dict(sorted(records.items()))
    write_text_atomic(folder / RECIPE_FILE, json.dumps(data, indent=2, sort_keys=True) + "\n")


__all__ = ["CANONICAL_FILE", "DEPLOYED_CANONICAL_FILE", "DEPLOYED_KEY", "FILES_KEY", "RECIPE_FILE", "ExportConfig",
           "ExportDirError", "ModelFiles", "UnverifiedFileError", "check_label_count", "check_signature",
           "deployed_profile", "file_sha256", "labels_of", "load_tokenizer", "model_files",
           "read_config", "read_json", "record_files", "recorded_files", "verify_file"]
