"""qbert-quantize end to end on a tiny random BERT: outputs, resume after a kill, and one-line errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qbert_deploy.checkpoint import load_checkpoint
from qbert_deploy.cli.quantize import main
from qbert_deploy.data.tsv import Example, write_tsv
from tests.tiny import SENTENCES, write_tiny_task

FAST = ["--finetune-steps", "2", "--qat-steps", "2", "--hessian-subsets", "2", "--hessian-batch", "4",
        "--hessian-iters", "3", "--calibration-batches", "1", "--batch-size", "4", "--groups", "4"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT as a Hugging Face directory, plus GLUE-style train/dev TSVs beside it."""
    return write_tiny_task(tmp_path_factory.mktemp("tinyhf"))


def _cli(tiny_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "qbert_deploy.cli.quantize", "--model", str(tiny_dir / "model"),
            "--train", str(tiny_dir / "train.tsv"), "--dev", str(tiny_dir / "dev.tsv"), *args]


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=os.environ.copy())


def test_mixed_precision_run_writes_model_sensitivity_and_log(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _run(_cli(tiny_dir, "--avg-bits", "3", "--bit-choices", "2,4", *FAST, "-o", str(out)))
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = load_checkpoint(out / "model.pt")
    bits = {spec.bits for spec in checkpoint.recipe.overrides.values()}
    assert bits == {2, 4}, f"a 2-layer model at 3 average bits from {{2,4}} gets one layer each, got {bits}"
    assert "dev_accuracy_quantized" in checkpoint.metrics
    assert (out / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert '"omega"' in (out / "sensitivity.json").read_text()
    assert "wrote" in (out / "quantize.log").read_text()
    assert not (out / "qat-state.pt").exists(), "the resume state must be removed after a finished run"


@pytest.fixture(scope="module")
def one_class_run(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A run whose training labels are all 0 (dev: 2 of 3 are 0), at --avg-bits 3 with the default
    bit choices: a model that predicts one class only, and (on this tiny model) a uniform allocation."""
    root = tmp_path_factory.mktemp("oneclass")
    write_tsv(root / "train.tsv", [Example(s, 0) for s in SENTENCES] * 4)
    write_tsv(root / "dev.tsv", [Example(s, 0 if i % 3 else 1) for i, s in enumerate(SENTENCES)])
    command = [sys.executable, "-m", "qbert_deploy.cli.quantize", "--model", str(tiny_dir / "model"),
               "--train", str(root / "train.tsv"), "--dev", str(root / "dev.tsv"), *FAST,
               "--finetune-steps", "20", "--lr", "1e-3", "--avg-bits", "3", "-o", str(root / "out")]
    result = _run(command)
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "out", (root / "out" / "quantize.log").read_text()


def test_uniform_allocation_says_why(one_class_run: tuple[Path, str]) -> None:
    out, log = one_class_run
    bits = {spec.bits for spec in load_checkpoint(out / "model.pt").recipe.overrides.values()}
    assert bits == {3}, f"this run is meant to allocate uniform 3 bits, got {bits}"
    assert "a uniform 3-bit allocation fits an average of 3 bits" in log, log[-3000:]
    assert "use --bit-choices 2,4 for a mix" in log, log[-3000:]


def test_one_class_model_is_warned(one_class_run: tuple[Path, str]) -> None:
    _, log = one_class_run
    for who in ("the fp32 model", "the quantized model"):
        assert f"warning: on the dev data, {who} predicts 'negative' for all" in log, log[-3000:]  # SST-2's 0
    assert "(the majority class, " in log, log[-3000:]


def test_killed_run_leaves_no_model_and_resumes(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [*FAST, "--qat-steps", "12", "--save-every", "2", "--bits", "4", "-o", str(out)]
    stderr = (tmp_path / "stderr.txt").open("w")
    process = subprocess.Popen(_cli(tiny_dir, *args), stdout=subprocess.DEVNULL, stderr=stderr,
                               env=os.environ.copy())
    try:
        deadline = time.time() + 600
        while not (out / "qat-state.pt").exists() and time.time() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert (out / "qat-state.pt").exists(), \
            f"QAT never saved a resume state: {(tmp_path / 'stderr.txt').read_text()[-2000:]}"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        stderr.close()
    assert not (out / "model.pt").exists(), "a killed run must not leave a model.pt behind"
    state = torch.load(out / "qat-state.pt", weights_only=True)
    assert state["step"] >= 2, f"resume state at step {state['step']}"
    result = _run(_cli(tiny_dir, *args))
    assert result.returncode == 0, result.stderr[-2000:]
    log = (out / "quantize.log").read_text()
    assert "resuming QAT from step" in log, log[-2000:]
    assert "fp32: reusing the fine-tuned baseline" in log, log[-2000:]
    load_checkpoint(out / "model.pt")
    # Other settings are another run: the saved state is not applied to a different schedule.
    state_args = [a if a != "12" else "4" for a in args]
    (out / "qat-state.pt").write_bytes((out / "model.pt").read_bytes())
    result = _run(_cli(tiny_dir, *state_args))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "belongs to another run" in (out / "quantize.log").read_text()


@pytest.mark.parametrize(("args", "message"), [
    (["--bits", "4", "--groups", "5"], "groups do not divide"),
    (["--preset", "w4", "--method", "ptq-aciq"], "--preset names Q-BERT settings"),
    (["--avg-bits", "1.5"], "must be at least 2"),
    (["--avg-bits", "2.0", "--bit-choices", "3,4"], "no allocation"),
    (["--bits", "4", "--recipe", "x.json"], "not allowed with argument"),
    (["--recipe", "/nonexistent/r.json"], "no such recipe file"),
    (["--bits", "4", "--quant-noise", "1.5"], "must be in [0, 1)"),
    (["--bits", "9"], "invalid choice"),
    (["--bit-choices", "2,9", "--avg-bits", "3"], "bit widths must be in 2..8"),
    (["--bits", "4", "--labels", "only"], "at least two distinct names"),
    (["--bits", "4", "--epochs", "0"], "epoch count must be greater than 0"),
    (["--bits", "4", "--finetune-epochs", "-1"], "epoch count must be greater than 0"),
    (["--bits", "4", "--distill-logits", "-1"], "must be finite and >= 0"),
    (["--bits", "4", "--distill-logits", "0", "--distill-hidden", "0", "--distill-attention", "0"], "all zero"),
    (["--bits", "4", "--distill", "none", "--distill-hidden", "1"], "given with --distill none"),
    (["--bits", "4", "--method", "directq", "--distill", "full"], "distillation needs qbert or q8bert"),
])
def test_bad_inputs_fail_in_one_line(tiny_dir: Path, tmp_path: Path, args: list[str], message: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    # In process (main() is what the console script calls): a subprocess per case would cost seconds of imports.
    argv = _cli(tiny_dir, *FAST, *args, "-o", str(tmp_path / "out"))[3:]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert code not in (0, None), f"expected a failure for {args}"
    assert message in stderr, stderr[-1500:]
    assert "Traceback" not in stderr, stderr[-1500:]
    assert lines[-1].startswith("qbert-quantize: error:"), lines[-3:]
    assert not (tmp_path / "out" / "model.pt").exists()
    if "--epochs" in args or any(a.startswith("--distill") for a in args):
        assert not (tmp_path / "out").exists(), "a refused run writes nothing"


def _teacher(root: Path, **changes: object) -> Path:
    """A teacher directory whose config.json differs from the student's by `changes` (the config is all the check
    reads: it refuses before any model is loaded)."""
    import json

    config = json.loads((root.parent / "model" / "config.json").read_text()) if (root.parent / "model").exists() \
        else {}
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({**config, **changes}))
    return root


@pytest.mark.parametrize(("changes", "message"), [
    ({"id2label": {"0": "a", "1": "b", "2": "c"}}, "the teacher predicts 3 labels"),
    ({"hidden_size": 32}, "the teacher's hidden_size is 32"),
    ({"id2label": {"0": "x", "1": "y"}}, "the teacher's labels"),
])
def test_wrong_teacher_is_a_one_line_error(tiny_dir: Path, tmp_path: Path, changes: dict[str, object],
                                           message: str, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    shutil.copytree(tiny_dir / "model", tmp_path / "model")
    teacher = _teacher(tmp_path / "teacher", **changes)
    argv = _cli(tiny_dir, *FAST, "--bits", "4", "--labels", "negative,positive", "--teacher", str(teacher), "-o",
                str(tmp_path / "out"))[3:]
    code = main(argv)
    stderr = capsys.readouterr().err
    assert code == 2 and message in stderr and "Traceback" not in stderr, stderr[-1500:]
    assert stderr.strip().splitlines()[-1].startswith("qbert-quantize: error:")
    assert not (tmp_path / "out").exists(), "a refused run writes nothing"


def test_q8bert_with_distillation_and_quant_noise_exports(tiny_dir: Path, tmp_path: Path) -> None:
    from qbert_deploy.exporters.onnx_export import export_checkpoint
    from qbert_deploy.models.build import build_model
    from qbert_deploy.validation.parity import parity_check
    from tests.tiny import text_batch

    out = tmp_path / "out"
    code = main(_cli(tiny_dir, *FAST, "--method", "q8bert", "--bits", "8", "--groups", "1", "--distill", "full",
                     "--learn-ranges", "mse", "--quant-noise", "0.5", "-o", str(out))[3:])
    assert code == 0
    checkpoint = load_checkpoint(out / "model.pt")
    assert 0.0 <= checkpoint.metrics["dev_agreement_fp32"] <= 1.0
    assert "distils from the fp32 model" in (out / "quantize.log").read_text()
    result = export_checkpoint(checkpoint, tmp_path / "export", opset=21)
    for line in parity_check(build_model(checkpoint), result.model_path, text_batch()):
        assert line.max_error_steps <= 2.0, line.line()


def test_missing_data_and_model_are_one_line_errors(tiny_dir: Path, tmp_path: Path) -> None:
    for command, message in [
        ([sys.executable, "-m", "qbert_deploy.cli.quantize", "--model", str(tmp_path), "--bits", "4", "-o",
          str(tmp_path / "a")], "no config.json"),
        ([sys.executable, "-m", "qbert_deploy.cli.quantize", "--model", str(tiny_dir / "model"), "--train",
          str(tmp_path / "none.tsv"), "--dev", str(tiny_dir / "dev.tsv"), "--bits", "4", "-o", str(tmp_path / "b")],
         "no such data file"),
        ([sys.executable, "-m", "qbert_deploy.cli.quantize", "--model", str(tiny_dir / "model"), "--train",
          str(tiny_dir / "train.tsv"), "--bits", "4", "-o", str(tmp_path / "c")], "give both --train and --dev"),
    ]:
        result = _run(command)
        assert result.returncode == 2, (command, result.stderr[-1500:])
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-1500:]
