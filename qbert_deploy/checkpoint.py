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
from qbert_deploy.tasks import DEFAULT_TASK, TASKS

FORMAT_NAME = "qbert-deploy/model.pt"
FORMAT_VERSION = 1
MAX_TENSOR_ELEMENTS = 2**31  # no single tensor of a BERT comes near; bounds what a crafted file can make us allocate
# Weights and ranges beyond this are refused: no trained BERT comes near, and a min/max range wider than float32's
# 3.4e38 would overflow the quantizer's scale to inf.
MAX_ABS_VALUE = 1e30
# Tokenizer files land in the export directory: plain names only, never one of the export's own files.
TOKENIZER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
RESERVED_NAMES = frozenset({"model.onnx", "config.json", "qbert_recipe.json", "size_report.json", "size_report.md",
                            "model.safetensors", "qbert_checkpoint.json"})


class CheckpointError(ValueError):
    """model.pt is missing, unsafe, corrupt, or does not follow the contract."""


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
        } | ({"task": self.task} if self.task != DEFAULT_TASK else {})


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
    _require(isinstance(labels, list) and len(labels) >= 1 and all(isinstance(x, str) for x in labels),
             f"{source}: 'labels' must be a non-empty list of label names")
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
    return Checkpoint(config=config, state_dict=state, recipe=recipe,
                      activation_ranges={k: [float(v[0]), float(v[1])] for k, v in ranges.items()},
                      labels=list(labels), tokenizer_files=tokenizer_files, metrics=metrics, task=task)


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Load and validate model.pt, or a safetensors checkpoint directory; failures are one-line CheckpointErrors."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        from qbert_deploy.safetensors_format import load_safetensors_checkpoint

        return load_safetensors_checkpoint(path)
    return checkpoint_from_payload(_read_payload(path), str(path))
