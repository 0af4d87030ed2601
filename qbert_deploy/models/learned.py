"""Learned quantizer ranges (LSQ / LSQ+): per-group weight clipping ranges and activation ranges train with QAT.

A weight group's range [lo, hi] is a pair of parameters. The forward pass clips the group to [lo, hi] and then
quantizes it exactly as `group_qparams` would quantize the clipped weights (same `range_qparams`, same rounding),
with the LSQ gradient for the scale (Esser et al. 2020) scaled by 1/sqrt(group size * qmax); LSQ+ (Bhalgat et al.
2020) learns the offset too, which the asymmetric [lo, hi] pair does. After training, `bake_learned_ranges`
writes the clipped weights into the model: the min/max of each group is then exactly the learned range, so
model.pt keeps its contract (float weights, one scale and zero point per group recomputed from them) and every
exporter reproduces the learned scale and the trained integers bit for bit (the same idea as models/ptq.py).

Activation ranges learn the same way: `ActQuant.learned` replaces the moving-average range while training.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qbert_deploy.models.modules import ActQuant, QuantLinear
from qbert_deploy.models.ptq import mse_range
from qbert_deploy.models.quantizer import fake_quant_learned, int_range, range_qparams, resolve_groups
from qbert_deploy.recipe import WeightQuant

RANGE_INITS = ("minmax", "mse")


def learned_weight(weight: torch.Tensor, spec: WeightQuant, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Fake-quantized `weight` [rows, in] with its groups clipped to the trainable [lo, hi] (each [groups])."""
    qmin, qmax = int_range(spec.bits, spec.symmetric)
    count = resolve_groups(weight.shape[0], spec.groups)
    flat = weight.reshape(count, -1)
    clipped = torch.maximum(torch.minimum(flat, hi[:, None]), lo[:, None])
    scale, zero_point = range_qparams(clipped.min(dim=1).values, clipped.max(dim=1).values, qmin, qmax,
                                      spec.symmetric)
    grad_scale = 1.0 / math.sqrt(flat.shape[1] * qmax)
    out = fake_quant_learned(clipped, scale[:, None], zero_point[:, None], qmin, qmax, grad_scale)
    return out.reshape(weight.shape)


def clipped_weight(weight: torch.Tensor, spec: WeightQuant, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The float weights whose group min/max is the learned range: what model.pt stores."""
    count = resolve_groups(weight.shape[0], spec.groups)
    flat = weight.detach().reshape(count, -1)
    return torch.maximum(torch.minimum(flat, hi.detach()[:, None]), lo.detach()[:, None]).reshape(weight.shape)


@torch.no_grad()
def enable_learned_ranges(model: nn.Module, init: str = "mse", activations: bool = True) -> int:
    """Give every QuantLinear trainable group ranges (and every activation quantizer a trainable range).

    Call after calibration. Returns how many weight matrices got learned ranges.
    """
    if init not in RANGE_INITS:
        raise ValueError(f"unknown range initialisation {init!r}; choose from {', '.join(RANGE_INITS)}")
    count = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            spec = module.spec
            flat = module.weight.detach().float().reshape(resolve_groups(module.weight.shape[0], spec.groups), -1)
            if init == "mse":
                lo, hi = mse_range(flat, spec.bits, spec.symmetric)
            else:
                lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
            module.range_lo = nn.Parameter(lo.clone())
            module.range_hi = nn.Parameter(hi.clone())
            count += 1
        elif isinstance(module, ActQuant) and activations and bool(module.initialized):
            module.learned = nn.Parameter(module.range.detach().clone())
    return count


@torch.no_grad()
def bake_learned_ranges(model: nn.Module) -> None:
    """Write the learned ranges into the model (clipped weights, activation range buffers) and drop the parameters."""
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.range_lo is not None and module.range_hi is not None:
            module.weight.copy_(clipped_weight(module.weight, module.spec, module.range_lo, module.range_hi))
            module.range_lo = None
            module.range_hi = None
        elif isinstance(module, ActQuant) and module.learned is not None:
            module.range.copy_(module.learned.detach())
            module.learned = None
