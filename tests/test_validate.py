"""qbert-validate and its gate on a tiny BERT fitted to tests/tiny.py's sentences: the gate must be able to fail."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from transformers import BertForSequenceClassification

from qbert_deploy.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from qbert_deploy.cli.validate import main
from qbert_deploy.data.tsv import Example, write_tsv
from qbert_deploy.exporters.onnx_export import export_checkpoint
from qbert_deploy.models.build import make_checkpoint
from qbert_deploy.models.train import train
from qbert_deploy.models.wrap import calibrate, quantize_model
from qbert_deploy.recipe import Recipe, WeightQuant
from qbert_deploy.validation.run import Settings, validate
from tests.tiny import LABELS, SENTENCES, _tokenizer_texts, text_batch, tiny_checkpoint, tiny_config

CORRUPTED = "bert.encoder.layer.1.attention.output.dense"
# tests/tiny.py's sentences alternate positive, negative, ...; four mislabelled copies keep accuracy below 100%
# so that a baseline can sit above today's figure.
TRAIN = [Example(s, 1 - i % 2) for i, s in enumerate(SENTENCES)]
DEV = TRAIN * 4 + [Example(SENTENCES[0], 0)] * 4


def fitted_checkpoint() -> Checkpoint:
    """A tiny BERT trained until it separates the sentences, then 8-bit weights (per row) and activations."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config())
    model.config._attn_implementation = "eager"
    batch = text_batch()
    labels = np.array([e.label for e in TRAIN])
    train(model, lambda _epoch: [(batch, labels)], steps=30, lr=1e-3, desc="fit tiny")
    recipe = Recipe(default=WeightQuant(bits=8, groups=None))
    quantize_model(model, recipe)
    calibrate(model, [{k: torch.from_numpy(v) for k, v in batch.items()}])
    return make_checkpoint(model, recipe, list(LABELS), _tokenizer_texts())


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("validate")
    checkpoint = fitted_checkpoint()
    save_checkpoint(checkpoint, root / "model.pt")
    export_checkpoint(checkpoint, root / "export")
    write_tsv(root / "dev.tsv", DEV)
    corrupted = root / "corrupted"
    shutil.copytree(root / "export", corrupted)
    model = ir.load(corrupted / "model.onnx")
    scale = model.graph.initializers[f"{CORRUPTED}.weight_scale"]
    assert scale.const_value is not None
    scale.const_value = ir.tensor(scale.const_value.numpy() * 3.0, name=scale.name)
    ir.save(model, corrupted / "model.onnx")
    return {"root": root, "model": root / "model.pt", "export": root / "export", "dev": root / "dev.tsv",
            "corrupted": corrupted}


def _args(paths: dict[str, Path], export: str = "export", *extra: str) -> list[str]:
    return [str(paths[export]), "--checkpoint", str(paths["model"]), "--data", str(paths["dev"]), *extra]


@pytest.fixture(scope="module")
def baseline(fitted: dict[str, Path]) -> Path:
    """The clean export's baseline (and report, in the same folder)."""
    path = fitted["root"] / "baseline.json"
    assert main(_args(fitted, "export", "--write-baseline", str(path), "--report", str(fitted["root"] / "report"))) == 0
    return path


