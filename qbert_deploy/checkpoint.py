"""The model.pt contract: float weights + recipe + activation ranges, as plain tensors and values only.

A checkpoint is loaded with `torch.load(weights_only=True)`, so a file that holds code is refused, never run.
See docs/FORMAT.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qbert_deploy.atomic import atomic_file
from qbert_deploy.recipe import Recipe, RecipeError
from qbert_deploy.tasks import DEFAULT_TASK, FEATURE, TASKS

FORMAT_NAME = "qbert-deploy/model.pt"
FORMAT_VERSION = 1
OPTIONAL_KEYS = ("task", "max_length", "fp32_reference", "text_pairs")  # payload keys written only when set
MAX_TENSOR_ELEMENTS = 2**31  # no single tensor of a BERT comes near; bounds what a crafted file can make us allocate
# Weights and ranges beyond this are refused: no trained BERT comes near, and a min/max range wider than float32's
# 3.4e38 would overflow the quantizer's scale to inf.
MAX_ABS_VALUE = 1e30
# Tokenizer files land in the export directory: plain names only, never one of the export's own files.
TOKENIZER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
RESERVED_NAMES = frozenset({"model.onnx", "model.canonical.onnx", "config.json", "qbert_recipe.json",
                            "size_report.json", "size_report.md", "model.safetensors", "qbert_checkpoint.json"})
MAX_SEQUENCE_LENGTH = 1_048_576  # the config ceiling on max_position_embeddings (models/build.py)
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# What makes a Hugging Face model folder the model: its config and weights, not its tokenizer or our cache stamp.
FP32_MODEL_FILES = re.compile(r"config\.json|.+\.safetensors|.+\.bin|.+\.index\.json")


class CheckpointError(ValueError):
    """model.pt is missing, unsafe, corrupt, or does not follow the contract."""


def fp32_digest(folder: str | os.PathLike[str], names: re.Pattern[str] = FP32_MODEL_FILES) -> str:
    """sha256 over a Hugging Face model folder's config.json and weight files (names, sizes, bytes), or over the
    files whose names match `names`."""
    root = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in root.iterdir() if p.is_file() and names.fullmatch(p.name)):
        h.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Fp32Reference:
    """The fine-tuned fp32 model a checkpoint was quantized from: the real baseline of its quantization loss."""

    path: str  # relative to the folder holding model.pt where it can be, so a moved output folder still finds it
    sha256: str  # fp32_digest() of the folder when model.pt was written

    @classmethod
    def of(cls, folder: str | os.PathLike[str], checkpoint_path: str | os.PathLike[str],
           sha256: str | None = None) -> Fp32Reference:
        """`sha256`: the folder's fp32_digest when the caller has it already (hashing reads every weight byte)."""
        where = Path(os.path.abspath(folder))
        try:
            text = os.path.relpath(where, os.path.abspath(Path(checkpoint_path).parent))
        except ValueError:  # another drive (Windows): no relative path exists
            text = str(where)
        return cls(Path(text).as_posix(), sha256 or fp32_digest(where))

    def resolve(self, checkpoint_path: str | os.PathLike[str]) -> Path:
        """The folder, with a relative path taken from the folder holding model.pt."""
        path = Path(self.path)
        # normpath, as `of` made the relative path from normalized paths: OUT/model.pt's "../fp32" is a sibling
        return path if path.is_absolute() else Path(os.path.normpath(Path(checkpoint_path).parent / path))

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "sha256": self.sha256}


