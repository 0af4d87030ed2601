"""Custom PyTorch ops that stand for ONNX QuantizeLinear/DequantizeLinear, and their ONNX translations.

Their eager bodies are the fake-quant math of `qbert_deploy.models.quantizer`, so the exported program computes
what the PyTorch model computes; the exporter turns each into Q/DQ through the translation table below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import opset21 as op


@torch.library.custom_op("qbert::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """Asymmetric uint8 activation fake quantization with constant parameters."""
    q = torch.clamp(torch.round(x / torch.tensor(scale, dtype=x.dtype)) + zero_point, 0, 255)
    return (q - zero_point) * torch.tensor(scale, dtype=x.dtype)


@quantize_dequantize.register_fake
def _(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("qbert::dequantize", mutates_args=())
def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    """Per-channel DequantizeLinear along `axis`."""
    shape = [1] * q.dim()
    shape[axis] = -1
    return (q.to(torch.float32) - zero_point.to(torch.float32).view(shape)) * scale.view(shape)


@dequantize.register_fake
def _(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


def _quantize_dequantize_onnx(x: Any, scale: float, zero_point: int) -> Any:
    s = op.Constant(value=ir.tensor(np.array(scale, dtype=np.float32)))  # type: ignore[arg-type]
    z = op.Constant(value=ir.tensor(np.array(zero_point, dtype=np.uint8)))  # type: ignore[arg-type]
    return op.DequantizeLinear(op.QuantizeLinear(x, s, z), s, z)  # type: ignore[type-var]


def _dequantize_onnx(q: Any, scale: Any, zero_point: Any, axis: int) -> Any:
    return op.DequantizeLinear(q, scale, zero_point, axis=axis)


TRANSLATION_TABLE: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.ops.qbert.quantize_dequantize.default: _quantize_dequantize_onnx,
    torch.ops.qbert.dequantize.default: _dequantize_onnx,
}