def test_clean_export_passes_and_baseline_round_trips(fitted: dict[str, Path], baseline: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    report = fitted["root"] / "report"
    recorded = json.loads(baseline.read_text())["backends"]
    # a model.pt without an fp32 record: no pytorch-fp32 row; by default the served cpu-w8a8 profile runs too
    assert set(recorded) == {"pytorch-master-weights", "pytorch-fakequant", "ort-spec", "ort-cpu-canonical",
                             "ort-cpu-cpu-w8a8"}
    assert recorded["pytorch-fakequant"]["accuracy"] >= 80.0, f"the fitted tiny model did not learn: {recorded}"
    assert main(_args(fitted, "export", "--baseline", str(baseline))) == 0
    data = json.loads((report / "report.json").read_text())
    spec = next(b for b in data["backends"] if b["name"] == "ort-spec")
    assert spec["agreement_fakequant"] == 100.0, spec
    assert spec["logit_error_vs_fakequant"]["p99_steps"] < 0.5, spec
    assert (report / "bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| ort-cpu-canonical |" in (report / "report.md").read_text()
    assert "predicts 'negative' for all" not in capsys.readouterr().out, "the fitted model predicts both classes"


def test_one_class_model_is_warned(fitted: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config())
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([50.0, -50.0]))  # 'negative' whatever the text
    recipe = Recipe(default=WeightQuant(bits=8, groups=None))
    quantize_model(model, recipe)
    calibrate(model, [{k: torch.from_numpy(v) for k, v in text_batch().items()}])
    checkpoint = make_checkpoint(model, recipe, list(LABELS), _tokenizer_texts())
    save_checkpoint(checkpoint, tmp_path / "model.pt")
    export_checkpoint(checkpoint, tmp_path / "export")
    main([str(tmp_path / "export"), "--checkpoint", str(tmp_path / "model.pt"), "--data", str(fitted["dev"])])
    out = capsys.readouterr().out
    negatives = sum(e.label == 0 for e in DEV)
    assert (f"warning: pytorch-fakequant predicts 'negative' for all {len(DEV)} examples (the majority class, "
            f"{100 * negatives / len(DEV):.1f}% of them)") in out, out[-3000:]
    assert "warning: ort-cpu-canonical predicts 'negative'" in out, out[-3000:]


@pytest.mark.parametrize(("raise_by", "code"), [(0.4, 0), (0.6, 1)])
def test_drop_within_tolerance_passes_and_beyond_fails(fitted: dict[str, Path], baseline: Path, tmp_path: Path,
                                                       raise_by: float, code: int,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A baseline 0.4 pp above today's accuracy is within --max-drop 0.5; 0.6 pp above is not."""
    data = json.loads(baseline.read_text())
    for entry in data["backends"].values():
        entry["accuracy"] += raise_by
    raised = tmp_path / "raised.json"
    raised.write_text(json.dumps(data))
    assert main(_args(fitted, "export", "--baseline", str(raised), "--max-drop", "0.5")) == code
    err = capsys.readouterr().err
    assert ("drop vs baseline" in err) == (code == 1), err


def test_corrupted_scale_fails_the_gate(fitted: dict[str, Path], baseline: Path) -> None:
    """One weight's scale changed in the ONNX file (the checkpoint hash still matches): exit 1 with a table."""
    result = subprocess.run([sys.executable, "-m", "qbert_deploy.cli.validate",
                             *_args(fitted, "corrupted", "--baseline", str(baseline))],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "GATE FAILED" in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    for backend in ("ort-spec", "ort-cpu-canonical"):
        assert f"\n{backend} " in result.stderr, result.stderr
    assert "\npytorch-fakequant " not in result.stderr, result.stderr


def test_layerwise_names_the_corrupted_layer(fitted: dict[str, Path], tmp_path: Path) -> None:
    report = validate(fitted["corrupted"], fitted["model"], fitted["dev"], Settings(layerwise=True, layer_examples=8),
                      tmp_path, report_dir=tmp_path / "report")
    departures = report.departures()
    assert departures["ort-spec"] == CORRUPTED, departures
    assert departures["ort-cpu-canonical"] == CORRUPTED, departures
    spec_layers = {e.module: e for e in report.layers["ort-spec"]}
    assert all(e.error is not None for e in spec_layers.values()), "some module was not exposed in the ONNX graph"
    assert (tmp_path / "report" / "layer_error.png").is_file()


def test_layerwise_clean_export_has_no_departure(fitted: dict[str, Path], tmp_path: Path) -> None:
    report = validate(fitted["export"], fitted["model"], fitted["dev"], Settings(layerwise=True, layer_examples=8),
                      tmp_path)
    departures = report.departures()
    assert departures["ort-spec"] is None and departures["ort-cpu-canonical"] is None, departures
    worst = {name: max(e.error.p99_steps for e in errors if e.error is not None)
             for name, errors in report.layers.items()}
    assert worst["pytorch-master-weights"] > 10 * worst["ort-spec"], f"quantization error should dwarf ORT's: {worst}"


def _error_of(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qbert-validate: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(("content", "message"), [
    ("review\tlabel\ngreat\t1\n", "cannot tell which columns hold the text and the label (columns found: 'review'"),
    ("sentence\tstars\ngreat\t1\n", "(columns found: 'sentence', 'stars'); the layouts read are SST-2"),
    ("sentence\tlabel\ngreat\tneutral\n", "not one of the model's labels"),
    ("sentence\tlabel\ngreat\t2\n", "out of range"),
    ("sentence\tlabel\n", "no examples"),
    ("", "empty file"),
])
def test_bad_dataset_is_a_clear_error(fitted: dict[str, Path], tmp_path: Path, content: str, message: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "bad.tsv"
    data.write_text(content)
    err = _error_of(capsys, [str(fitted["export"]), "--checkpoint", str(fitted["model"]), "--data", str(data)])
    assert message in err, err


def test_export_from_another_checkpoint_is_a_clear_error(fitted: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    same_recipe = load_checkpoint(fitted["model"])
    same_recipe.state_dict["classifier.bias"] = same_recipe.state_dict["classifier.bias"] + 1.0
    save_checkpoint(same_recipe, tmp_path / "weights.pt")
    other_recipe = tiny_checkpoint()
    save_checkpoint(other_recipe, tmp_path / "recipe.pt")
    capsys.readouterr()
    for name, message in (("weights.pt", "different checkpoint"), ("recipe.pt", "different recipe")):
        err = _error_of(capsys, [str(fitted["export"]), "--checkpoint", str(tmp_path / name), "--data",
                                 str(fitted["dev"])])
        assert message in err, err


def test_bad_profile_baseline_and_paths_are_clear_errors(fitted: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert "profile 'no-such'" in _error_of(capsys, _args(fitted, "export", "--profile", "no-such"))
    other = tmp_path / "baseline.json"
    write_tsv(tmp_path / "other.tsv", DEV[:5])
    assert main([str(fitted["export"]), "--checkpoint", str(fitted["model"]), "--data", str(tmp_path / "other.tsv"),
                 "--write-baseline", str(other), "--min-agreement", "0"]) == 0
    capsys.readouterr()
    assert "different examples" in _error_of(capsys, _args(fitted, "export", "--baseline", str(other)))
    assert "no such baseline" in _error_of(capsys, _args(fitted, "export", "--baseline", str(tmp_path / "x.json")))
    err = _error_of(capsys, [str(tmp_path), "--checkpoint", str(fitted["model"]), "--data", str(fitted["dev"])])
    assert "no model.onnx" in err, err


def test_profile_uses_the_lowered_model_in_the_export(fitted: dict[str, Path], tmp_path: Path) -> None:
    """`--profile X` runs EXPORT/model.X.onnx when the export holds one (here: a copy of the canonical model)."""
    export = tmp_path / "export"
    shutil.copytree(fitted["export"], export)
    shutil.copy(export / "model.onnx", export / "model.weight-only.onnx")
    report = validate(export, fitted["model"], fitted["dev"], Settings(profiles=("canonical", "weight-only"),
                                                                       limit=8), tmp_path / "work")
    by_name = {s.name: s for s in report.summaries}
    assert by_name["ort-cpu-weight-only"].model == str(export / "model.weight-only.onnx"), by_name
    assert by_name["ort-cpu-weight-only"].agreement_fakequant == 100.0, by_name
    assert not report.failures, report.failures
