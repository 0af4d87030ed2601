"""Issue 12 (c): the AQ-BERT search on a tiny random BERT, its discrete recipe, and the CLI's one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertForSequenceClassification

from qbert_deploy.exporters.onnx_export import export_checkpoint
from qbert_deploy.models.aqbert import (
    DEFAULT_DISTILL,
    AQBertError,
    CostModel,
    SearchSettings,
    Target,
    _student_loss,
    finalize,
    plot_choices,
    pruned_distill,
    search,
)
from qbert_deploy.models.build import build_model, make_checkpoint
from qbert_deploy.models.distill import Distiller, DistillWeights
from qbert_deploy.validation.parity import parity_check
from tests.tiny import LABELS, _tokenizer_texts, save_hf_dir, text_batch, tiny_config

SETTINGS = SearchSettings(steps=16, qat_steps=2, arch_lr=0.2, column_bits=8, calibration_batches=1)


def _fp32() -> BertForSequenceClassification:
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config())
    model.config._attn_implementation = "eager"
    return model.eval()


def _batches(count: int, seed: int) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        ids = rng.integers(1000, 30000, size=(4, 12))
        out.append(({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)},
                    rng.integers(0, 2, size=4)))
    return out


def _calibration() -> list[dict[str, torch.Tensor]]:
    return [{k: torch.from_numpy(v) for k, v in inputs.items()} for inputs, _ in _batches(2, 9)]


def test_search_converges_to_a_discrete_recipe_that_meets_the_target(tmp_path: Path) -> None:
    fp32 = _fp32()
    target = Target(keep_macs=0.5)
    result, searched = search(fp32, _batches(4, 0), _batches(4, 1), _calibration(), target, SETTINGS)
    start, end = result.confidence
    assert end > start + 0.1, f"the relaxed choice did not sharpen: {start:.2f} -> {end:.2f}"
    assert result.macs_kept <= 0.5
    structure = result.recipe.structure
    assert structure is not None and result.recipe.version == 2
    for layer, plan in structure.layers.items():
        assert list(plan.head_bits or ()) == sorted(plan.head_bits or (), reverse=True), "widths not contiguous"
        assert len(plan.heads or ()) == int((result.head_choices[layer] > 0).sum())
    plot_choices(result, tmp_path / "choice.png")
    assert (tmp_path / "choice.png").read_bytes()[:4] == b"\x89PNG"

    # the discrete choice, pruned physically and fine-tuned, is a model.pt that exports and matches ORT
    model = finalize(fp32, searched, result, _calibration(), lambda epoch: _batches(2, 10 + epoch), SETTINGS)
    checkpoint = make_checkpoint(model, result.recipe, list(LABELS), _tokenizer_texts())
    export = export_checkpoint(checkpoint, tmp_path / "export")
    for line in parity_check(build_model(checkpoint), export.model_path, text_batch()):
        assert line.max_error_steps <= 2.0, line.line()


def test_a_budget_below_the_fixed_size_is_refused() -> None:
    cost = CostModel.of(_fp32(), 32, 8, 8)
    with pytest.raises(AQBertError, match="cannot be met: with every head and FFN neuron pruned"):
        cost.check(Target(budget_mb=cost.min_size_mb * 0.9))
    cost.check(Target(budget_mb=cost.min_size_mb * 1.5))
    with pytest.raises(AQBertError, match=r"--keep-macs must be in \(0, 1\], got 1.5"):
        Target(keep_macs=1.5)


def test_search_and_qat_distil_logits_and_hidden_states_not_attention() -> None:
    fp32 = _fp32()
    inputs = {k: torch.from_numpy(v) for k, v in _batches(1, 3)[0][0].items()}
    labels = torch.tensor([0, 1, 0, 1])
    same = float(_student_loss(fp32, inputs, labels, Distiller(fp32, DEFAULT_DISTILL)).detach())
    assert same == pytest.approx(0.0, abs=1e-6)
    other = _fp32()
    torch.manual_seed(1)
    other.classifier.reset_parameters()
    assert float(_student_loss(other, inputs, labels, Distiller(fp32, DEFAULT_DISTILL)).detach()) > 1e-4
    task = float(_student_loss(fp32, inputs, labels, None).detach())
    assert task == pytest.approx(float(fp32(**inputs, labels=labels).loss.detach()))
    assert pruned_distill(DistillWeights(1.0, 1.0, 1.0)) == DistillWeights(1.0, 1.0, 0.0)
    assert pruned_distill(None) is None
    with pytest.raises(AQBertError, match="attention scores do not apply to pruned heads"):
        pruned_distill(DistillWeights(logits=0.0, hidden=0.0, attention=1.0))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_dir(_fp32(), tmp_path_factory.mktemp("tinyhf"))


@pytest.mark.parametrize("args, message", [
    (["--keep-macs", "0"], "argument --keep-macs: must be in (0, 1], got 0"),
    (["--keep-macs", "1.5"], "argument --keep-macs: must be in (0, 1], got 1.5"),
    (["--budget-mb", "0.5"], "--budget-mb 0.5 cannot be met: with every head and FFN neuron pruned"),
    ([], "aqbert needs a target: --budget-mb and/or --keep-macs"),
    (["--keep-macs", "0.5", "--distill-logits", "0", "--distill-hidden", "0"],
     "attention scores do not apply to pruned heads"),
])
def test_cli_refuses_bad_targets_and_writes_nothing(tiny_dir: Path, tmp_path: Path, args: list[str],
                                                    message: str) -> None:
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "qbert_deploy.cli.quantize", "--method", "aqbert",
                           "--model", str(tiny_dir), *args, "-o", str(out)],
                          capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in done.stderr, done.stderr
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("budget", [["--finetune-steps", "1", "--qat-steps", "1"],
                                    ["--finetune-epochs", "0.2", "--epochs", "0.2"]], ids=["steps", "epochs"])
def test_cli_aqbert_run_writes_a_pruned_model_pt_and_its_plot(tiny_dir: Path, tmp_path: Path,
                                                              budget: list[str]) -> None:
    from qbert_deploy.checkpoint import load_checkpoint
    from qbert_deploy.data.tsv import Example, write_tsv
    from tests.tiny import SENTENCES

    examples = [Example(s, i % 2) for i, s in enumerate(SENTENCES)]
    write_tsv(tmp_path / "train.tsv", examples * 2)
    write_tsv(tmp_path / "dev.tsv", examples)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "qbert_deploy.cli.quantize", "--method", "aqbert",
                           "--model", str(tiny_dir), "--train", str(tmp_path / "train.tsv"),
                           "--dev", str(tmp_path / "dev.tsv"), "--keep-macs", "0.6", "--search-steps", "2",
                           *budget, "--batch-size", "4",
                           "--calibration-batches", "1", "-o", str(out)],
                          capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-2000:]
    checkpoint = load_checkpoint(out / "model.pt")
    assert checkpoint.recipe.structure is not None and checkpoint.metrics["macs_kept"] <= 0.6
    assert checkpoint.fp32_reference is not None and checkpoint.max_length == 64, "for qbert-validate"
    assert (out / "aqbert_choice.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "aqbert.json").read_text())
    assert summary["settings"]["distill"] == {"logits": 1.0, "hidden": 1.0, "attention": 0.0, "temperature": 1.0,
                                           "own": 0.0}
