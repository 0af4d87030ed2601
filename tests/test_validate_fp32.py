"""Issue 18, items 1 and 2, through the real commands on a tiny random BERT: qbert-validate measures the drop
against the fine-tuned fp32 model qbert-quantize kept (not model.pt's master weights), validates what is served
(every lowered file in the export and the served profile), at the length the model was trained at."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

from qbert_deploy.checkpoint import (
    CheckpointError,
    checkpoint_from_payload,
    fp32_digest,
    load_checkpoint,
    save_checkpoint,
)
from qbert_deploy.cli.export import main as export_main
from qbert_deploy.cli.quantize import main as quantize_main
from qbert_deploy.cli.validate import main as validate_main
from qbert_deploy.data.tsv import Example, write_tsv
from qbert_deploy.runtimes.trained_length import trained_max_length
from qbert_deploy.safetensors_format import load_safetensors_checkpoint, save_safetensors_checkpoint
from qbert_deploy.validation.gate import load_baseline
from tests.tiny import SENTENCES, save_hf_dir, tiny_config

ROOT = Path(__file__).resolve().parent.parent
LENGTH = 32  # quantize's --max-length here: not validate's old default of 128
# Enough fine-tuning for the tiny BERT to separate the sentences (fp32 dev accuracy 100%), 8-bit weights.
QUANTIZE = ["--bits", "8", "--groups", "4", "--finetune-steps", "40", "--lr", "1e-3", "--qat-steps", "2",
            "--batch-size", "8", "--max-length", str(LENGTH), "--calibration-batches", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """qbert-quantize -o out; a degraded copy of its model.pt beside it (the classifier negated: what a QAT gone
    wrong looks like to the master weights); both exported, the good one with --lower cpu-w8a8."""
    root = tmp_path_factory.mktemp("fp32ref")
    torch.manual_seed(0)
    save_hf_dir(BertForSequenceClassification(tiny_config()), root / "base")
    examples = [Example(s, i % 2) for i, s in enumerate(SENTENCES)]
    write_tsv(root / "train.tsv", examples * 4)
    write_tsv(root / "dev.tsv", examples * 2)
    out = root / "out"
    assert quantize_main(["--model", str(root / "base"), "--train", str(root / "train.tsv"), "--dev",
                          str(root / "dev.tsv"), *QUANTIZE, "-o", str(out)]) == 0
    degraded = load_checkpoint(out / "model.pt")
    for name in ("classifier.weight", "classifier.bias"):
        degraded.state_dict[name] = -degraded.state_dict[name]
    save_checkpoint(degraded, out / "degraded.pt")  # beside model.pt: the recorded "fp32" still resolves
    assert export_main([str(out / "model.pt"), "-o", str(root / "export"), "--lower", "cpu-w8a8"]) == 0
    assert export_main([str(out / "degraded.pt"), "-o", str(root / "export-degraded")]) == 0
    return {"root": root, "out": out, "model": out / "model.pt", "degraded": out / "degraded.pt",
            "export": root / "export", "export-degraded": root / "export-degraded", "dev": root / "dev.tsv"}


def _validate(run: dict[str, Path], *extra: str, export: str = "export-degraded",
              checkpoint: str = "degraded") -> list[str]:
    return [str(run[export]), "--checkpoint", str(run[checkpoint]), "--data", str(run["dev"]), *extra]


def _report(folder: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((folder / "report.json").read_text())


def _accuracies(report: dict) -> dict[str, float]:  # type: ignore[type-arg]
    return {b["name"]: b["accuracy"] for b in report["backends"]}


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    assert validate_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qbert-validate: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ---- item 1: the fp32 row is the fine-tuned fp32 model ----

def test_quantize_records_the_fp32_model_and_the_length(run: dict[str, Path]) -> None:
    checkpoint = load_checkpoint(run["model"])
    assert checkpoint.max_length == LENGTH
    assert checkpoint.fp32_reference is not None
    assert checkpoint.fp32_reference.path == "fp32", "relative to model.pt, so a moved output folder still works"
    assert checkpoint.fp32_reference.sha256 == fp32_digest(run["out"] / "fp32")
    assert checkpoint.metrics["dev_accuracy_fp32"] == 1.0, "the tiny BERT must learn the sentences"


def test_report_shows_the_true_drop_and_the_gate_bounds_it(run: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert validate_main(_validate(run, "--report", str(tmp_path / "report"), "--profile", "canonical")) == 0
    printed = capsys.readouterr().out
    report = _report(tmp_path / "report")
    accuracy = _accuracies(report)
    assert accuracy["pytorch-fp32"] == 100.0, accuracy
    # the master weights are the degraded model: called "fp32" before, they hid the whole loss
    assert accuracy["pytorch-master-weights"] == accuracy["pytorch-fakequant"] < 50.0, accuracy
    drops = report["fp32"]["drops"]
    assert drops["pytorch-fakequant"] == pytest.approx(100.0 - accuracy["pytorch-fakequant"]), drops
    assert report["fp32"]["verified"] and report["fp32"]["path"] == str(run["out"] / "fp32"), report["fp32"]
    assert "quantization drop vs the fine-tuned fp32 model" in printed, printed
    assert "## Quantization drop vs the fine-tuned fp32 model" in (tmp_path / "report" / "report.md").read_text()
    # the gate: a subprocess, as CI runs it
    done = subprocess.run([sys.executable, "-m", "qbert_deploy.cli.validate",
                           *_validate(run, "--profile", "canonical", "--max-drop-vs-fp32", "1")],
                          capture_output=True, text=True, check=False, cwd=ROOT)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "GATE FAILED" in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    for backend in ("pytorch-fakequant", "ort-spec", "ort-cpu-canonical"):
        assert f"\n{backend} " in done.stderr and "drop vs fp32" in done.stderr, done.stderr
    # the healthy model passes the same bound
    assert validate_main(_validate(run, "--profile", "canonical", "--max-drop-vs-fp32", "1",
                                   export="export", checkpoint="model")) == 0


def test_missing_or_changed_fp32_is_a_warning_and_no_row(run: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    moved = tmp_path / "out"
    shutil.copytree(run["out"], moved)
    argv = [str(run["export-degraded"]), "--checkpoint", str(moved / "degraded.pt"), "--data", str(run["dev"]),
            "--profile", "canonical", "--limit", "8"]
    (moved / "fp32" / "config.json").write_text((moved / "fp32" / "config.json").read_text() + "\n")
    capsys.readouterr()
    assert validate_main([*argv, "--report", str(tmp_path / "changed")]) == 0
    printed = capsys.readouterr().out
    assert "warning: " in printed and "has changed since" in printed, printed
    report = _report(tmp_path / "changed")
    assert "pytorch-fp32" not in _accuracies(report) and "pytorch-master-weights" in _accuracies(report)
    assert "has changed since" in report["fp32"]["message"] and report["fp32"]["path"] is None, report["fp32"]
    shutil.rmtree(moved / "fp32")
    capsys.readouterr()
    assert validate_main(argv) == 0
    assert "no such folder" in capsys.readouterr().out
    # bounding the drop without an fp32 model is a failed gate, not a silent pass
    assert validate_main([*argv, "--max-drop-vs-fp32", "1"]) == 1
    assert "no fp32 model" in capsys.readouterr().err
    # --fp32 DIR puts it back
    assert validate_main([*argv, "--fp32", str(run["out"] / "fp32"), "--max-drop-vs-fp32", "1"]) == 1
    assert "drop vs fp32" in capsys.readouterr().err


def test_explicit_fp32_that_is_missing_or_another_model_is_bad_input(run: dict[str, Path], tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line_error(capsys, _validate(run, "--fp32", str(tmp_path / "nowhere")))
    assert "--fp32" in err and "no such folder" in err, err
    err = _one_line_error(capsys, _validate(run, "--fp32", str(run["root"] / "base")))  # the untrained base model
    assert "is not the fp32 model" in err, err
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _one_line_error(capsys, _validate(run, "--fp32", str(tmp_path / "empty")))
    # what the new user tried: the fp32 folder as --checkpoint
    err = _one_line_error(capsys, [str(run["export"]), "--checkpoint", str(run["out"] / "fp32"), "--data",
                                   str(run["dev"])])
    assert "is a Hugging Face model folder" in err and "--fp32" in err, err


def test_old_model_pt_validates_as_before_and_says_what_it_lacks(run: dict[str, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    old = dataclasses.replace(load_checkpoint(run["degraded"]), max_length=None, fp32_reference=None)
    save_checkpoint(old, tmp_path / "model.pt")
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    assert "max_length" not in payload and "fp32_reference" not in payload
    argv = [str(run["export-degraded"]), "--checkpoint", str(tmp_path / "model.pt"), "--data", str(run["dev"]),
            "--profile", "canonical", "--limit", "8"]
    capsys.readouterr()
    assert validate_main([*argv, "--report", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    assert "records no fp32 model" in printed, printed
    assert "pytorch-fp32" not in _accuracies(_report(tmp_path / "report"))
    # given by hand, the fp32 model is used, unverified
    assert validate_main([*argv, "--fp32", str(run["out"] / "fp32"), "--report", str(tmp_path / "given")]) == 0
    assert "not verified" in capsys.readouterr().out
    assert _accuracies(_report(tmp_path / "given"))["pytorch-fp32"] == 100.0


def test_baseline_records_fp32_and_old_baselines_still_read(run: dict[str, Path], tmp_path: Path) -> None:
    new = tmp_path / "baseline.json"
    assert validate_main(_validate(run, "--profile", "canonical", "--write-baseline", str(new))) == 0
    data = json.loads(new.read_text())
    assert data["version"] == 2 and data["fp32"]["accuracy"] == 100.0, data
    assert data["fp32"]["sha256"] == fp32_digest(run["out"] / "fp32")
    assert {"pytorch-fp32", "pytorch-master-weights"} <= set(data["backends"]), data["backends"]
    assert validate_main(_validate(run, "--profile", "canonical", "--baseline", str(new))) == 0
    # version 1 called the master weights "pytorch-fp32" and had no fp32 model: read so, and not failed for it
    old = dict(data, version=1, backends={("pytorch-fp32" if k == "pytorch-master-weights" else k): v
                                          for k, v in data["backends"].items() if k != "pytorch-fp32"})
    del old["fp32"]
    (tmp_path / "v1.json").write_text(json.dumps(old))
    read = load_baseline(tmp_path / "v1.json", data["dataset_sha256"])
    assert read.accuracies["pytorch-master-weights"] == data["backends"]["pytorch-master-weights"]["accuracy"]
    assert "pytorch-fp32" not in read.accuracies
    assert validate_main(_validate(run, "--profile", "canonical", "--baseline", str(tmp_path / "v1.json"))) == 0
    committed = json.loads((ROOT / "ci" / "baseline.json").read_text())
    ci = load_baseline(ROOT / "ci" / "baseline.json", committed["dataset_sha256"])
    assert ci.accuracies["pytorch-master-weights"] == committed["backends"]["pytorch-fp32"]["accuracy"]


# ---- item 2: what is validated is what is served, at the trained length ----

def test_default_run_covers_every_lowered_file_and_the_served_profile_at_the_trained_length(
        run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    export = tmp_path / "export"
    shutil.copytree(run["export"], export)
    shutil.copy(export / "model.onnx", export / "model.weight-only.onnx")  # any model.<profile>.onnx present
    capsys.readouterr()
    assert validate_main([str(export), "--checkpoint", str(run["model"]), "--data", str(run["dev"]),
                          "--report", str(tmp_path / "report")]) == 0
    assert "note: --max-length" not in capsys.readouterr().out
    report = _report(tmp_path / "report")
    models = {b["name"]: b["model"] for b in report["backends"]}
    assert models["ort-cpu-cpu-w8a8"] == str(export / "model.cpu-w8a8.onnx"), models  # what qbert-serve ships
    assert models["ort-cpu-weight-only"] == str(export / "model.weight-only.onnx"), models
    assert models["ort-cpu-canonical"] == str(export / "model.onnx"), models
    assert report["settings"]["max_length"] == LENGTH and report["settings"]["served_profiles"] == "cpu-w8a8"
    assert not report["gate"]["failures"], report["gate"]
    # an export without lowered files still validates the served profile (lowered now, as qbert-serve would)
    assert validate_main(_validate(run, "--report", str(tmp_path / "bare"))) == 0
    assert "ort-cpu-cpu-w8a8" in _accuracies(_report(tmp_path / "bare"))


def test_length_is_in_the_export_and_an_override_is_noted(run: dict[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert trained_max_length(run["export"]) == LENGTH
    assert trained_max_length(run["export"] / "model.cpu-w8a8.onnx") == LENGTH, "the served file carries it too"
    # what qbert-serve can call: torch-free, like everything in runtimes/
    code = ("import sys; sys.modules['torch'] = None; from qbert_deploy.runtimes.trained_length import "
            f"trained_max_length; print(trained_max_length({str(run['export'])!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == str(LENGTH), done.stderr[-2000:]
    capsys.readouterr()
    assert validate_main(_validate(run, "--max-length", "48", "--profile", "canonical", "--limit", "8",
                                   "--report", str(tmp_path / "report"))) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "--max-length" in line]
    assert lines == [f"note: --max-length 48 differs from the {LENGTH} tokens the model was trained and calibrated "
                     "at"], lines
    assert _report(tmp_path / "report")["settings"]["max_length"] == 48
    capsys.readouterr()
    assert validate_main(_validate(run, "--profile", "canonical", "--limit", "8")) == 0
    assert "note: --profile leaves out cpu-w8a8" in capsys.readouterr().out


def test_new_fields_survive_safetensors_and_bad_values_are_refused(run: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = load_checkpoint(run["model"])
    save_safetensors_checkpoint(checkpoint, tmp_path / "st")
    twin = load_safetensors_checkpoint(tmp_path / "st")
    assert (twin.max_length, twin.fp32_reference) == (checkpoint.max_length, checkpoint.fp32_reference)
    payload = checkpoint.to_payload()
    for key, value, message in (("max_length", "64", "'max_length' must be an integer"),
                                ("max_length", 0, "'max_length' must be an integer"),
                                ("fp32_reference", {"path": "fp32", "sha256": "abc"}, "64 lowercase hex"),
                                ("fp32_reference", {"path": "", "sha256": "0" * 64}, "non-empty string")):
        with pytest.raises(CheckpointError, match=message):
            checkpoint_from_payload(payload | {key: value})