@dataclass
class Checkpoint:
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    recipe: Recipe
    activation_ranges: dict[str, list[float]]
    labels: list[str]
    tokenizer_files: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    task: str = DEFAULT_TASK  # qbert_deploy.tasks; files without it (format 1 as first written) are classifiers
    # Optional facts for validation (None in files written before they were recorded); not part of digest():
    # they do not change what an export computes.
    max_length: int | None = None  # the sequence length the model was trained and calibrated at
    fp32_reference: Fp32Reference | None = None  # the fine-tuned fp32 model it was quantized from
    text_pairs: bool | None = None  # sequence classification: trained on sentence pairs (True) or single texts

    def digest(self) -> str:
        """Hash of the weights, recipe and activation ranges: what an export must have been made from."""
        h = hashlib.sha256()
        for name in sorted(self.state_dict):
            tensor = self.state_dict[name].detach().cpu().contiguous()
            h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        h.update(self.recipe.dumps().encode())
        h.update(json.dumps(self.activation_ranges, sort_keys=True).encode())
        return h.hexdigest()

    def to_payload(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "config": self.config,
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in self.state_dict.items()},
            "recipe": self.recipe.to_json(),
            "activation_ranges": self.activation_ranges,
            "labels": list(self.labels),
            "tokenizer_files": dict(self.tokenizer_files),
            "metrics": dict(self.metrics),
        } | ({"task": self.task} if self.task != DEFAULT_TASK else {}) | self.optional_payload()

    def optional_payload(self) -> dict[str, Any]:
        """The optional keys that are set (absent ones are not written, so older files keep their bytes)."""
        out: dict[str, Any] = {}
        if self.max_length is not None:
            out["max_length"] = self.max_length
        if self.fp32_reference is not None:
            out["fp32_reference"] = self.fp32_reference.to_json()
        if self.text_pairs is not None:
            out["text_pairs"] = self.text_pairs
        return out


def save_checkpoint(checkpoint: Checkpoint, path: str | os.PathLike[str]) -> None:
    """Write model.pt atomically: a killed run leaves the old file or none, never a torn one."""
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        # through a handle, so the archive inside is named "archive", not after the random temp file:
        # the same checkpoint always gives the same bytes
        torch.save(checkpoint.to_payload(), handle)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckpointError(message)


