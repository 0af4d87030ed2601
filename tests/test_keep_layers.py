"""Issue 20 (whole layers): --keep-layers and --layer-map on tiny random BERTs, from the rule to the export."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from qbert_deploy.checkpoint import load_checkpoint
from qbert_deploy.cli.quantize import main as quantize_main
from qbert_deploy.exporters.onnx_export import export_checkpoint
from qbert_deploy.models.build import build_model
from qbert_deploy.models.distill import Distiller, DistillWeights
from qbert_deploy.models.layers import LayerChoiceError, check_layer_map, drop_layers, spread_layers
from qbert_deploy.runtimes.lowering import lower
from qbert_deploy.validation.parity import parity_check
from tests.task_files import quantize_refused
from tests.tiny import text_batch, tiny_model, write_tiny_task

FAST = ["--finetune-steps", "2", "--calibration-batches", "1", "--batch-size", "4", "--groups", "4"]
DROPPED = "encoder.layer.1"  # of a 2-layer tiny BERT keeping 1 layer (the student's only layer is layer 0)


def test_the_rule_spreads_layers_evenly_and_keeps_the_last() -> None:
    assert spread_layers(6, 3) == (1, 3, 5)  # every other layer for K = N/2 (DistilBERT's one in two)
    assert spread_layers(12, 6) == (1, 3, 5, 7, 9, 11)
    assert spread_layers(2, 1) == (1,)
    assert spread_layers(4, 4) == (0, 1, 2, 3)
    for total in range(1, 13):
        for keep in range(1, total + 1):
            kept = spread_layers(total, keep)
            assert len(kept) == keep and kept[-1] == total - 1 and list(kept) == sorted(set(kept)), (total, keep)
    for bad in (0, 7):
        with pytest.raises(LayerChoiceError, match=rf"--keep-layers must be in 1\.\.6 \(the model has 6 layers\), "
                                                   rf"got {bad}"):
            spread_layers(6, bad)
    assert check_layer_map([0, 2], 2, 3) == (0, 2)
    for layer_map, message in (([0, 3], "names layer 3, but the teacher has 3 layers"), ([2, 1], "strictly"),
                               ([1, 1], "strictly"), ([0], "has 1 entries; the student has 2 layers")):
        with pytest.raises(LayerChoiceError, match=message):
            check_layer_map(layer_map, 2, 3)


@pytest.mark.parametrize("model_type", ["bert", "distilbert"])
def test_dropped_layers_are_gone_and_kept_ones_are_the_teachers(model_type: str) -> None:
    teacher = tiny_model(model_type, layers=4)
    student: Any = drop_layers(copy.deepcopy(teacher), spread_layers(4, 2))
    key = "num_hidden_layers" if model_type == "bert" else "n_layers"
    assert student.config.to_dict()[key] == 2
    prefix = "bert.encoder.layer" if model_type == "bert" else "distilbert.transformer.layer"
    state, source = student.state_dict(), teacher.state_dict()
    assert not [k for k in state if k.startswith((f"{prefix}.2.", f"{prefix}.3."))]
    for student_layer, teacher_layer in enumerate((1, 3)):
        names = [k for k in source if k.startswith(f"{prefix}.{teacher_layer}.")]
        assert names
        for name in names:
            mine = name.replace(f"{prefix}.{teacher_layer}.", f"{prefix}.{student_layer}.")
            assert torch.equal(state[mine], source[name]), mine
    inputs = {k: torch.from_numpy(v) for k, v in text_batch(model_type=model_type).items()}
    with torch.no_grad():
        hidden = student(**inputs, output_hidden_states=True).hidden_states
    assert len(hidden) == 3


def _inputs() -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in text_batch().items()}


def _loss(teacher: torch.nn.Module, student: torch.nn.Module, weights: DistillWeights,
          layer_map: tuple[int, ...]) -> float:
    distiller = Distiller(teacher, weights, layer_map)
    labels = torch.zeros(len(text_batch()["input_ids"]), dtype=torch.long)
    with distiller.attached(student), torch.no_grad():
        return float(distiller(student, _inputs(), labels))


def test_layer_map_gives_zero_loss_for_the_teacher_restricted_to_the_mapped_layers() -> None:
    # Hidden states and attention scores: a student of the teacher's first two layers, mapped to them, is exact.
    teacher = tiny_model(layers=3)
    student = drop_layers(copy.deepcopy(teacher), (0, 1))
    inner = DistillWeights(logits=0.0, hidden=1.0, attention=1.0)
    assert _loss(teacher, student, inner, (0, 1)) == pytest.approx(0.0, abs=1e-10)
    assert _loss(teacher, student, inner, (1, 2)) > 1e-6
    assert _loss(teacher, student, DistillWeights(logits=0.0, hidden=0.0, attention=1.0), (0, 2)) > 1e-6

    # Logits and hidden states through a map that skips a layer: the teacher's layer 1 passes its input on, so
    # the teacher without it computes the same states, and only the map (0, 2) pairs them up.
    teacher = tiny_model(layers=3)
    layer: Any = teacher.get_submodule("bert.encoder.layer.1")
    real = layer.forward

    def passthrough(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = real(hidden_states, *args, **kwargs)
        return hidden_states if isinstance(out, torch.Tensor) else (hidden_states, *out[1:])

    layer.forward = passthrough
    student = drop_layers(copy.deepcopy(teacher), (0, 2))
    outer = DistillWeights(logits=1.0, hidden=1.0, attention=0.0)
    assert _loss(teacher, student, outer, (0, 2)) == pytest.approx(0.0, abs=1e-10)
    assert _loss(teacher, student, outer, (0, 1)) > 1e-6


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_task(tmp_path_factory.mktemp("layers"))


def _data(tiny_dir: Path) -> list[str]:
    return ["--model", str(tiny_dir / "model"), "--train", str(tiny_dir / "train.tsv"),
            "--dev", str(tiny_dir / "dev.tsv")]


def _names(path: Path) -> list[str]:
    graph = onnx.load(str(path)).graph
    return [n.name for n in graph.node] + [t.name for t in graph.initializer] + \
        [o for n in graph.node for o in n.output]


def _export_has_one_layer(model_pt: Path, out: Path) -> None:
    checkpoint = load_checkpoint(model_pt)
    assert checkpoint.config["num_hidden_layers"] == 1
    result = export_checkpoint(checkpoint, out)
    names = _names(result.model_path)
    assert [n for n in names if "encoder.layer.0" in n], "the kept layer must be in the export"
    assert not [n for n in names if DROPPED in n], "a dropped layer must be absent from the export"
    for line in parity_check(build_model(checkpoint), result.model_path, text_batch()):
        assert line.max_error_steps <= 2.0, line.line()  # ORT (optimizations off) and onnx.reference
    lowered = lower(result.model_path, "cpu-w8a8", out / "model.cpu-w8a8.onnx")
    assert not [n for n in _names(lowered) if DROPPED in n]
    canonical = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    fast = ort.InferenceSession(str(lowered), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(fast.run(None, text_batch())[0], canonical.run(None, text_batch())[0], atol=0.05)


def test_qbert_keeps_one_of_two_layers_from_the_rule_and_exports_one(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert quantize_main([*_data(tiny_dir), *FAST, "--bits", "4", "--qat-steps", "0", "--keep-layers", "1",
                          "-o", str(out)]) == 0
    checkpoint = load_checkpoint(out / "model.pt")
    fp32 = AutoModelForSequenceClassification.from_pretrained(out / "fp32").state_dict()
    assert fp32["bert.encoder.layer.1.attention.self.query.weight"].shape == (64, 64)
    kept = [k for k in fp32 if k.startswith("bert.encoder.layer.1.")]
    assert kept
    for name in kept:  # before QAT the student's layer 0 is the fp32 model's layer 1 (spread_layers(2, 1))
        assert torch.equal(checkpoint.state_dict[name.replace("layer.1.", "layer.0.")], fp32[name]), name
    assert not [k for k in checkpoint.state_dict if DROPPED in k]
    _export_has_one_layer(out / "model.pt", tmp_path / "export")


def test_qbert_allocates_and_distils_a_shorter_student_through_a_given_map(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    hessian = ["--hessian-subsets", "1", "--hessian-batch", "4", "--hessian-iters", "2"]
    assert quantize_main([*_data(tiny_dir), *FAST, *hessian, "--avg-bits", "4", "--bit-choices", "2,4",
                          "--qat-steps", "2", "--keep-layers", "1", "--layer-map", "0", "-o", str(out)]) == 0
    assert load_checkpoint(out / "model.pt").config["num_hidden_layers"] == 1
    assert "distilled against teacher layers [0]" in (out / "quantize.log").read_text()
    sensitivity = json.loads((out / "sensitivity.json").read_text())  # the student's own layers
    assert len(sensitivity["omega"]) == 1 and sensitivity["settings"]["kept layers"] == [1]


def test_aqbert_searches_and_trains_a_shorter_student(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert quantize_main([*_data(tiny_dir), *FAST, "--method", "aqbert", "--keep-macs", "0.6", "--keep-layers",
                          "1", "--search-steps", "1", "--qat-steps", "1", "--groups", "4", "-o", str(out)]) == 0
    summary = json.loads((out / "aqbert.json").read_text())
    assert summary["kept_layers"] == [1] and summary["settings"]["layer_map"] == [1]
    checkpoint = load_checkpoint(out / "model.pt")
    assert checkpoint.recipe.structure is not None and set(checkpoint.recipe.structure.layers) == {0}
    _export_has_one_layer(out / "model.pt", tmp_path / "export")
    assert "student of 1 layer from fp32 layers [1], distilled against teacher layers [1]" in \
        (out / "quantize.log").read_text()


def test_aqbert_without_distillation_does_not_claim_a_teacher(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert quantize_main([*_data(tiny_dir), *FAST, "--method", "aqbert", "--keep-macs", "0.6", "--keep-layers",
                          "1", "--distill", "none", "--search-steps", "1", "--qat-steps", "1", "--groups", "4",
                          "-o", str(out)]) == 0
    log = (out / "quantize.log").read_text()
    assert "trained on the task loss alone (--distill none)" in log and "distilled against" not in log


@pytest.mark.parametrize("args, message", [
    (["--bits", "4", "--keep-layers", "0"], "--keep-layers must be in 1..2 (the model has 2 layers), got 0"),
    (["--bits", "4", "--keep-layers", "3"], "--keep-layers must be in 1..2 (the model has 2 layers), got 3"),
    (["--bits", "4", "--keep-layers", "1", "--layer-map", "2"],
     "--layer-map names layer 2, but the teacher has 2 layers (0..1)"),
    (["--bits", "4", "--keep-layers", "1", "--layer-map", "0,1"], "--layer-map has 2 entries; the student has 1"),
    (["--bits", "4", "--layer-map", "0"], "--layer-map maps a shorter student's layers to the teacher's: give "
                                          "--keep-layers K too"),
    (["--bits", "4", "--keep-layers", "2", "--layer-map", "1,0"], "--layer-map must be strictly increasing"),
    (["--method", "ptq-mse", "--bits", "4", "--keep-layers", "1"], "--keep-layers needs a method that trains"),
    (["--method", "aqbert", "--keep-macs", "0.5", "--keep-layers", "3"], "--keep-layers must be in 1..2"),
    (["--method", "aqbert", "--keep-macs", "0.5", "--keep-layers", "1", "--layer-map", "-1"],
     "--layer-map names layer -1"),
])
def test_bad_layer_choices_are_refused_in_one_line(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  args: list[str], message: str) -> None:
    quantize_refused(capsys, [*_data(tiny_dir), *args], tmp_path / "out", message)
