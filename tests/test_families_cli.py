"""Each family through the commands: qbert-quantize -> qbert-export --lower cpu-w8a8 -> qbert-validate, a real
server and Triton repository without token_type_ids, and a one-line refusal (exit 2) of an unsupported model_type
from every command, with nothing written."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from qbert_deploy.checkpoint import load_checkpoint, save_checkpoint
from qbert_deploy.cli import export, quantize, serve, triton_repo, validate
from qbert_deploy.data.tsv import Example, write_tsv
from qbert_deploy.exporters.onnx_export import export_checkpoint
from tests.served import Reference, running_server
from tests.stack import needs_optimum
from tests.tiny import FAMILIES, LABELS, SENTENCES, save_hf_dir, text_batch, tiny_checkpoint, tiny_model

FAST = ["--finetune-steps", "4", "--qat-steps", "2", "--calibration-batches", "1", "--batch-size", "4",
        "--groups", "4", "--lr", "1e-3", "--hessian-subsets", "2", "--hessian-batch", "4", "--hessian-iters", "3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("family-data")
    examples = [Example(s, i % 2) for i, s in enumerate(SENTENCES)]
    write_tsv(root / "train.tsv", examples * 2)
    write_tsv(root / "dev.tsv", examples)
    return root


def _hf_dir(model_type: str, root: Path) -> Path:
    return save_hf_dir(tiny_model(model_type), root / f"hf-{model_type}")


# One method per family keeps the run short while each family meets QAT, the Hessian allocation or PTQ somewhere;
# tests/test_families.py covers the Hessian and the allocation for every family in process.
METHODS = {"bert": ["--bits", "4"], "distilbert": ["--avg-bits", "3", "--bit-choices", "2,4"],
           "roberta": ["--method", "ptq-aciq", "--bits", "4"]}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_quantize_export_lower_validate(model_type: str, data: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = _hf_dir(model_type, tmp_path)
    out = tmp_path / "q"
    assert quantize.main(["--model", str(model_dir), "--train", str(data / "train.tsv"), "--dev",
                          str(data / "dev.tsv"), *METHODS[model_type], *FAST, "-o", str(out)]) == 0, \
        capsys.readouterr().err
    checkpoint = load_checkpoint(out / "model.pt")
    assert checkpoint.config["model_type"] == model_type
    if model_type == "distilbert":
        bits = {spec.bits for spec in checkpoint.recipe.overrides.values()}
        assert bits == {2, 4}, f"two layers at 3 average bits from {{2,4}}: one layer each, got {bits}"
    assert export.main([str(out / "model.pt"), "-o", str(tmp_path / "export"), "--lower", "cpu-w8a8"]) == 0, \
        capsys.readouterr().err
    assert (tmp_path / "export" / "model.cpu-w8a8.onnx").is_file()
    report = tmp_path / "report"
    code = validate.main([str(tmp_path / "export"), "--checkpoint", str(out / "model.pt"), "--data",
                          str(data / "dev.tsv"), "--profile", "canonical,cpu-w8a8", "--layerwise",
                          "--layer-examples", "4", "--report", str(report)])
    assert code == 0, capsys.readouterr()
    saved = json.loads((report / "report.json").read_text())
    text = json.dumps(saved)
    assert "ort-cpu-cpu-w8a8" in text and f"{model_type}" in text, text[:500]
    assert (report / "layer_error.png").is_file()


@pytest.mark.parametrize("model_type", ["distilbert", "roberta"])
def test_server_and_triton_repo_without_token_types(model_type: str, tmp_path: Path) -> None:
    out = tmp_path / "export"
    export_checkpoint(tiny_checkpoint(model_type=model_type), out)
    assert triton_repo.main([str(out), "-o", str(tmp_path / "repo")]) == 0
    config = (tmp_path / "repo" / "qbert" / "config.pbtxt").read_text()
    assert '"attention_mask"' in config and "token_type_ids" not in config, config
    reference = Reference(out / "model.onnx")
    with running_server(out, tmp_path) as server:
        client = triton.InferenceServerClient(server.hostport)
        meta = client.get_model_metadata("qbert")
        assert [t["name"] for t in meta["inputs"]] == ["input_ids", "attention_mask"], meta
        feeds = text_batch(model_type=model_type)
        inputs = []
        for name, array in feeds.items():
            tensor = triton.InferInput(name, list(array.shape), "INT64")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        served = client.infer("qbert", inputs).as_numpy("logits")
        assert float(np.abs(served - reference.logits(feeds)).max()) <= 1e-5
        response = httpx.post(f"{server.url}/v2/models/qbert/classify", json={"text": SENTENCES})
        assert response.status_code == 200, response.text
        logits = reference.logits(feeds)
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        got = np.array([[p["probabilities"][label] for label in LABELS] for p in response.json()["predictions"]])
        assert float(np.abs(got - probs).max()) <= 1e-5


def _refused(main: Callable[[Sequence[str]], int], argv: list[str], prog: str,
             capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, (code, err)
    assert err[0].startswith(f"{prog}: error:") and "model_type 'gpt2' is not supported; supported: bert, " \
        "roberta, distilbert" in err[0], err


def test_unsupported_model_type_is_refused_by_every_command(data: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    hf = _hf_dir("bert", tmp_path)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    _refused(quantize.main, ["--model", str(hf), "--train", str(data / "train.tsv"), "--dev", str(data / "dev.tsv"),
                             "--bits", "4", "-o", str(tmp_path / "q")], "qbert-quantize", capsys)
    assert not (tmp_path / "q").exists()

    good = tiny_checkpoint()
    export_checkpoint(good, tmp_path / "export")
    foreign = dataclasses.replace(good, config={**good.config, "model_type": "gpt2"})
    save_checkpoint(foreign, tmp_path / "gpt2.pt")
    _refused(export.main, [str(tmp_path / "gpt2.pt"), "-o", str(tmp_path / "x")], "qbert-export", capsys)
    assert not (tmp_path / "x").exists()
    _refused(validate.main, [str(tmp_path / "export"), "--checkpoint", str(tmp_path / "gpt2.pt"), "--data",
                             str(data / "dev.tsv"), "--report", str(tmp_path / "r")], "qbert-validate", capsys)
    assert not (tmp_path / "r").exists()

    shutil.copytree(tmp_path / "export", tmp_path / "foreign")
    exported = json.loads((tmp_path / "foreign" / "config.json").read_text())
    (tmp_path / "foreign" / "config.json").write_text(json.dumps({**exported, "model_type": "gpt2"}))
    _refused(triton_repo.main, [str(tmp_path / "foreign"), "-o", str(tmp_path / "repo")], "qbert-triton-repo",
             capsys)
    assert not (tmp_path / "repo").exists()
    _refused(serve.main, [str(tmp_path / "foreign"), "--port", "0"], "qbert-serve", capsys)


@needs_optimum
@pytest.mark.parametrize("model_type", ["distilbert", "roberta"])
def test_export_dir_runs_in_optimum_and_a_pipeline(model_type: str, tmp_path: Path) -> None:
    import warnings

    from transformers import AutoTokenizer, pipeline

    out = tmp_path / "export"
    export_checkpoint(tiny_checkpoint(model_type=model_type), out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from optimum.onnxruntime import ORTModelForSequenceClassification

        model = ORTModelForSequenceClassification.from_pretrained(out)
    assert model.config.model_type == model_type
    classify = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(out))
    results = classify(SENTENCES, top_k=None)
    logits = Reference(out / "model.onnx").logits(text_batch(model_type=model_type))
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    got = np.array([[next(s["score"] for s in scores if s["label"] == label) for label in LABELS]
                    for scores in results])
    assert float(np.abs(got - expected).max()) <= 1e-5, (got, expected)
