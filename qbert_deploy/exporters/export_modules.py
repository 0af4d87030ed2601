"""Export-time stand-ins for the quantized modules: integer weights as buffers, Q/DQ as custom ops.

Integers come from the same quantizer as PyTorch fake-quant, so PyTorch and the ONNX file agree bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qbert_deploy.exporters import torch_ops
from qbert_deploy.models.modules import QuantEmbedding, QuantLinear
from qbert_deploy.models.quantizer import group_qparams, quantize_rows
from qbert_deploy.recipe import WeightQuant


def _integer_weight(weight: torch.Tensor, spec: WeightQuant) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integers [rows, cols] in int8/uint8, per-row scale and zero point."""
    params = group_qparams(weight, spec.bits, spec.groups, spec.symmetric)
    q = quantize_rows(weight, params)
    scale, zero_point = params.per_row(weight.shape[0])
    dtype = torch.int8 if spec.symmetric else torch.uint8
    return q.to(dtype), scale.contiguous(), zero_point.to(dtype)


class ExportLinear(nn.Module):
    """y = DQ(Q(x)) @ DQ(W_int^T) + b, with W stored transposed [in, out] and dequantized on axis 1."""

    def __init__(self, source: QuantLinear) -> None:
        super().__init__()
        q, scale, zero_point = _integer_weight(source.weight, source.spec)
        self.register_buffer("weight_q", q.t().contiguous())
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zero_point)
        self.bias = source.bias
        self.spec = source.spec
        self.input_qparams = source.input_quant.qparams() if source.input_quant is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_qparams is not None:
            x = torch_ops.quantize_dequantize(x, *self.input_qparams)
        weight = torch_ops.dequantize(self.weight_q, self.weight_scale, self.weight_zero_point, 1)
        y = torch.matmul(x, weight)
        return y + self.bias if self.bias is not None else y


class ExportEmbedding(nn.Module):
    """Gather(DQ(E_int, per-row scale on axis 0), ids)."""

    def __init__(self, source: QuantEmbedding) -> None:
        super().__init__()
        q, scale, zero_point = _integer_weight(source.weight, source.spec)
        self.register_buffer("weight_q", q)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zero_point)
        self.spec = source.spec

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        table = torch_ops.dequantize(self.weight_q, self.weight_scale, self.weight_zero_point, 0)
        return F.embedding(ids, table)


def to_export_modules(model: nn.Module) -> dict[str, WeightQuant]:
    """Swap quantized modules for export modules in place; returns each quantized module's weight spec."""
    specs: dict[str, WeightQuant] = {}
    for name, module in list(model.named_modules()):
        replacement: nn.Module
        if isinstance(module, QuantLinear):
            replacement = ExportLinear(module)
        elif isinstance(module, QuantEmbedding):
            replacement = ExportEmbedding(module)
        else:
            continue
        specs[name] = module.spec
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, replacement)
    return specs
