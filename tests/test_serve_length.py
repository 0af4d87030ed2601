"""qbert-serve cuts text at the length the model was trained at (issue 18 item 2), and says so when overridden."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from qbert_deploy.checkpoint import Checkpoint
from qbert_deploy.exporters.onnx_export import export_checkpoint
from qbert_deploy.runtimes.export_dir import ExportDirError
from qbert_deploy.runtimes.serving import ServedModel
from tests.served import running_server

LONG_TEXT = "a good film with a long story " * 40  # far more than 16 tokens
TRAINED = 16


@pytest.fixture(scope="module")
def trained_at_16(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Checkpoint) -> Path:
    out = tmp_path_factory.mktemp("length") / "export"
    export_checkpoint(dataclasses.replace(tiny_ckpt, max_length=TRAINED), out, opset=21, lower=["cpu-w8a8"])
    return out


def test_the_server_cuts_at_the_trained_length_by_default(trained_at_16: Path) -> None:
    model = ServedModel(trained_at_16)
    assert (model.trained_length, model.max_length) == (TRAINED, TRAINED)
    encoded = model.encode([LONG_TEXT])
    assert encoded.feeds["input_ids"].shape[1] == TRAINED and encoded.truncated == [True]


def test_an_asked_length_overrides_it_within_the_position_table(trained_at_16: Path) -> None:
    assert ServedModel(trained_at_16, max_length=24).encode([LONG_TEXT]).feeds["input_ids"].shape[1] == 24
    positions = ServedModel(trained_at_16, max_length=TRAINED).config.max_length
    with pytest.raises(ExportDirError, match=f"--max-length {positions + 1} is beyond the model's {positions}"):
        ServedModel(trained_at_16, max_length=positions + 1)


def test_an_export_without_a_recorded_length_serves_the_position_table(tiny_export: Path) -> None:
    model = ServedModel(tiny_export)
    assert model.trained_length is None and model.max_length == model.config.max_length


@pytest.mark.parametrize(("args", "said"), [
    ((), f"at most {TRAINED} tokens per sequence, the length the model was trained at (--max-length overrides)"),
    (("--max-length", "24"), f"note: --max-length 24 overrides the trained length {TRAINED}: accuracy beyond "
                             f"{TRAINED} tokens was not validated"),
])
def test_the_cli_says_which_length_it_serves(trained_at_16: Path, tmp_path: Path, args: tuple[str, ...],
                                             said: str) -> None:
    with running_server(trained_at_16, tmp_path, *args) as running:
        metadata = httpx.get(f"{running.url}/v2/models/qbert", timeout=10).json()
        log = running.log.read_text()
    assert metadata["parameters"]["max_sequence_length"] == (24 if args else TRAINED)
    assert f"qbert-serve: {said}" in log, log


def test_a_length_beyond_the_table_is_one_line_and_a_failed_exit(trained_at_16: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "qbert_deploy.cli.serve", str(trained_at_16), "--max-length",
                           "100000", "--port", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "--max-length 100000 is beyond" in done.stderr
