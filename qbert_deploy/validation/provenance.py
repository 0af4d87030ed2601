"""Is this export made from this checkpoint? The export's metadata records the hashes it was made from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qbert_deploy.checkpoint import Checkpoint
from qbert_deploy.runtimes.export_dir import ExportDirError, model_files
from qbert_deploy.runtimes.trained_length import TrainedLengthError, read_metadata, recorded_max_length


class MismatchError(ValueError):
    """The export and the checkpoint do not belong together (a user error, not a failed gate)."""


@dataclass(frozen=True)
class ExportInfo:
    model_path: Path
    checkpoint_sha256: str
    recipe_sha256: str
    labels: list[str]
    weight_bits: dict[str, int]
    max_length: int | None = None  # the trained sequence length (qbert.max_length), when the export records it


def read_export_info(export_dir: Path) -> ExportInfo:
    """The qbert metadata of EXPORT_DIR/model.onnx (the weights themselves are not loaded)."""
    if not export_dir.is_dir():
        raise MismatchError(f"{export_dir}: no such export directory")
    try:
        path = model_files(export_dir).canonical
    except ExportDirError as err:
        raise MismatchError(str(err)) from None
    if not path.is_file():
        raise MismatchError(f"{export_dir}: no {path.name} (is it a qbert-export directory?)")
    try:
        props = read_metadata(path)
    except ValueError as err:
        raise MismatchError(str(err)) from None
    missing = [k for k in ("qbert.checkpoint_sha256", "qbert.recipe_sha256") if k not in props]
    if missing:
        raise MismatchError(f"{path}: no {missing[0]} metadata; it was not written by qbert-export")
    try:
        labels = json.loads(props.get("qbert.labels", "[]"))
        bits = json.loads(props.get("qbert.weight_bits", "{}"))
    except json.JSONDecodeError:
        raise MismatchError(f"{path}: qbert metadata is not valid JSON") from None
    try:
        max_length = recorded_max_length(props, str(path))
    except TrainedLengthError as err:
        raise MismatchError(str(err)) from None
    return ExportInfo(path, props["qbert.checkpoint_sha256"], props["qbert.recipe_sha256"], list(labels),
                      {str(k): int(v) for k, v in bits.items()}, max_length)


def check_match(info: ExportInfo, checkpoint: Checkpoint, checkpoint_path: str) -> None:
    """Raise MismatchError, naming what differs, unless the export was made from `checkpoint`."""
    if info.recipe_sha256 != checkpoint.recipe.digest():
        raise MismatchError(f"{info.model_path.parent} was exported with a different recipe than {checkpoint_path} "
                            f"(recipe sha256 {info.recipe_sha256[:12]} vs {checkpoint.recipe.digest()[:12]})")
    if info.checkpoint_sha256 != checkpoint.digest():
        raise MismatchError(f"{info.model_path.parent} was exported from a different checkpoint than "
                            f"{checkpoint_path} (weights sha256 {info.checkpoint_sha256[:12]} vs "
                            f"{checkpoint.digest()[:12]})")
    if info.labels and info.labels != checkpoint.labels:
        raise MismatchError(f"export labels {info.labels} differ from the checkpoint's {checkpoint.labels}")
