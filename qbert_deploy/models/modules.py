"""Quantized PyTorch modules: group-wise fake-quant Linear and Embedding, 8-bit activation fake-quant."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qbert_deploy.models import distributed
from qbert_deploy.models.quantizer import (
    activation_qparams,
    fake_quant,
    fake_quant_learned,
    fake_quant_weight,
    range_qparams,
)
from qbert_deploy.recipe import WeightQuant


class ActQuant(nn.Module):
    """Asymmetric 8-bit fake quantization with an exponential-moving-average range.

    The range is updated in training mode or while `calibrating`; in eval mode it is frozen.
    """

    def __init__(self, bits: int = 8, momentum: float = 0.9) -> None:
        super().__init__()
        self.bits = bits
        self.momentum = momentum
        self.calibrating = False
        self.range: torch.Tensor
        self.initialized: torch.Tensor
        self.register_buffer("range", torch.zeros(2))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        # A trainable [lo, hi] (models/learned.py) that replaces the moving average while training.
        self.learned: nn.Parameter | None
        self.register_parameter("learned", None)

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().min().float(), x.detach().max().float()
        distributed.all_reduce_range(lo, hi)  # ranks hold slices of one global batch: observe all of it
        if not bool(self.initialized):
            self.range.copy_(torch.stack([lo, hi]))
            self.initialized.fill_(True)
        else:
            self.range.mul_(self.momentum).add_((1 - self.momentum) * torch.stack([lo, hi]))

    def qparams(self) -> tuple[float, int]:
        if not bool(self.initialized):
            raise RuntimeError("activation range was never observed: calibrate the model first")
        return activation_qparams(float(self.range[0]), float(self.range[1]), self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qmax = 2**self.bits - 1
        if self.learned is not None:
            with torch.no_grad():
                self.range.copy_(self.learned)
            if self.training:
                scale_t, zero_t = range_qparams(self.learned[0], self.learned[1], 0, qmax, symmetric=False)
                # LSQ's gradient scale over the features of one token, not the batch: the same whatever the batch
                # size or the number of processes sharing it.
                return fake_quant_learned(x, scale_t, zero_t, 0, qmax, 1.0 / (x.shape[-1] * qmax) ** 0.5)
        elif self.training or self.calibrating:
            self.observe(x)
        scale, zero_point = self.qparams()
        return fake_quant(x, x.new_tensor(scale), x.new_tensor(float(zero_point)), 0, qmax)


class QuantLinear(nn.Module):
    """Linear layer with group-wise fake-quantized weights and an optional dedicated input quantizer."""

    def __init__(self, linear: nn.Linear, spec: WeightQuant, activation_bits: int | None) -> None:
        super().__init__()
        # Quant-Noise (Fan et al. 2020): in training, only this fraction of the weights is fake-quantized each
        # forward pass (the rest stay float); 0 means plain QAT. Eval always quantizes every weight.
        self.quant_noise = 0.0
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.spec = spec
        self.input_quant = ActQuant(activation_bits) if activation_bits else None
        # Trainable per-group clipping ranges (models/learned.py), baked into the weights before saving.
        self.range_lo: nn.Parameter | None
        self.range_hi: nn.Parameter | None
        self.register_parameter("range_lo", None)
        self.register_parameter("range_hi", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        if self.range_lo is not None and self.range_hi is not None:
            from qbert_deploy.models.learned import learned_weight  # learned.py builds on this module

            weight = learned_weight(self.weight, self.spec, self.range_lo, self.range_hi)
        else:
            weight = fake_quant_weight(self.weight, self.spec.bits, self.spec.groups, self.spec.symmetric)
        if self.training and self.quant_noise > 0:
            mask = torch.rand_like(self.weight) < self.quant_noise
            weight = torch.where(mask, weight, self.weight)
        return F.linear(x, weight, self.bias)


class QuantEmbedding(nn.Module):
    """Embedding table fake-quantized per group of rows (per row by default)."""

    def __init__(self, embedding: nn.Embedding, spec: WeightQuant) -> None:
        super().__init__()
        self.weight = embedding.weight
        self.padding_idx = embedding.padding_idx
        self.spec = spec
        self._frozen: tuple[tuple[int, int], torch.Tensor] | None = None

    def _table(self) -> torch.Tensor:
        if self.training or torch.is_grad_enabled():
            self._frozen = None
            return fake_quant_weight(self.weight, self.spec.bits, self.spec.groups, self.spec.symmetric)
        # In inference the quantized table only changes when the weights do: re-quantizing a 30k-row table on
        # every forward pass made evaluation several times slower.
        key = (id(self.weight), self.weight._version)
        if self._frozen is None or self._frozen[0] != key:
            table = fake_quant_weight(self.weight, self.spec.bits, self.spec.groups, self.spec.symmetric)
            self._frozen = (key, table)
        return self._frozen[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.spec.groups is None and (self.training or torch.is_grad_enabled()):
            # Per-row ranges: quantizing only the gathered rows gives the same values as quantizing the whole
            # table, without touching its 30k rows on every training step.
            rows = F.embedding(ids, self.weight, self.padding_idx)
            flat = rows.reshape(-1, rows.shape[-1])
            return fake_quant_weight(flat, self.spec.bits, None, self.spec.symmetric).reshape(rows.shape)
        return F.embedding(ids, self._table(), self.padding_idx)
