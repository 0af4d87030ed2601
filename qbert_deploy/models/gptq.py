"""GPTQ-style post-training rounding (Frantar et al. 2023): error-compensating rounding with each Linear's input
Hessian H = X^T X, measured on calibration sentences.

Each output row keeps the grid (scale, zero point) that min/max of its group gives; the input columns are rounded
one by one and each column's rounding error, divided by the diagonal of the Cholesky factor of H^-1, is pushed into
the columns not yet rounded. The result is stored as float weights on the grid (model.pt's contract). For the
exporter to recompute the same grid from them, every group must still reach both ends of its grid: the elements
that held the group's minimum and maximum are put on the end points (where plain rounding puts them anyway), so
the exported integers are exactly the ones GPTQ chose everywhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from qbert_deploy.models.quantizer import group_qparams, int_range, resolve_groups
from qbert_deploy.models.wrap import quantizable_linears
from qbert_deploy.recipe import Recipe, WeightQuant

DAMPING = 0.01  # of the mean diagonal of H, added to its diagonal (GPTQ's default)


@torch.no_grad()
def input_hessians(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """X^T X / tokens of the input of every quantizable Linear over `batches` (padding tokens excluded)."""
    names = quantizable_linears(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {name: 0 for name in names}
    mask_now: list[torch.Tensor] = []

    def hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def keep(_m: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x = inputs[0].detach().float()
            rows = x[mask_now[0].bool()] if mask_now else x.reshape(-1, x.shape[-1])
            product = rows.T @ rows
            sums[name] = sums[name] + product if name in sums else product
            counts[name] += rows.shape[0]
        return keep

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            mask_now[:] = [inputs["attention_mask"]] if "attention_mask" in inputs else []
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: sums[name] / max(1, counts[name]) for name in names if name in sums}


@torch.no_grad()
def gptq_weight(weight: torch.Tensor, hessian: torch.Tensor, spec: WeightQuant) -> torch.Tensor:
    """`weight` [out, in] rounded GPTQ's way onto its min/max group grid; float values on the grid."""
    qmin, qmax = int_range(spec.bits, spec.symmetric)
    params = group_qparams(weight, spec.bits, spec.groups, spec.symmetric)
    scale, zero = (t.float()[:, None] for t in params.per_row(weight.shape[0]))
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += DAMPING * torch.mean(torch.diag(h)) * torch.eye(h.shape[0])
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.empty_like(w)
    for i in range(w.shape[1]):
        column = w[:, i:i + 1]
        q = (torch.clamp(torch.round(column / scale) + zero, qmin, qmax) - zero) * scale
        out[:, i:i + 1] = q
        error = (column - q) / upper[i, i]
        w[:, i + 1:] -= error @ upper[i:i + 1, i + 1:]
    _pin_end_points(out, weight.detach().float(), spec, scale, zero, qmin, qmax)
    return out.to(weight.dtype)


def _pin_end_points(out: torch.Tensor, original: torch.Tensor, spec: WeightQuant, scale: torch.Tensor,
                    zero: torch.Tensor, qmin: int, qmax: int) -> None:
    """Put each group's original min and max elements on the ends of its grid (see the module docstring)."""
    count = resolve_groups(out.shape[0], spec.groups)
    flat_out, flat_in = out.view(count, -1), original.reshape(count, -1)
    group_scale = scale.view(count, -1)[:, 0]
    group_zero = zero.view(count, -1)[:, 0]
    rows = torch.arange(count)
    if spec.symmetric:
        peak = flat_in.abs().argmax(dim=1)
        sign = torch.sign(flat_in[rows, peak])
        flat_out[rows, peak] = sign * qmax * group_scale
    else:
        flat_out[rows, flat_in.argmin(dim=1)] = (qmin - group_zero) * group_scale
        flat_out[rows, flat_in.argmax(dim=1)] = (qmax - group_zero) * group_scale


@torch.no_grad()
def gptq_model(model: nn.Module, recipe: Recipe, batches: Iterable[dict[str, torch.Tensor]]) -> None:
    """Round every quantized encoder Linear of the float `model` GPTQ's way, in place (before quantize_model)."""
    hessians = input_hessians(model, batches)
    for name in quantizable_linears(model):
        weight = model.get_submodule(name).weight
        assert isinstance(weight, torch.Tensor)
        if name in hessians:
            weight.copy_(gptq_weight(weight, hessians[name], recipe.for_module(name)))
