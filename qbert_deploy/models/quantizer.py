"""Group-wise uniform quantization: the one definition shared by PyTorch fake-quant and the ONNX export."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range of a `bits`-bit quantizer: signed and restricted when symmetric, unsigned otherwise."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if symmetric:
        top = 2 ** (bits - 1) - 1
        return -top, top
    return 0, 2**bits - 1


@dataclass(frozen=True)
class QParams:
    """Per-group scale and zero point, each of shape [groups]."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int

    def per_row(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Repeat each group's parameters over its consecutive rows: the per-output-channel form."""
        repeat = rows // self.scale.numel()
        return self.scale.repeat_interleave(repeat), self.zero_point.repeat_interleave(repeat)


def resolve_groups(rows: int, groups: int | None) -> int:
    """`None` means one group per row; otherwise the count must divide the rows."""
    count = rows if groups is None else groups
    if count < 1 or rows % count:
        raise ValueError(f"{count} groups do not divide {rows} output rows")
    return count


def group_qparams(weight: torch.Tensor, bits: int, groups: int | None, symmetric: bool) -> QParams:
    """Min/max range of each bucket of consecutive output rows of `weight` [rows, ...]."""
    qmin, qmax = int_range(bits, symmetric)
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("weights contain NaN or Inf")
    count = resolve_groups(w.shape[0], groups)
    flat = w.reshape(count, -1)
    scale, zero_point = range_qparams(flat.min(dim=1).values, flat.max(dim=1).values, qmin, qmax, symmetric)
    return QParams(scale.to(torch.float32), zero_point.to(torch.int32), qmin, qmax)


def range_qparams(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (float, integer-valued) zero point of each range [lo, hi]; zero is always representable.

    Differentiable in the scale: learned ranges (models/learned.py) train through this very function, so the
    ranges they learn give bit for bit the parameters that `group_qparams` recomputes from the clipped weights.
    """
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = torch.maximum(-lo, hi) / qmax if symmetric else (hi - lo) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if symmetric:
        return scale, torch.zeros_like(scale.detach())
    return scale, torch.clamp(torch.round(qmin - lo.detach() / scale.detach()), qmin, qmax)


def quantize_rows(weight: torch.Tensor, params: QParams) -> torch.Tensor:
    """Integer values (int32) of `weight` [rows, ...] under per-group `params`; ONNX QuantizeLinear semantics."""
    rows = weight.shape[0]
    scale, zero_point = params.per_row(rows)
    shape = (rows,) + (1,) * (weight.dim() - 1)
    q = torch.round(weight.detach().float() / scale.view(shape)) + zero_point.view(shape)
    return q.clamp(params.qmin, params.qmax).to(torch.int32)


def dequantize_rows(q: torch.Tensor, params: QParams) -> torch.Tensor:
    """Float values of integers `q` [rows, ...]: ONNX DequantizeLinear semantics."""
    rows = q.shape[0]
    scale, zero_point = params.per_row(rows)
    shape = (rows,) + (1,) * (q.dim() - 1)
    return (q - zero_point.view(shape)).to(torch.float32) * scale.view(shape)


class _FakeQuantSTE(torch.autograd.Function):
    """Round-trip through the integers; straight-through gradient inside the clipping range, zero outside."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, scale: torch.Tensor,
                zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        unclamped = torch.round(x / scale) + zero_point
        ctx.save_for_backward((unclamped >= qmin) & (unclamped <= qmax))
        return (unclamped.clamp(qmin, qmax) - zero_point) * scale

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (inside,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grads[0] * inside, None, None, None, None


class _LearnedScaleFakeQuant(torch.autograd.Function):
    """The same forward as `_FakeQuantSTE`; backward also gives the scale its LSQ gradient (Esser et al. 2020).

    d out / d scale is round(x/s) - x/s inside the range and (q_clamped - z) outside; it is multiplied by
    `grad_scale` (1/sqrt(elements per scale * qmax)) so that the scale learns at the pace of the weights.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, scale: torch.Tensor,
                zero_point: torch.Tensor, qmin: int, qmax: int, grad_scale: float) -> torch.Tensor:
        ratio = x / scale
        unclamped = torch.round(ratio) + zero_point
        clamped = unclamped.clamp(qmin, qmax)
        inside = (unclamped >= qmin) & (unclamped <= qmax)
        ctx.save_for_backward(inside, torch.where(inside, unclamped - zero_point - ratio, clamped - zero_point))
        ctx.grad_scale = grad_scale  # type: ignore[attr-defined]
        ctx.scale_shape = scale.shape  # type: ignore[attr-defined]
        return (clamped - zero_point) * scale

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        inside, d_scale = ctx.saved_tensors  # type: ignore[attr-defined]
        grad = grads[0]
        per_element = grad * d_scale * ctx.grad_scale  # type: ignore[attr-defined]
        shape = ctx.scale_shape  # type: ignore[attr-defined]
        # The scale is a 0-d tensor or has x's rank: sum over the dimensions it was broadcast along.
        if len(shape) == 0:
            scale_grad = per_element.sum()
        else:
            dims = [i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1]
            scale_grad = per_element.sum(dim=dims, keepdim=True) if dims else per_element
        return grad * inside, scale_grad.reshape(shape), None, None, None, None


def fake_quant_learned(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                       grad_scale: float) -> torch.Tensor:
    """`fake_quant` with a trainable `scale` (LSQ gradient); identical values."""
    out: torch.Tensor = _LearnedScaleFakeQuant.apply(x, scale, zero_point.to(x.dtype), qmin, qmax, grad_scale)
    return out


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize-dequantize `x` with broadcastable float `scale` and `zero_point`, STE gradient."""
    out: torch.Tensor = _FakeQuantSTE.apply(x, scale, zero_point.to(x.dtype), qmin, qmax)
    return out


def fake_quant_weight(weight: torch.Tensor, bits: int, groups: int | None, symmetric: bool) -> torch.Tensor:
    """Group-wise fake quantization of a weight [rows, ...] with ranges taken from the current values."""
    params = group_qparams(weight, bits, groups, symmetric)
    scale, zero_point = params.per_row(weight.shape[0])
    shape = (weight.shape[0],) + (1,) * (weight.dim() - 1)
    return fake_quant(weight, scale.view(shape), zero_point.view(shape), params.qmin, params.qmax)


def activation_qparams(lo: float, hi: float, bits: int = 8) -> tuple[float, int]:
    """Asymmetric unsigned scale and zero point of an activation range (zero always representable)."""
    qmin, qmax = int_range(bits, symmetric=False)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = float(torch.tensor((hi - lo) / (qmax - qmin), dtype=torch.float32))
    if scale <= 0:
        scale = 1.0
    zero_point = int(min(max(round(qmin - lo / scale), qmin), qmax))
    return scale, zero_point
