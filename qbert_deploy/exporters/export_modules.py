"""Export-time stand-ins for the quantized modules: integer weights as buffers, Q/DQ as custom ops.

Integers come from the same quantizer as PyTorch fake-quant, so PyTorch and the ONNX file agree bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qbert_deploy.exporters import torch_ops
from qbert_deploy.models.modules import QuantEmbedding, QuantLinear
from qbert_deploy.models.prune import MixedQuantLinear
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


class _RowBlock(nn.Module):
    """Rows of one width of a mixed matrix: integers [in, rows] at that width, per-row scale, its bias slice."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: WeightQuant) -> None:
        super().__init__()
        q, scale, zero_point = _integer_weight(weight, spec)
        self.register_buffer("weight_q", q.t().contiguous())
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zero_point)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch_ops.dequantize(self.weight_q, self.weight_scale, self.weight_zero_point, 1)
        y = torch.matmul(x, weight)
        return y + self.bias if self.bias is not None else y


class ExportMixedLinear(nn.Module):
    """A matrix whose rows have several widths: one block per width (`M.w8`, `M.w4`, ...), each stored packed at
    its own width and multiplied on its own, the outputs concatenated. Rows of a width must be contiguous
    (`order_by_bits` makes them so), so no Gather is needed."""

    def __init__(self, source: MixedQuantLinear) -> None:
        super().__init__()
        runs: list[tuple[int, int, int]] = []  # (bits, first row, end row)
        for row, bits in enumerate(source.row_bits):
            if runs and runs[-1][0] == bits:
                runs[-1] = (bits, runs[-1][1], row + 1)
            else:
                if any(r[0] == bits for r in runs):
                    raise ValueError(f"rows of {bits} bits are not contiguous; order the model by bits first")
                runs.append((bits, row, row + 1))
        self.block_names = tuple(f"w{bits}" for bits, _, _ in runs)  # submodules, so names read M.w8.weight_q
        for bits, start, end in runs:
            self.add_module(f"w{bits}", _RowBlock(source.weight[start:end],
                                                  None if source.bias is None else source.bias[start:end],
                                                  WeightQuant(bits=bits, groups=None,
                                                              symmetric=source.spec.symmetric)))
        self.input_qparams = source.input_quant.qparams() if source.input_quant is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_qparams is not None:
            x = torch_ops.quantize_dequantize(x, *self.input_qparams)
        return torch.cat([self.get_submodule(name)(x) for name in self.block_names], dim=-1)

    def blocks(self) -> dict[str, _RowBlock]:
        return {name: block for name in self.block_names
                if isinstance(block := self.get_submodule(name), _RowBlock)}


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
        if isinstance(module, MixedQuantLinear):
            mixed = ExportMixedLinear(module)
            specs.update({f"{name}.{key}": block.spec for key, block in mixed.blocks().items()})
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, mixed)
            continue
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
