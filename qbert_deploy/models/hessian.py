"""Hessian sensitivity per encoder layer: top eigenvalue by power iteration with Hessian-vector products.

Q-BERT ranks layers by the top eigenvalue of the loss Hessian restricted to each layer's parameters, taken over
several random subsets of the training data; Omega = |mean| + std of those eigenvalues.

Distributed, each rank takes its slice of every subset and the Hessian-vector products are summed over ranks
(each rank's weighted by its share of the rows), so every rank iterates on the whole subset's Hessian and gets
the same eigenvalues.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from qbert_deploy.models import distributed

log = logging.getLogger("qbert_deploy.quantize")


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def _normalized(vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    norm = torch.sqrt(_dot(vectors, vectors)).clamp_min(1e-30)
    return [v / norm for v in vectors]


def top_eigenvalue(hvp: Callable[[list[torch.Tensor]], list[torch.Tensor]], shapes: Sequence[torch.Size],
                   iters: int = 20, tol: float = 1e-3, generator: torch.Generator | None = None,
                   device: torch.device | None = None) -> float:
    """Largest-magnitude eigenvalue of a symmetric operator given by `hvp`, by power iteration.

    Stops when the Rayleigh quotient changes by less than `tol` relative, or after `iters` products.
    """
    device = device or torch.device("cpu")
    v = _normalized([torch.randn(s, generator=generator).to(device) for s in shapes])
    eigenvalue = 0.0
    for i in range(iters):
        hv = hvp(v)
        new = float(_dot(hv, v))  # Rayleigh quotient of the unit vector v
        v = _normalized([h.detach() for h in hv])
        if i > 0 and abs(new - eigenvalue) <= tol * max(abs(eigenvalue), 1e-12):
            return new
        eigenvalue = new
    return eigenvalue


def encoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of each BERT encoder layer, in order."""
    layers = [(name, module) for name, module in model.named_modules()
              if name.rpartition(".")[0].endswith("encoder.layer") and name.rpartition(".")[2].isdigit()]
    if not layers:
        raise ValueError("the model has no BERT encoder layers")
    return layers


def layer_eigenvalues(model: nn.Module, batch: dict[str, torch.Tensor], iters: int = 20, tol: float = 1e-3,
                      seed: int = 0) -> list[float]:
    """Top Hessian eigenvalue of the loss on `batch` for each encoder layer's parameters (others held fixed).

    One forward pass and one gradient graph serve every layer: each Hessian-vector product is a second backward
    pass of (gradient of that layer . v) through the same graph (double backward). Distributed, `batch` is the
    global batch: this rank differentiates its rows' share of the mean loss and the products are summed over ranks.
    """
    device = distributed.device()
    model.to(device)
    labels = batch["labels"]
    rows, weight = distributed.local_rows(len(labels))
    local = {k: v[rows].to(device) for k, v in batch.items()}
    layers = encoder_layers(model)
    params = [[p for p in layer.parameters() if p.requires_grad] for _, layer in layers]
    was_training = model.training
    model.eval()  # no dropout: the loss must be one fixed function for the power iteration
    try:
        loss = model(**local).loss * (weight / distributed.world_size())  # this rank's share of the mean loss
        flat = [p for group in params for p in group]
        grads = torch.autograd.grad(loss, flat, create_graph=True)
        by_layer, start = [], 0
        for group in params:
            by_layer.append(list(grads[start:start + len(group)]))
            start += len(group)
        generator = torch.Generator().manual_seed(seed)
        values = []
        for group, grad in zip(params, by_layer, strict=True):
            def hvp(v: list[torch.Tensor], group: list[nn.Parameter] = group,
                    grad: list[torch.Tensor] = grad) -> list[torch.Tensor]:
                products = list(torch.autograd.grad(grad, group, grad_outputs=v, retain_graph=True))
                distributed.all_reduce_sum(products)
                return products

            values.append(top_eigenvalue(hvp, [p.shape for p in group], iters, tol, generator, device))
    finally:
        model.train(was_training)
    return values


@dataclass(frozen=True)
class Sensitivity:
    """Per-layer eigenvalues over data subsets and Omega = |mean| + std."""

    layers: list[str]
    eigenvalues: list[list[float]]  # [subset][layer]

    @property
    def omega(self) -> list[float]:
        out = []
        for i in range(len(self.layers)):
            values = [run[i] for run in self.eigenvalues]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
            out.append(abs(mean) + std)
        return out

    def to_json(self) -> dict[str, object]:
        return {"layers": self.layers, "eigenvalues": self.eigenvalues, "omega": self.omega}


def sensitivity(model: nn.Module, subsets: Sequence[dict[str, torch.Tensor]], iters: int = 20,
                tol: float = 1e-3) -> Sensitivity:
    """Eigenvalues of every encoder layer on each data subset (each a batch with labels), and their Omega."""
    if not subsets:
        raise ValueError("Hessian sensitivity needs at least one data subset")
    names = [name for name, _ in encoder_layers(model)]
    runs = []
    for i, batch in enumerate(tqdm(subsets, desc="Hessian", unit="subset", dynamic_ncols=True,
                                   disable=not distributed.is_main())):
        # Rank 0's values everywhere: the summed products agree, this makes the allocation agree to the last bit.
        runs.append(distributed.broadcast(layer_eigenvalues(model, batch, iters, tol, seed=i)))
        log.info("Hessian subset %d: top eigenvalues %s", i, ", ".join(f"{v:.3g}" for v in runs[-1]))
    return Sensitivity(names, runs)
