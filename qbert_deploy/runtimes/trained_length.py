"""What an export records of its training in its ONNX metadata (torch-free): the sequence length it was trained
and calibrated at, and whether a sequence classifier reads sentence pairs.

`qbert-quantize` records it in model.pt (`max_length`) and `qbert-export` copies it into model.onnx's
`metadata_props` as `qbert.max_length`; lowered files keep the canonical file's metadata, so the served file carries
it too. Exports written before it was recorded have none (None here). `qbert-validate` uses it as its default
`--max-length`; a server can use it to warn about, or cut at, the length the model has actually seen.
`qbert.text_pairs` ("true"/"false", from model.pt's `text_pairs`) tells qbert-serve which /classify form to take.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from qbert_deploy.runtimes.export_dir import model_files

MAX_LENGTH_KEY = "qbert.max_length"
TEXT_PAIRS_KEY = "qbert.text_pairs"


class TrainedLengthError(ValueError):
    """The model file cannot be read, or its recorded length is not a positive integer."""


def recorded_max_length(metadata: dict[str, str], source: str = "model.onnx") -> int | None:
    """`qbert.max_length` of a model's metadata_props (None when absent)."""
    text = metadata.get(MAX_LENGTH_KEY)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise TrainedLengthError(f"{source}: {MAX_LENGTH_KEY} metadata is {text!r}, not a positive integer")
    return value


def recorded_text_pairs(metadata: dict[str, str], source: str = "model.onnx") -> bool | None:
    """`qbert.text_pairs` of a model's metadata_props: True, False, or None when absent (an older export)."""
    text = metadata.get(TEXT_PAIRS_KEY)
    if text is None:
        return None
    if text not in ("true", "false"):
        raise TrainedLengthError(f"{source}: {TEXT_PAIRS_KEY} metadata is {text!r}, not true or false")
    return text == "true"


def trained_max_length(path: str | os.PathLike[str]) -> int | None:
    """The trained length of an export directory (its canonical graph) or of one ONNX file (e.g. model.cpu-w8a8.onnx);
    None for a model exported before the length was recorded."""
    file = Path(path)
    if file.is_dir():
        file = model_files(file).canonical
    if not file.is_file():
        raise TrainedLengthError(f"{file}: no such ONNX file")
    try:
        metadata = read_metadata(file)
    except ValueError as err:
        raise TrainedLengthError(str(err)) from None
    return recorded_max_length(metadata, str(file))


def read_metadata(file: Path) -> dict[str, str]:
    """The metadata_props of an ONNX file, its weights not loaded; a one-line ValueError for a file that is none."""
    try:
        model = onnx.load(str(file), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError and others without a common base
        raise ValueError(f"{file}: not a readable ONNX model ({type(err).__name__})") from None
    return {p.key: p.value for p in model.metadata_props}


__all__ = ["MAX_LENGTH_KEY", "TEXT_PAIRS_KEY", "TrainedLengthError", "read_metadata", "recorded_max_length",
           "recorded_text_pairs", "trained_max_length"]
