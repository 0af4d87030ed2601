"""One method applied to a fine-tuned fp32 model: allocate bits, clip (PTQ), quantize, calibrate, QAT."""

from __future__ import annotations

import copy
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qbert_deploy.families import layer_index
from qbert_deploy.models import distributed
from qbert_deploy.models.allocation import allocate_bits, uniform_reason
from qbert_deploy.models.distill import Distiller, DistillWeights
from qbert_deploy.models.gptq import gptq_model
from qbert_deploy.models.hessian import Sensitivity
from qbert_deploy.models.learned import bake_learned_ranges, enable_learned_ranges
from qbert_deploy.models.methods import Method
from qbert_deploy.models.modules import QuantLinear
from qbert_deploy.models.ptq import clip_model
from qbert_deploy.models.size import MB, paper_size
from qbert_deploy.models.task import Task
from qbert_deploy.models.train import SaveHook, train
from qbert_deploy.models.wrap import calibrate, quantizable_linears, quantize_model
from qbert_deploy.recipe import Recipe, WeightQuant

log = logging.getLogger("qbert_deploy.quantize")
GPTQ_BATCHES = 8  # of the task's batch size (32): 256 calibration sentences for GPTQ's input Hessians


@dataclass
class Settings:
    qat_steps: int = 200
    lr: float = 5e-5
    quant_noise: float = 0.0
    calibration_batches: int = 8
    seed: int = 0
    resume: dict[str, Any] | None = None
    save: SaveHook | None = None
    save_every: int = 50
    extra: dict[str, Any] = field(default_factory=dict)
    # Distillation from the fp32 model (None: the paper's plain QAT) and learned ranges ("minmax"/"mse" start,
    # None: min/max ranges recomputed every step as the paper does). Both only act on training methods.
    distill: DistillWeights | None = None
    learn_ranges: str | None = None
    teacher: nn.Module | None = None  # default: the fp32 model being quantized
    layer_map: tuple[int, ...] | None = None  # the teacher layer of each student layer (Distiller.layer_map)


def layer_of(module_name: str) -> int:
    """Encoder layer index of a module name like bert.encoder.layer.3.attention.self.query."""
    index = layer_index(module_name)
    if index is None:
        raise ValueError(f"{module_name}: not inside an encoder layer")
    return index


def mixed_recipe(model: nn.Module, base: Recipe, sens: Sensitivity, choices: tuple[int, ...],
                 average_bits: float | None = None, budget_mb: float | None = None) -> Recipe:
    """Per-layer bits from Omega: every Linear of an encoder layer gets that layer's bits."""
    linears = quantizable_linears(model)
    count = len(sens.layers)
    params = [0] * count
    for name in linears:
        weight = model.get_submodule(name).weight
        assert isinstance(weight, torch.Tensor)
        params[layer_of(name)] += int(weight.numel())
    fixed = 0.0
    if budget_mb is not None:
        at_eight = paper_size(model, Recipe(default=WeightQuant(bits=8, groups=base.default.groups),
                                            embedding=base.embedding))["size_mb"] * MB
        fixed = at_eight - sum(params)  # everything but the encoder Linears (8 bits = 1 byte each)
    bits = allocate_bits(sens.omega, params, average_bits=average_bits,
                         budget_bytes=None if budget_mb is None else budget_mb * MB, fixed_bytes=fixed,
                         choices=choices)
    log.info("allocation: Omega %s -> bits %s", ", ".join(f"{v:.3g}" for v in sens.omega), bits)
    target = f"an average of {average_bits:g} bits" if average_bits is not None else f"{budget_mb:g} MB"
    reason = uniform_reason(bits, sens.omega, choices, target)
    if reason:
        log.info("allocation: %s", reason)
    return base.with_overrides({name: WeightQuant(bits=bits[layer_of(name)], groups=base.default.groups,
                                                  symmetric=base.default.symmetric) for name in linears})


def apply_method(fp32: nn.Module, task: Task, method: Method, recipe: Recipe, settings: Settings) -> nn.Module:
    """A quantized copy of `fp32` made by `method` with `recipe` (mixed-precision overrides already in it)."""
    model = copy.deepcopy(fp32).cpu()  # clipping and wrapping on the CPU, training on this process's device
    if method.clip is not None:
        clip_model(model, recipe, method.clip)
    if method.family == "ptq-gptq":
        gptq_model(model, recipe, task.input_batches(GPTQ_BATCHES, settings.seed + 2))
    quantize_model(model, recipe)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.quant_noise = settings.quant_noise
    model.to(distributed.device())
    calibrate(model, [{k: v for k, v in b.items() if k != "labels"}
                      for b in task.input_batches(settings.calibration_batches, settings.seed)])
    if method.qat and settings.qat_steps > 0:
        if settings.learn_ranges is not None:
            enable_learned_ranges(model, settings.learn_ranges)
        distiller = Distiller(settings.teacher or fp32, settings.distill, settings.layer_map) \
            if settings.distill else None
        with distiller.attached(model) if distiller is not None else nullcontext():
            train(model, task.train_batches, settings.qat_steps, lr=settings.lr, desc=f"QAT {method.id}",
                  resume=settings.resume, save=settings.save, save_every=settings.save_every, loss_fn=distiller)
        bake_learned_ranges(model)
    return model.eval()
