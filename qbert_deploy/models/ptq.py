"""Post-training weight clipping (LQ, ACIQ, OCS) expressed in the float master weights of model.pt.

The quantizer takes the min/max of each group of float weights, so quantizing clamp(w, lo, hi) with its own
min/max is exactly clipped quantization with range [lo, hi]: a clipping method needs nothing but the clipped
float weights in model.pt, and every exporter and runtime reproduces it unchanged.

- LQ: plain linear min/max quantization, no clipping.
- MSE: each group clipped at the fraction of its min/max range that minimises the squared quantization error
  (a grid search); also how learned ranges start (models/learned.py).
- ACIQ (Banner et al. 2019): clip each group at mean +- alpha*b, b = mean |w - mean| (Laplace fit), alpha
  optimal for the bit width.
- OCS (Zhao et al. 2019): outlier channel splitting duplicates the input channel holding the largest |w| and
  halves it, until `expand_ratio` of the input channels are split; the range of every group shrinks to that of
  the split matrix. model.pt fixes the shapes by its config, so the duplicated channels cannot be stored: we keep
  OCS's shrunken range per group and clip the split channels into it (the extra channels are merged back as if
  their halves had to share the original column's grid). This is OCS's grid without its extra columns: a lower
  bound of what OCS with wider layers would reach.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qbert_deploy.models.quantizer import int_range, range_qparams, resolve_groups
from qbert_deploy.models.wrap import quantizable_linears
from qbert_deploy.recipe import Recipe

CLIP_METHODS = ("lq", "aciq", "ocs", "mse")
MSE_GRID = torch.linspace(0.2, 1.0, 81)
# Optimal clipping of a Laplace(b) variable for 2^bits levels, in units of b (Banner et al. 2019, table 1).
ACIQ_LAPLACE_ALPHA = {2: 2.83, 3: 3.89, 4: 5.03, 5: 6.20, 6: 7.41, 7: 8.64, 8: 9.89}
OCS_EXPAND_RATIO = 0.05


def aciq_range(flat: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (group) clipping range of `flat` [groups, n] under a Laplace fit."""
    mean = flat.mean(dim=1)
    b = (flat - mean[:, None]).abs().mean(dim=1)
    alpha = ACIQ_LAPLACE_ALPHA[bits] * b
    return torch.maximum(mean - alpha, flat.min(dim=1).values), torch.minimum(mean + alpha, flat.max(dim=1).values)


@torch.no_grad()
def mse_range(flat: torch.Tensor, bits: int, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (group) range alpha*[min, max] of `flat` [groups, n], alpha from MSE_GRID minimising the error."""
    qmin, qmax = int_range(bits, symmetric)
    lo0, hi0 = flat.min(dim=1).values, flat.max(dim=1).values
    best = torch.full_like(lo0, float("inf"))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for alpha in MSE_GRID.tolist():
        lo, hi = alpha * lo0, alpha * hi0
        clipped = torch.maximum(torch.minimum(flat, hi[:, None]), lo[:, None])
        scale, zero = range_qparams(clipped.min(dim=1).values, clipped.max(dim=1).values, qmin, qmax, symmetric)
        q = (torch.round(clipped / scale[:, None]) + zero[:, None]).clamp(qmin, qmax)
        error = (((q - zero[:, None]) * scale[:, None] - flat) ** 2).sum(dim=1)
        better = error < best
        best = torch.where(better, error, best)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_lo, best_hi


def ocs_split(weight: torch.Tensor, expand_ratio: float = OCS_EXPAND_RATIO) -> torch.Tensor:
    """The [out, in + k] weight after splitting k input channels OCS's way (largest |w| first, halved each time)."""
    columns = [c.clone() for c in weight.detach().float().t()]  # one tensor per input channel
    for _ in range(math.ceil(expand_ratio * weight.shape[1])):
        peaks = torch.stack([c.abs().max() for c in columns])
        j = int(peaks.argmax())
        half = columns[j] / 2
        columns[j] = half
        columns.append(half.clone())
    return torch.stack(columns, dim=1)


def ocs_range(weight: torch.Tensor, groups: int | None, expand_ratio: float = OCS_EXPAND_RATIO
              ) -> tuple[torch.Tensor, torch.Tensor]:
    count = resolve_groups(weight.shape[0], groups)
    split = ocs_split(weight, expand_ratio).reshape(count, -1)
    return split.min(dim=1).values, split.max(dim=1).values


def clipped(weight: torch.Tensor, method: str, bits: int, groups: int | None) -> torch.Tensor:
    """`weight` [out, in] clipped group by group as `method` says (LQ returns it unchanged)."""
    if method not in CLIP_METHODS:
        raise ValueError(f"unknown post-training method {method!r}; choose from {', '.join(CLIP_METHODS)}")
    if method == "lq":
        return weight.detach().clone()
    count = resolve_groups(weight.shape[0], groups)
    flat = weight.detach().float().reshape(count, -1)
    if method == "mse":
        lo, hi = mse_range(flat, bits)
    else:
        lo, hi = aciq_range(flat, bits) if method == "aciq" else ocs_range(weight, groups)
    return torch.maximum(torch.minimum(flat, hi[:, None]), lo[:, None]).reshape(weight.shape).to(weight.dtype)


@torch.no_grad()
def clip_model(model: nn.Module, recipe: Recipe, method: str) -> None:
    """Write the clipped float weights of every quantized encoder Linear into `model`, in place."""
    for name in quantizable_linears(model):
        spec = recipe.for_module(name)
        weight = model.get_submodule(name).weight
        assert isinstance(weight, torch.Tensor)
        weight.copy_(clipped(weight, method, spec.bits, spec.groups))
