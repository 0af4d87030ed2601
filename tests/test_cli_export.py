"""qbert-export on bad inputs: one line on stderr, non-zero exit, no traceback, nothing left behind."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from qbert_deploy.checkpoint import Checkpoint
from qbert_deploy.cli.export import main


class _RunsCode:
    """Unpickling this would create the marker file: a checkpoint must never do that."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (os.system, (f"touch {self.marker}",))


def run_export(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


def assert_clean_failure(code: int, err: str, out: Path, expected: str) -> None:
    assert code != 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qbert-export: error:"), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out.exists(), "a failed export must leave no output directory"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary leftovers"


def payload_with(ckpt: Checkpoint, **changes: object) -> dict[str, object]:
    payload = ckpt.to_payload()
    payload.update(changes)
    return payload


@pytest.mark.parametrize("case", ["missing", "truncated", "not-qbert", "bits-1", "bits-9", "groups", "code"])
def test_bad_checkpoints(case: str, tmp_path: Path, tiny_ckpt: Checkpoint, tiny_model_pt: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    path, out, marker = tmp_path / "model.pt", tmp_path / "out", tmp_path / "ran"
    expected = {"missing": "no such file", "truncated": "truncated or corrupt", "not-qbert": "not a qbert-deploy",
                "bits-1": "bits must be an integer in 2..8", "bits-9": "bits must be an integer in 2..8",
                "groups": "7 groups do not divide 64 output rows", "code": "refused to load"}[case]
    if case == "truncated":
        data = tiny_model_pt.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "not-qbert":
        torch.save({"weights": torch.zeros(3)}, path)
    elif case.startswith("bits"):
        recipe = tiny_ckpt.recipe.to_json() | {"default": {"bits": int(case[-1]), "groups": 4}}
        torch.save(payload_with(tiny_ckpt, recipe=recipe), path)
    elif case == "groups":
        recipe = tiny_ckpt.recipe.to_json() | {"default": {"bits": 4, "groups": 7}}
        torch.save(payload_with(tiny_ckpt, recipe=recipe), path)
    elif case == "code":
        torch.save({"format": "qbert-deploy/model.pt", "evil": _RunsCode(marker)}, path)
    code, err = run_export(capsys, str(path), "-o", str(out))
    assert_clean_failure(code, err, out, expected)
    assert not marker.exists(), "the pickle's code ran"


def test_raw_pickle_with_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, out, marker = tmp_path / "model.pt", tmp_path / "out", tmp_path / "ran"
    path.write_bytes(pickle.dumps(_RunsCode(marker)))
    code, err = run_export(capsys, str(path), "-o", str(out))
    assert code != 0 and "Traceback" not in err, err
    assert not marker.exists(), "the pickle's code ran"
    assert not out.exists()


def test_unwritable_output(tmp_path: Path, tiny_model_pt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "out"
    code, err = run_export(capsys, str(tiny_model_pt), "-o", str(out))
    assert code != 0, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert blocker.read_text() == "not a folder"


def test_zip_that_is_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, out = tmp_path / "model.pt", tmp_path / "out"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("hello.txt", "hi")
    code, err = run_export(capsys, str(path), "-o", str(out))
    assert_clean_failure(code, err, out, "model.pt")


def test_cli_end_to_end_as_a_user_runs_it(tmp_path: Path, tiny_model_pt: Path) -> None:
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "qbert_deploy.cli.export", str(tiny_model_pt), "-o", str(out),
                           "--opset", "25"], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "parity vs PyTorch fake-quant" in proc.stdout and "argmax agreement 100.0%" in proc.stdout, proc.stdout
    assert (out / "model.onnx").is_file() and (out / "size_report.md").is_file()
