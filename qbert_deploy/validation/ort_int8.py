"""ONNX Runtime's own int8, the anchor our exports are compared with: the fp32 model exported plainly (TorchScript
exporter, as Optimum does) and `quantize_dynamic` with signed int8 weights (ORT's default), scored on the same data.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qbert_deploy.atomic import atomic_dir
from qbert_deploy.exporters.onnx_export import LogitsOnly
from qbert_deploy.models.hf_compat import export_attention

EXAMPLE_LENGTH = 128  # the traced example's length; both axes are dynamic
Batch = tuple[dict[str, np.ndarray], np.ndarray]


def export_fp32_onnx(model: nn.Module, path: Path) -> Path:
    """The plain fp32 ONNX (opset 17) that ORT's own recipes start from; inputs input_ids, attention_mask,
    token_type_ids, output logits."""
    ids = torch.from_numpy(np.random.default_rng(0).integers(1000, 30000, size=(1, EXAMPLE_LENGTH)))
    example = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    dims = {0: "batch", 1: "sequence"}
    wrapped = LogitsOnly(model)
    # transformers 5's masking_utils graph is not what ORT's fusions match: export 4.x's attention form (hf_compat)
    with export_attention(model) as wrapped.mask, warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch").setLevel(logging.ERROR)
        torch.onnx.export(wrapped, example, str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["logits"],
                          dynamic_axes={"input_ids": dims, "attention_mask": dims, "token_type_ids": dims})
    return path


def dynamic_int8(source: Path, out: Path) -> Path:
    """quantize_dynamic with signed int8 weights (ORT's default); reuses `out` when it exists."""
    if not out.is_file():
        from onnx import TensorProto
        from onnxruntime.quantization import QuantType, quantize_dynamic

        logging.getLogger().setLevel(logging.ERROR)  # it warns about pre-processing on every call
        # fused graphs hold contrib ops that shape inference cannot type: say their outputs are float
        quantize_dynamic(str(source), str(out), weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": TensorProto.FLOAT})
    return out


@dataclass(frozen=True)
class OrtInt8:
    path: Path
    accuracy: float
    file_bytes: int

    def line(self) -> str:
        return (f"ORT int8 (quantize_dynamic) dev accuracy {100 * self.accuracy:.2f}% "
                f"(size {self.file_bytes / 2**20:.2f} MB)")


def ort_int8_accuracy(model: nn.Module, batches: Iterable[Batch], folder: Path) -> OrtInt8:
    """Export `model` (a sequence classifier) and quantize it into `folder` (fp32.onnx, fp32-int8.onnx, written
    whole or not at all), then score the int8 file on `batches` with the CPU provider."""
    from qbert_deploy.runtimes.session import open_session

    level = logging.getLogger().level
    try:
        with atomic_dir(folder) as tmp:
            dynamic_int8(export_fp32_onnx(model, tmp / "fp32.onnx"), tmp / "fp32-int8.onnx")
    finally:
        logging.getLogger().setLevel(level)  # quantize_dynamic's silencing is not the caller's
    path = folder / "fp32-int8.onnx"
    session = open_session(str(path))
    names = {i.name for i in session.get_inputs()}
    correct = total = 0
    for inputs, labels in batches:
        logits = np.asarray(session.run(["logits"], {k: v for k, v in inputs.items() if k in names})[0])
        correct += int((logits.argmax(-1) == labels).sum())
        total += len(labels)
    return OrtInt8(path, correct / max(total, 1), path.stat().st_size)
