"""Power iteration against exact eigenvalues, and per-layer sensitivity on a tiny BERT."""

from __future__ import annotations

import math

import torch
from transformers import BertForSequenceClassification

from qbert_deploy.models.hessian import Sensitivity, encoder_layers, layer_eigenvalues, top_eigenvalue
from tests.tiny import tiny_config


def test_power_iteration_finds_the_top_eigenvalue_of_a_quadratic_loss() -> None:
    torch.manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    eigenvalues = torch.tensor([7.0, 3.0, 2.5, 1.0, 0.5, 0.2, 0.1, -0.3, -1.0, 0.0, 0.05, 0.4], dtype=torch.float64)
    matrix = (basis * eigenvalues) @ basis.T
    x = torch.zeros(12, dtype=torch.float64, requires_grad=True)
    loss = 0.5 * x @ matrix @ x  # Hessian = matrix
    (grad,) = torch.autograd.grad(loss, [x], create_graph=True)

    def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(torch.autograd.grad(grad, [x], grad_outputs=[v[0].to(torch.float64)], retain_graph=True))

    found = top_eigenvalue(hvp, [x.shape], iters=200, tol=1e-10, generator=torch.Generator().manual_seed(1))
    exact = float(torch.linalg.eigvalsh(matrix).abs().max())
    assert math.isclose(found, exact, rel_tol=1e-6), f"power iteration {found} vs exact {exact}"


def test_power_iteration_handles_a_dominant_negative_eigenvalue() -> None:
    matrix = torch.diag(torch.tensor([-5.0, 2.0, 1.0]))

    def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
        return [matrix @ v[0]]

    found = top_eigenvalue(hvp, [torch.Size([3])], iters=300, tol=1e-9, generator=torch.Generator().manual_seed(0))
    assert math.isclose(found, -5.0, rel_tol=1e-4), found


def test_layer_eigenvalues_give_one_value_per_layer_and_keep_the_mode() -> None:
    config = tiny_config(hidden=16, layers=2, heads=2, intermediate=16)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).train()
    ids = torch.randint(1000, 2000, (3, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 1])}
    values = layer_eigenvalues(model, batch, iters=5)
    assert len(values) == len(encoder_layers(model)) == 2, values
    assert all(math.isfinite(v) and v != 0.0 for v in values), values
    assert model.training, "the model's train/eval mode must be restored"
    assert all(p.grad is None for p in model.parameters()), "Hessian products must not leave gradients behind"


def test_omega_is_abs_mean_plus_std() -> None:
    sens = Sensitivity(["a", "b"], [[1.0, -2.0], [3.0, -4.0]])
    assert sens.omega == [2.0 + 1.0, 3.0 + 1.0], sens.omega
