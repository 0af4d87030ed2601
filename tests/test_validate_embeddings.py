"""qbert-validate on an embedding export: fidelity to fp32 and fake-quant, the probe, the gate, the first departure.

The model is conftest's label-free 4-bit model.pt of a tiny random sentence-transformers directory, exported by
qbert-export; every backend is a real PyTorch model or ORT session.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx_ir as ir
import pytest

from qbert_deploy.cli.validate import main
from tests.tiny import SENTENCES

CORRUPTED = "bert.encoder.layer.1.attention.output.dense"
PROFILES = "canonical,cpu-w8a8"


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A labelled dev TSV (its labels are the probe's test labels), a labelled probe-train TSV and a .txt file."""
    root = tmp_path_factory.mktemp("emb-validate")
    labelled = [f"{text}\t{i % 2}" for i, text in enumerate(SENTENCES)]
    (root / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(labelled) + "\n")
    (root / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(labelled * 3) + "\n")
    (root / "dev.txt").write_text("\n".join(SENTENCES) + "\n")
    return {"root": root, "dev": root / "dev.tsv", "train": root / "train.tsv", "txt": root / "dev.txt"}


def _args(export: Path, model_pt: Path, data: Path, *extra: str) -> list[str]:
    return [str(export), "--checkpoint", str(model_pt), "--data", str(data), "--profile", PROFILES, *extra]


def test_clean_embedding_export_passes_with_fidelity_and_probe(embedding_export: Path, embedding_model_pt: Path,
                                                              texts: dict[str, Path]) -> None:
    report_dir = texts["root"] / "report"
    assert main(_args(embedding_export, embedding_model_pt, texts["dev"], "--probe-train", str(texts["train"]),
                      "--min-cosine", "0.99", "--min-neighbours", "0.8", "--report", str(report_dir))) == 0
    report = json.loads((report_dir / "report.json").read_text())
    rows = {b["name"]: b for b in report["backends"]}
    # the fp32 row is the encoder qbert-quantize saved beside model.pt, with its pooling
    assert set(rows) == {"pytorch-fp32", "pytorch-master-weights", "pytorch-fakequant", "ort-spec",
                         "ort-cpu-canonical", "ort-cpu-cpu-w8a8"}
    assert report["data"] == report["data"] | {"examples": len(SENTENCES), "task": "feature-extraction"}
    for name, row in rows.items():
        metrics = row["metrics"]
        assert row["metric"] == "mean_cosine_fp32"
        assert set(metrics) == {"mean_cosine_fp32", "p5_cosine_fp32", "neighbours_10_fp32", "probe_accuracy"}
        assert 99.0 <= metrics["mean_cosine_fp32"] <= 100.0 + 1e-6, (name, metrics)
        assert metrics["p5_cosine_fp32"] <= metrics["mean_cosine_fp32"] + 1e-9
        assert 0.0 <= metrics["probe_accuracy"] <= 100.0
        assert set(row["agreements_fakequant"]) == {"mean_cosine", "p5_cosine", "neighbours_10"}
    # ORT reproduces PyTorch fake-quant, and fp32 is its own reference
    assert rows["ort-spec"]["agreements_fakequant"]["mean_cosine"] > 99.999
    assert rows["pytorch-fp32"]["metrics"]["mean_cosine_fp32"] == pytest.approx(100.0)
    assert "probe accuracy %" in (report_dir / "report.md").read_text()


def test_gate_fails_on_a_corrupted_scale_and_names_the_layer(embedding_export: Path, embedding_model_pt: Path,
                                                             texts: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    corrupted = tmp_path / "corrupted"
    shutil.copytree(embedding_export, corrupted)
    for lowered in corrupted.glob("model.*.onnx"):
        lowered.unlink()  # cpu-w8a8 is then lowered from the corrupted model.onnx, as qbert-serve would
    model = ir.load(corrupted / "model.onnx")
    scale = model.graph.initializers[f"{CORRUPTED}.weight_scale"]
    assert scale.const_value is not None
    scale.const_value = ir.tensor(scale.const_value.numpy() * 3.0, name=scale.name)
    ir.save(model, corrupted / "model.onnx")
    report_dir = tmp_path / "report"
    code = main(_args(corrupted, embedding_model_pt, texts["txt"], "--layerwise", "--layer-examples", "8",
                      "--report", str(report_dir)))
    assert code == 1
    err = capsys.readouterr().err
    # the backends that must reproduce the spec fail on their error (a lowered profile answers to --min-agreement)
    assert "GATE FAILED" in err and "ort-spec" in err and "ort-cpu-canonical" in err, err
    report = json.loads((report_dir / "report.json").read_text())
    departures = report["layerwise"]["first_departure"]
    assert departures["ort-spec"] == CORRUPTED and departures["ort-cpu-canonical"] == CORRUPTED, departures


def test_fidelity_gate_fails_below_its_bound(embedding_export: Path, embedding_model_pt: Path,
                                             texts: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    # a 4-bit model cannot hold cosine 1 to fp32: the bound is checked, not just printed
    assert main(_args(embedding_export, embedding_model_pt, texts["txt"], "--min-cosine", "1.0")) == 1
    err = capsys.readouterr().err
    assert "mean cosine vs fp32" in err and "pytorch-fakequant" in err, err


@pytest.mark.parametrize("extra, data, message", [
    (("--min-cosine", "1.5"), "txt", "--min-cosine must be in 0..1"),
    (("--probe-train", "TRAIN"), "txt", "the probe needs labelled texts"),
    (("--probe-train", "TXT"), "dev", "the probe needs labelled texts"),
])
def test_bad_embedding_validation_input_is_one_line(embedding_export: Path, embedding_model_pt: Path,
                                                    texts: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                                    extra: tuple[str, ...], data: str, message: str) -> None:
    named = {"TRAIN": str(texts["train"]), "TXT": str(texts["txt"])}
    report_dir = texts["root"] / "bad-report"
    args = _args(embedding_export, embedding_model_pt, texts[data], *(named.get(e, e) for e in extra),
                 "--report", str(report_dir))
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not report_dir.exists()


def test_embedding_options_on_a_classifier_are_refused(tiny_export: Path, tiny_model_pt: Path,
                                                       texts: dict[str, Path],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tiny_export), "--checkpoint", str(tiny_model_pt), "--data", str(texts["dev"]),
                 "--min-cosine", "0.9"]) == 2
    assert "gate embedding models" in capsys.readouterr().err
    assert main([str(tiny_export), "--checkpoint", str(tiny_model_pt), "--data", str(texts["dev"]),
                 "--probe-train", str(texts["train"])]) == 2
    assert "--probe-train is for embedding models" in capsys.readouterr().err
