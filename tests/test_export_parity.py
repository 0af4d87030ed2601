"""Issue 18, item 5: qbert-export's parity check judges the logit error in output steps, on inputs that look like
text, never fails a healthy model on argmax ties, and a failure leaves nothing in place."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForQuestionAnswering

from qbert_deploy.checkpoint import save_checkpoint
from qbert_deploy.cli.export import main as export_main
from qbert_deploy.exporters.onnx_export import export_checkpoint
from qbert_deploy.models.build import make_checkpoint
from qbert_deploy.models.wrap import calibrate, quantize_model
from qbert_deploy.recipe import Recipe, WeightQuant
from qbert_deploy.tasks import QA, QA_LABELS
from qbert_deploy.validation.parity import ParityError, export_verifier, parity_batch
from tests.tiny import _tokenizer_texts, calibration_batches, tiny_checkpoint, tiny_config, tokenizer


def _tied_qa_model_pt(folder: Path) -> Path:
    """A tiny random QA model.pt whose end logit of every token is its start logit to within float noise: a
    healthy model (ONNX reproduces it to 1e-7) whose start-vs-end argmax is a coin toss on any input."""
    torch.manual_seed(0)
    model = AutoModelForQuestionAnswering.from_config(tiny_config(), attn_implementation="eager").eval()
    with torch.no_grad():
        head = model.qa_outputs
        head.weight[1] = head.weight[0] + 1e-9 * torch.randn(head.weight.shape[1])
        head.bias[1] = head.bias[0]
    recipe = Recipe(default=WeightQuant(bits=4, groups=4))
    quantize_model(model, recipe)
    calibrate(model, calibration_batches())
    path = folder / "model.pt"
    save_checkpoint(make_checkpoint(model, recipe, list(QA_LABELS), _tokenizer_texts(), task=QA, max_length=64), path)
    return path


def test_a_healthy_model_with_tied_logits_exports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_pt, out = _tied_qa_model_pt(tmp_path), tmp_path / "export"
    code = export_main([str(model_pt), "-o", str(out), "--lower", "cpu-w8a8"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    lines = [line for line in printed.out.splitlines() if line.startswith("parity vs PyTorch fake-quant")]
    medians = [float(line.split("output steps, median ")[1].split(";")[0]) for line in lines]
    assert len(medians) == 2 and max(medians) < 0.01, printed.out
    assert (out / "model.onnx").is_file() and (out / "model.cpu-w8a8.onnx").is_file()
    assert export_main(["--check", str(out), "--checkpoint", str(model_pt)]) == 0


def test_parity_inputs_are_encoded_like_text() -> None:
    vocab = tokenizer().get_vocab()  # type: ignore[attr-defined]
    cls, sep, pad = vocab["[CLS]"], vocab["[SEP]"], vocab["[PAD]"]
    qa = replace(tiny_checkpoint(), task=QA, max_length=48)
    batch = parity_batch(qa)
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    lengths = mask.sum(1)
    assert ids.shape[1] <= 48 and len(set(lengths.tolist())) > 1, "ragged rows, no longer than model.pt's length"
    for row, length in enumerate(lengths):
        text = ids[row, :length]
        assert text[0] == cls and text[-1] == sep and (text == sep).sum() == 2, "question [SEP] context [SEP]"
        assert (ids[row, length:] == pad).all() and (mask[row, :length] == 1).all()
        context = types[row, :length].astype(bool)
        assert context.any() and context[-1] and not context[0], "the context has token type 1"
        words = text[(text != cls) & (text != sep)]
        assert (words > 999).all(), "words of the vocabulary, not [unused] or other special tokens"
    sequence = parity_batch(tiny_checkpoint())
    assert (sequence["token_type_ids"] == 0).all() and sequence["input_ids"].shape[1] <= 64


def test_a_parity_failure_leaves_nothing_in_place(tmp_path: Path) -> None:
    exported, other = tiny_checkpoint(seed=0), tiny_checkpoint(seed=1)  # PyTorch side of another model: all wrong
    out = tmp_path / "export"
    with pytest.raises(ParityError, match=r"median [\d.]+ output steps \(at most 0.5 allowed\)"):
        export_checkpoint(exported, out, verify=export_verifier(other, report=lambda line: None))
    assert not out.exists() and list(tmp_path.iterdir()) == [], "no export and no temporary folder left"
    export_checkpoint(exported, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ParityError):
        export_checkpoint(exported, out, opset=25, verify=export_verifier(other, report=lambda line: None))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "the earlier export is left as it was"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
