"""Post-training clipping: ranges as the methods define them, and the min/max quantizer honouring them."""

from __future__ import annotations

import torch

from qbert_deploy.models.ptq import ACIQ_LAPLACE_ALPHA, clipped, ocs_split
from qbert_deploy.models.quantizer import dequantize_rows, group_qparams, quantize_rows


def _weight() -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.distributions.Laplace(0.0, 0.05).sample((12, 64))
    w[3, 7] = 1.5  # an outlier
    return w


def test_lq_leaves_weights_alone() -> None:
    w = _weight()
    assert torch.equal(clipped(w, "lq", 4, 4), w)


def test_aciq_clips_each_group_at_alpha_times_mean_abs_deviation() -> None:
    w = _weight()
    out = clipped(w, "aciq", 3, 4)
    group = w.reshape(4, -1)[1]  # rows 3..5 hold the outlier
    b = float((group - group.mean()).abs().mean())
    assert abs(float(out.reshape(4, -1)[1].max()) - (float(group.mean()) + ACIQ_LAPLACE_ALPHA[3] * b)) < 1e-5
    assert torch.equal(out.reshape(4, -1)[0], torch.clamp(w.reshape(4, -1)[0], out.reshape(4, -1)[0].min(),
                                                         out.reshape(4, -1)[0].max()))


def test_ocs_split_halves_the_largest_channel_and_keeps_the_product() -> None:
    w = _weight()
    split = ocs_split(w, expand_ratio=1 / 64)
    assert split.shape == (12, 65), split.shape
    assert float(split.abs().max()) < float(w.abs().max()), "splitting must shrink the range"
    x = torch.randn(64)
    x_split = torch.cat([x, x[7:8]])  # the duplicated input channel
    assert torch.allclose(split @ x_split, w @ x, atol=1e-5), "a split layer computes the same function"


def test_clipped_weights_quantize_on_the_clipped_grid() -> None:
    w = _weight()
    out = clipped(w, "ocs", 4, 4)
    params = group_qparams(out, 4, 4, False)
    wide = group_qparams(w, 4, 4, False)
    assert float(params.scale[1]) < float(wide.scale[1]), "the outlier group's step must shrink"
    error_clipped = (dequantize_rows(quantize_rows(out, params), params) - w)[torch.arange(12) != 3].abs().mean()
    error_wide = (dequantize_rows(quantize_rows(w, wide), wide) - w)[torch.arange(12) != 3].abs().mean()
    assert error_clipped <= error_wide, (float(error_clipped), float(error_wide))
