"""The quantizer: round trip within half a step, exact integers, STE gradients."""

from __future__ import annotations

import pytest
import torch

from qbert_deploy.models.quantizer import dequantize_rows, fake_quant, fake_quant_weight, group_qparams, quantize_rows


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("groups", [1, 4, None])
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_within_half_a_step(bits: int, groups: int | None, symmetric: bool) -> None:
    torch.manual_seed(bits)
    weight = torch.randn(16, 24) * torch.linspace(0.1, 2.0, 16)[:, None]
    params = group_qparams(weight, bits, groups, symmetric)
    q = quantize_rows(weight, params)
    back = dequantize_rows(q, params)
    scale, _ = params.per_row(16)
    error = (back - weight).abs() / scale[:, None]
    assert float(error.max()) <= 0.5 + 1e-4, f"round-trip error {float(error.max()):.4f} steps > 0.5"
    assert int(q.min()) >= params.qmin and int(q.max()) <= params.qmax, (int(q.min()), int(q.max()))
    # The dequantized values are exact grid points: quantizing them again gives the same integers.
    assert torch.equal(quantize_rows(back, params), q), "integers change on a second round trip"
    # And fake quantization (the PyTorch training path) is the same function.
    assert torch.equal(fake_quant_weight(weight, bits, groups, symmetric), back)


def test_fake_quant_integers_are_exact() -> None:
    scale, zero = torch.tensor(0.25), torch.tensor(3.0)
    x = (torch.arange(0, 16, dtype=torch.float32) - 3) * 0.25  # every grid point of a 4-bit range
    assert torch.equal(fake_quant(x, scale, zero, 0, 15), x)


def test_ste_gradient_passes_inside_and_stops_outside_the_range() -> None:
    x = torch.tensor([-10.0, -0.4, 0.0, 0.3, 1.2, 10.0], requires_grad=True)
    y = fake_quant(x, torch.tensor(0.1), torch.tensor(8.0), 0, 15)  # range [-0.8, 0.7]
    (y * torch.arange(1.0, 7.0)).sum().backward()
    assert x.grad is not None
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0, 0.0], x.grad.tolist()


def test_weight_gradient_is_straight_through_for_every_weight() -> None:
    weight = torch.randn(8, 6, requires_grad=True)
    fake_quant_weight(weight, 3, 2, False).sum().backward()
    assert weight.grad is not None
    # min/max ranges contain every weight, so every weight gets the upstream gradient unchanged.
    assert torch.equal(weight.grad, torch.ones_like(weight)), weight.grad
