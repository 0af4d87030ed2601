"""Issue 18, item 6: qbert-quantize's caches (fp32/, sensitivity.json, qat-state.pt) are keyed on the content of
the data and models and on the settings, and a run resumed after a kill writes the model an uninterrupted run
writes, bit for bit."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

from qbert_deploy.checkpoint import load_checkpoint
from qbert_deploy.cli.quantize import main as quantize_main
from qbert_deploy.data.tsv import Example, write_tsv
from tests.test_quantize_cli import FAST
from tests.tiny import SENTENCES, save_hf_dir, tiny_config

MIXED = ["--avg-bits", "3", "--bit-choices", "2,4", *FAST]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT with dropout (as real models have: training draws random numbers) and train/dev TSVs."""
    root = tmp_path_factory.mktemp("cachekeys")
    torch.manual_seed(0)
    config = tiny_config()
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.1
    save_hf_dir(BertForSequenceClassification(config), root / "model")
    examples = [Example(s, i % 2) for i, s in enumerate(SENTENCES)]
    write_tsv(root / "train.tsv", examples * 4)
    write_tsv(root / "dev.tsv", examples)
    return root


def _args(base: Path, out: Path, *extra: str, train: str = "train.tsv") -> list[str]:
    return ["--model", str(base / "model"), "--train", str(base / train), "--dev", str(base / "dev.tsv"), *MIXED,
            *extra, "-o", str(out)]


def _command(base: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qbert_deploy.cli.quantize", *_args(base, out, *extra)]


def _assert_same_model(a: Path, b: Path) -> None:
    first, second = load_checkpoint(a / "model.pt"), load_checkpoint(b / "model.pt")
    assert first.state_dict.keys() == second.state_dict.keys()
    differing = [name for name, tensor in first.state_dict.items() if not torch.equal(tensor, second.state_dict[name])]
    assert not differing, f"{len(differing)} of {len(first.state_dict)} tensors differ, e.g. {differing[:3]}"
    assert first.activation_ranges == second.activation_ranges and first.recipe == second.recipe
    assert first.metrics == second.metrics


def test_flipped_labels_are_not_served_from_the_caches(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert quantize_main(_args(base, out)) == 0
    flipped = [Example(s, 1 - i % 2) for i, s in enumerate(SENTENCES)]
    write_tsv(base / "flipped.tsv", flipped * 4)  # the same rows, every label flipped
    assert quantize_main(_args(base, out, train="flipped.tsv")) == 0
    log = (out / "quantize.log").read_text().split("wrote")[-2]  # the second run's lines
    assert "fp32: reusing" not in log and "sensitivity: reusing" not in log, log
    assert "was made differently (training data changed); fine-tuning again" in log, log
    assert "was computed differently (fp32 model, training data changed); computing it again" in log, log
    assert quantize_main(_args(base, out, train="flipped.tsv")) == 0
    log = (out / "quantize.log").read_text().split("wrote")[-2]
    assert "fp32: reusing the fine-tuned baseline" in log and "sensitivity: reusing" in log, log


def test_resumed_runs_equal_an_uninterrupted_run(base: Path, tmp_path: Path) -> None:
    steps = ["--qat-steps", "20", "--save-every", "1"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    subprocess.run(_command(base, whole, *steps), check=True, capture_output=True, env=env, timeout=900)
    # Killed before QAT, after the fp32 model and the sensitivity were written: the rerun reuses both.
    early = tmp_path / "early"
    early.mkdir()
    shutil.copytree(whole / "fp32", early / "fp32")
    shutil.copy(whole / "sensitivity.json", early / "sensitivity.json")
    subprocess.run(_command(base, early, *steps), check=True, capture_output=True, env=env, timeout=900)
    assert "sensitivity: reusing" in (early / "quantize.log").read_text()
    _assert_same_model(whole, early)
    # Killed (SIGKILL) in the middle of QAT, as soon as a resume state is on disk.
    killed = tmp_path / "killed"
    process = subprocess.Popen(_command(base, killed, *steps), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 600
        while not (killed / "qat-state.pt").exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert not (killed / "model.pt").exists(), "killed before the end of QAT"
    step = torch.load(killed / "qat-state.pt", weights_only=True)["step"]
    subprocess.run(_command(base, killed, *steps), check=True, capture_output=True, env=env, timeout=900)
    assert f"resuming QAT from step {step}" in (killed / "quantize.log").read_text()
    _assert_same_model(whole, killed)
