"""Issue 11: distillation loss, learned (LSQ+) group ranges, and their export, on a tiny random BERT."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from transformers import BertForSequenceClassification

from qbert_deploy.exporters.onnx_export import export_checkpoint
from qbert_deploy.models.build import build_model, make_checkpoint
from qbert_deploy.models.distill import Distiller, DistillError, DistillWeights, check_teacher, resolve_weights
from qbert_deploy.models.learned import bake_learned_ranges, enable_learned_ranges
from qbert_deploy.models.modules import ActQuant, QuantLinear
from qbert_deploy.models.ptq import clipped, mse_range
from qbert_deploy.models.quantizer import dequantize_rows, group_qparams, int_range, quantize_rows, range_qparams
from qbert_deploy.models.train import train
from qbert_deploy.models.wrap import calibrate, quantizable_linears, quantize_model
from qbert_deploy.recipe import Recipe, WeightQuant
from qbert_deploy.validation.parity import parity_check
from tests.tiny import LABELS, _tokenizer_texts, calibration_batches, text_batch, tiny_config

FULL = DistillWeights(logits=1.0, hidden=1.0, attention=1.0, temperature=2.0)


def _float_model(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_config())
    model.config._attn_implementation = "eager"
    return model.eval()


def _inputs() -> dict[str, torch.Tensor]:
    batch = text_batch()  # padded: the masks matter
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def _quantized(teacher: BertForSequenceClassification, recipe: Recipe) -> torch.nn.Module:
    student = copy.deepcopy(teacher)
    quantize_model(student, recipe)
    calibrate(student, calibration_batches())
    return student


def _batches(epoch: int) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    batch = text_batch()
    labels = np.arange(batch["input_ids"].shape[0]) % 2
    return [(batch, labels)] * 2


def test_distillation_loss_is_zero_for_the_teacher_itself_and_positive_for_a_quantized_student() -> None:
    teacher = _float_model()
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    inputs, labels = _inputs(), torch.zeros(len(text_batch()["input_ids"]), dtype=torch.long)
    for weights in (FULL, DistillWeights(1, 0, 0), DistillWeights(0, 1, 0), DistillWeights(0, 0, 1)):
        distiller = Distiller(teacher, weights)
        twin = copy.deepcopy(teacher)
        with distiller.attached(twin), torch.no_grad():
            assert float(distiller(twin, inputs, labels)) == pytest.approx(0.0, abs=1e-10), weights
        student = _quantized(teacher, Recipe(default=WeightQuant(bits=2, groups=4)))
        with distiller.attached(student):
            loss = distiller(student, inputs, labels)
        assert float(loss.detach()) > 0, weights
        loss.backward()
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads), "the loss must train the student"
    assert all(p.grad is None for p in teacher.parameters()), "the teacher gets no gradient"
    assert all(torch.equal(v, frozen[k]) for k, v in teacher.state_dict().items()), "the teacher never changes"


def test_attention_term_counts_at_every_step_and_keeps_nothing() -> None:
    teacher = _float_model()
    student = _quantized(teacher, Recipe(default=WeightQuant(bits=2, groups=4)))
    distiller = Distiller(teacher, DistillWeights(logits=0, hidden=0, attention=1))
    inputs, labels = _inputs(), torch.zeros(len(text_batch()["input_ids"]), dtype=torch.long)
    with distiller.attached(student):
        losses = [float(distiller(student, inputs, labels).detach()) for _ in range(3)]
        kept = [len(store) for store in distiller._captured.values()]
    assert losses[0] > 0 and losses == pytest.approx([losses[0]] * 3), f"the same batch, the same loss: {losses}"
    assert kept == [0, 0], f"Q/K outputs (and their graphs) left behind after a step: {kept}"


@pytest.mark.parametrize(("values", "message"), [
    ({"logits": -1.0}, ">= 0"), ({"logits": 0.0, "hidden": 0.0, "attention": 0.0}, "all zero"),
    ({"hidden": float("nan")}, ">= 0"), ({"temperature": 0.0}, "temperature"),
])
def test_bad_distillation_weights_are_refused(values: dict[str, float], message: str) -> None:
    with pytest.raises(DistillError, match=message):
        resolve_weights("full", **values)
    with pytest.raises(DistillError, match="--distill none"):
        resolve_weights("none", logits=1.0)
    assert resolve_weights("none") is None


def test_teacher_with_other_labels_or_shape_is_refused() -> None:
    student = tiny_config().to_dict()
    teacher = dict(student, id2label={"0": "a", "1": "b", "2": "c"})
    with pytest.raises(DistillError, match="3 labels"):
        check_teacher(teacher, student, list(LABELS), FULL)
    with pytest.raises(DistillError, match="hidden_size"):
        check_teacher(dict(student, hidden_size=32), student, list(LABELS), FULL)
    check_teacher(dict(student, hidden_size=32), student, list(LABELS), DistillWeights(1, 0, 0))  # logits only: ok


def test_learned_ranges_get_gradients_and_stay_positive() -> None:
    teacher = _float_model()
    student = _quantized(teacher, Recipe(default=WeightQuant(bits=3, groups=4)))
    assert enable_learned_ranges(student, "minmax") == len(quantizable_linears(student))
    linear = next(m for m in student.modules() if isinstance(m, QuantLinear))
    act = next(m for m in student.modules() if isinstance(m, ActQuant))
    assert linear.range_lo is not None and linear.range_hi is not None and act.learned is not None
    start = (linear.range_lo.detach().clone(), linear.range_hi.detach().clone(), act.learned.detach().clone())
    distiller = Distiller(teacher, FULL)
    with distiller.attached(student):
        train(student, _batches, 6, lr=1e-2, desc="test", loss_fn=distiller)
    for module in student.modules():
        if isinstance(module, QuantLinear):
            assert module.range_lo is not None and module.range_hi is not None
            qmin, qmax = int_range(module.spec.bits, module.spec.symmetric)
            scale, _ = range_qparams(module.range_lo.detach(), module.range_hi.detach(), qmin, qmax, False)
            assert bool((scale > 0).all()), "learned scales must stay positive"
    assert not torch.equal(start[0], linear.range_lo.detach()) or not torch.equal(start[1], linear.range_hi.detach())
    assert not torch.equal(start[2], act.learned.detach()), "the activation range must learn"
    # One backward on a fresh batch: every learned range has a gradient.
    student.train()
    student.zero_grad()
    with distiller.attached(student):
        distiller(student, _inputs(), torch.zeros(4, dtype=torch.long)).backward()
    assert linear.range_lo.grad is not None and float(linear.range_lo.grad.abs().sum() +
                                                      linear.range_hi.grad.abs().sum()) > 0  # type: ignore[union-attr]
    assert act.learned.grad is not None and float(act.learned.grad.abs().sum()) > 0


@pytest.mark.parametrize("symmetric", [False, True])
def test_learned_ranges_export_bit_exact(tmp_path: Path, symmetric: bool) -> None:
    teacher = _float_model(seed=3)
    recipe = Recipe(default=WeightQuant(bits=3, groups=4, symmetric=symmetric))
    student = _quantized(teacher, recipe)
    enable_learned_ranges(student, "mse")
    distiller = Distiller(teacher, FULL)
    with distiller.attached(student):
        train(student, _batches, 4, lr=5e-3, desc="test", loss_fn=distiller)
    student.eval()
    learned = {}
    for name in quantizable_linears(student):
        module = student.get_submodule(name)
        assert isinstance(module, QuantLinear) and module.range_lo is not None and module.range_hi is not None
        qmin, qmax = int_range(3, symmetric)
        count = 4
        flat = torch.maximum(torch.minimum(module.weight.detach().reshape(count, -1), module.range_hi[:, None]),
                             module.range_lo[:, None])
        learned[name] = range_qparams(flat.min(1).values, flat.max(1).values, qmin, qmax, symmetric)[0].detach()
    with torch.no_grad():
        before = student(**_inputs()).logits
    bake_learned_ranges(student)
    assert not any(".range_" in k or ".learned" in k for k in student.state_dict())
    checkpoint = make_checkpoint(student, recipe, list(LABELS), _tokenizer_texts())
    rebuilt = build_model(checkpoint)
    with torch.no_grad():
        assert torch.equal(rebuilt(**_inputs()).logits, before), "model.pt must be the trained model, exactly"
    result = export_checkpoint(checkpoint, tmp_path / "out", opset=21)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(result.model_path)).graph.initializer}
    for name, scale in learned.items():
        weight = checkpoint.state_dict[f"{name}.weight"]
        params = group_qparams(weight, 3, 4, symmetric)
        assert torch.equal(params.scale, scale), f"{name}: the learned scale is the exported scale"
        stored = inits[f"{name}.weight_q"].astype(np.int32).T
        np.testing.assert_array_equal(stored, quantize_rows(weight, params).numpy(), err_msg=name)
        np.testing.assert_array_equal(inits[f"{name}.weight_scale"], params.per_row(weight.shape[0])[0].numpy())
    for line in parity_check(rebuilt, result.model_path, text_batch()):
        assert line.max_error_steps <= 2.0, line.line()


def test_mse_range_never_loses_to_minmax() -> None:
    torch.manual_seed(0)
    flat = torch.randn(8, 256) * torch.linspace(0.5, 2, 8)[:, None]
    flat[0, 0] = 12.0  # an outlier: clipping must win here
    for bits in (2, 3, 4):
        lo, hi = mse_range(flat, bits)
        assert bool((lo >= flat.min(1).values).all() and (hi <= flat.max(1).values).all())
        errors = []
        for weight in (flat, clipped(flat, "mse", bits, None)):
            params = group_qparams(weight, bits, None, False)
            errors.append(((dequantize_rows(quantize_rows(weight, params), params) - flat) ** 2).sum(1))
        assert bool((errors[1] <= errors[0] + 1e-6).all()), bits
        if bits < 4:  # at 2-3 bits clipping a Gaussian always pays
            assert float(errors[1].sum()) < 0.95 * float(errors[0].sum()), bits


@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_rounds_on_the_exported_grid_and_beats_rounding_on_the_layer_output(symmetric: bool) -> None:
    from qbert_deploy.models.gptq import gptq_weight

    torch.manual_seed(0)
    x = torch.randn(512, 32) @ torch.randn(32, 32)  # correlated inputs: where error compensation pays
    weight = torch.randn(16, 32)
    spec = WeightQuant(bits=3, groups=4, symmetric=symmetric)
    rounded = gptq_weight(weight, x.T @ x / len(x), spec)
    params = group_qparams(weight, 3, 4, symmetric)
    again = group_qparams(rounded, 3, 4, symmetric)
    # The exporter recomputes the grid from the stored weights: same zero points, same integers, same values.
    assert torch.equal(again.zero_point, params.zero_point)
    torch.testing.assert_close(again.scale, params.scale, rtol=1e-6, atol=0)
    assert torch.equal(dequantize_rows(quantize_rows(rounded, again), again), rounded)
    nearest = dequantize_rows(quantize_rows(weight, params), params)
    gptq_error = float(((x @ (rounded - weight).T) ** 2).mean())
    nearest_error = float(((x @ (nearest - weight).T) ** 2).mean())
    assert gptq_error < 0.8 * nearest_error, (gptq_error, nearest_error)
