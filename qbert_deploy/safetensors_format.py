"""The safetensors form of a checkpoint: a folder a Hugging Face user recognises, holding no pickle at all.

    model.safetensors       float weights under Hugging Face names
    config.json             the Hugging Face BertConfig
    qbert_checkpoint.json   format marker, recipe, activation ranges, labels, metrics, tokenizer file list (and the
                            optional task, max_length, fp32_reference and text_pairs)
    tokenizer files         as listed in qbert_checkpoint.json

It loads into the same `Checkpoint` as model.pt (same validation, same digest), so both export the same model.onnx.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qbert_deploy.atomic import atomic_dir
from qbert_deploy.checkpoint import (
    FORMAT_NAME,
    FORMAT_VERSION,
    OPTIONAL_KEYS,
    TOKENIZER_NAME,
    Checkpoint,
    CheckpointError,
    checkpoint_from_payload,
)

WEIGHTS_FILE = "model.safetensors"
META_FILE = "qbert_checkpoint.json"
CONFIG_FILE = "config.json"
MAX_JSON_BYTES = 64 * 2**20  # the JSON parts of a checkpoint are kilobytes; tokenizer.json is a few MB


def save_safetensors_checkpoint(checkpoint: Checkpoint, folder: str | os.PathLike[str]) -> None:
    """Write the folder atomically (whole or not at all)."""
    from safetensors.torch import save_file

    payload = checkpoint.to_payload()
    meta = {k: payload[k] for k in ("format", "format_version", "recipe", "activation_ranges", "labels", "metrics")}
    meta["tokenizer_files"] = sorted(checkpoint.tokenizer_files)
    meta |= {k: payload[k] for k in OPTIONAL_KEYS if k in payload}
    with atomic_dir(folder) as tmp:
        save_file(payload["state_dict"], str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
        (tmp / CONFIG_FILE).write_text(json.dumps(checkpoint.config, indent=2, sort_keys=True) + "\n")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for name, text in checkpoint.tokenizer_files.items():
            (tmp / name).write_text(text, encoding="utf-8")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {path.stat().st_size:,} bytes, more than a checkpoint's JSON ever holds")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({type(err).__name__})") from None


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise CheckpointError(f"{path}: tokenizer file listed in {META_FILE} is missing")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {path.stat().st_size:,} bytes, too large for a tokenizer file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text") from None


def _read_weights(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(err).__name__})") from None


def load_safetensors_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Load the folder (or its model.safetensors) and validate it exactly as model.pt is validated."""
    folder = Path(path)
    if folder.suffix == ".safetensors":
        folder = folder.parent
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such directory")
    meta = _read_json(folder / META_FILE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{folder / META_FILE}: not a qbert-deploy checkpoint (no '{FORMAT_NAME}' marker)")
    names = meta.get("tokenizer_files", [])
    if not isinstance(names, list) or not all(isinstance(n, str) and TOKENIZER_NAME.fullmatch(n) for n in names):
        raise CheckpointError(f"{folder / META_FILE}: 'tokenizer_files' must be a list of plain file names")
    payload = {
        "format": meta.get("format"),
        "format_version": meta.get("format_version", FORMAT_VERSION),
        "config": _read_json(folder / CONFIG_FILE),
        "state_dict": _read_weights(folder / WEIGHTS_FILE),
        "recipe": meta.get("recipe"),
        "activation_ranges": meta.get("activation_ranges", {}),
        "labels": meta.get("labels"),
        "tokenizer_files": {name: _read_text(folder / name) for name in names},
        "metrics": meta.get("metrics", {}),
    } | {k: meta[k] for k in OPTIONAL_KEYS if k in meta}
    return checkpoint_from_payload(payload, str(folder))


__all__ = ["load_safetensors_checkpoint", "save_safetensors_checkpoint"]