def _read_payload(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": the error below says all that matters
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as err:
        # torch's weights-only unpickler names what it refused (a global, or an opcode a plain payload never uses)
        found = re.search(r"Unsupported (global: GLOBAL \S+|operand \d+)", str(err))
        detail = found.group(0) if found else str(err).strip().split("\n", 1)[0][:120]
        raise CheckpointError(f"{path}: refused to load: not made of plain tensors and values only, as a qbert "
                              f"checkpoint is ({detail})") from None
    except (EOFError, zipfile.BadZipFile, RuntimeError, OSError, ValueError, KeyError, IndexError,
            TypeError, AttributeError, UnicodeDecodeError, OverflowError, MemoryError) as err:
        raise CheckpointError(f"{path}: not a readable model.pt (truncated or corrupt: "
                              f"{type(err).__name__})") from None
    except Exception as err:  # the unpickler and zip reader raise many unrelated types on a corrupt file
        raise CheckpointError(f"{path}: not a readable model.pt (corrupt: {type(err).__name__})") from None


def _check_str_dict(value: Any, what: str, source: str = "model.pt") -> dict[str, Any]:
    _require(isinstance(value, dict) and all(isinstance(k, str) for k in value),
             f"{source}: '{what}' must be a dict with string keys")
    return dict(value)


def checkpoint_from_payload(payload: Any, source: str = "model.pt") -> Checkpoint:
    _require(isinstance(payload, dict) and payload.get("format") == FORMAT_NAME,
             f"{source}: not a qbert-deploy checkpoint (no '{FORMAT_NAME}' format marker)")
    version = payload.get("format_version")
    _require(version == FORMAT_VERSION,
             f"{source}: checkpoint format version {version!r} is not supported (this build reads {FORMAT_VERSION})")
    config = _check_str_dict(payload.get("config"), "config", source)
    state = _check_str_dict(payload.get("state_dict"), "state_dict", source)
    _require(len(state) > 0, f"{source}: state_dict is empty")
    for name, tensor in state.items():
        _require(isinstance(tensor, torch.Tensor), f"{source}: state_dict['{name}'] is not a tensor")
        _require(tensor.layout == torch.strided and not tensor.is_quantized,
                 f"{source}: state_dict['{name}'] is not a dense tensor ({tensor.layout})")
        _require(tensor.numel() <= MAX_TENSOR_ELEMENTS,
                 f"{source}: state_dict['{name}'] has {tensor.numel():,} elements, more than {MAX_TENSOR_ELEMENTS:,}")
        _require(not tensor.is_complex(), f"{source}: state_dict['{name}'] is complex ({tensor.dtype})")
        if tensor.is_floating_point() and tensor.numel():
            _require(bool(torch.isfinite(tensor).all()), f"{source}: state_dict['{name}'] holds NaN or Inf")
            peak = float(tensor.detach().abs().max())
            _require(peak <= MAX_ABS_VALUE,
                     f"{source}: state_dict['{name}'] holds a value of magnitude {peak:.3g}, beyond {MAX_ABS_VALUE:g}")
    try:
        recipe = Recipe.from_json(payload.get("recipe"))
    except RecipeError as err:
        raise CheckpointError(f"{source}: {err}") from None
    ranges = _check_str_dict(payload.get("activation_ranges", {}), "activation_ranges", source)
    for name, value in ranges.items():
        _require(isinstance(value, (list, tuple)) and len(value) == 2
                 and all(isinstance(v, (int, float)) and abs(v) <= MAX_ABS_VALUE for v in value)
                 and value[0] <= value[1], f"{source}: activation range of '{name}' must be [min, max], got {value!r}")
    labels = payload.get("labels")
    headless = payload.get("task") == FEATURE  # an embedding model has no head and no labels
    _require(isinstance(labels, list) and len(labels) >= (0 if headless else 1)
             and all(isinstance(x, str) for x in labels), f"{source}: 'labels' must be a non-empty list of label names")
    _require(len(set(labels)) == len(labels), f"{source}: 'labels' has duplicates: {labels!r}")
    tokenizer_files = _check_str_dict(payload.get("tokenizer_files", {}), "tokenizer_files", source)
    for key, text in tokenizer_files.items():
        _require(isinstance(text, str), f"{source}: tokenizer file '{key}' must be text")
        _require(bool(TOKENIZER_NAME.fullmatch(key)) and key not in RESERVED_NAMES,
                 f"{source}: tokenizer file name {key!r} is not a plain file name of its own")
    metrics = _check_str_dict(payload.get("metrics", {}), "metrics", source)
    _require(all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()),
             f"{source}: 'metrics' must map names to numbers")
    task = payload.get("task", DEFAULT_TASK)
    _require(task in TASKS, f"{source}: 'task' must be one of {', '.join(TASKS)}, got {task!r}")
    max_length = payload.get("max_length")
    _require(max_length is None or (isinstance(max_length, int) and not isinstance(max_length, bool)
                                    and 1 <= max_length <= MAX_SEQUENCE_LENGTH),
             f"{source}: 'max_length' must be an integer in 1..{MAX_SEQUENCE_LENGTH:,}, got {max_length!r}")
    text_pairs = payload.get("text_pairs")
    _require(text_pairs is None or (isinstance(text_pairs, bool) and task == DEFAULT_TASK),
             f"{source}: 'text_pairs' must be true or false, and only for {DEFAULT_TASK}, got {text_pairs!r}")
    return Checkpoint(config=config, state_dict=state, recipe=recipe,
                      activation_ranges={k: [float(v[0]), float(v[1])] for k, v in ranges.items()},
                      labels=list(labels), tokenizer_files=tokenizer_files, metrics=metrics, task=task,
                      max_length=max_length, fp32_reference=_fp32_reference(payload.get("fp32_reference"), source),
                      text_pairs=text_pairs)


def _fp32_reference(value: Any, source: str) -> Fp32Reference | None:
    if value is None:
        return None
    ref = _check_str_dict(value, "fp32_reference", source)
    path, digest = ref.get("path"), ref.get("sha256")
    _require(isinstance(path, str) and 0 < len(path) <= 4096 and "\0" not in path,
             f"{source}: 'fp32_reference' path must be a non-empty string")
    _require(isinstance(digest, str) and bool(SHA256_HEX.fullmatch(digest)),
             f"{source}: 'fp32_reference' sha256 must be 64 lowercase hex digits")
    assert isinstance(path, str) and isinstance(digest, str)
    return Fp32Reference(path, digest)


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Load and validate model.pt, or a safetensors checkpoint directory; failures are one-line CheckpointErrors."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        from qbert_deploy.safetensors_format import load_safetensors_checkpoint

        return load_safetensors_checkpoint(path)
    return checkpoint_from_payload(_read_payload(path), str(path))
