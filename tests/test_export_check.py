"""qbert-export --check: an intact export passes; each kind of damage fails the check that names it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from qbert_deploy.cli.export import main
from qbert_deploy.exporters.check import check_export


def test_intact_export_passes_every_check(tiny_export: Path, tiny_model_pt: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--check", str(tiny_export), "--checkpoint", str(tiny_model_pt)]) == 0
    out = capsys.readouterr().out
    assert "all 9 checks passed" in out, out
    for name in ("files", "onnx checker", "recipe hash", "weights hash", "file hashes", "labels",
                 "onnxruntime opset", "servable", "checkpoint digest"):
        assert f"ok   {name}:" in out, out


def _edit_model(folder: Path, edit: Callable[[onnx.ModelProto], None]) -> None:
    model = onnx.load(str(folder / "model.onnx"))
    edit(model)
    onnx.save(model, str(folder / "model.onnx"))


def _set_meta(key: str, value: str) -> Callable[[onnx.ModelProto], None]:
    def edit(model: onnx.ModelProto) -> None:
        for prop in model.metadata_props:
            if prop.key == key:
                prop.value = value
    return edit


def _flip_weight(model: onnx.ModelProto) -> None:
    init = next(t for t in model.graph.initializer if t.name.endswith("query.weight_q"))
    raw = bytearray(init.raw_data)
    raw[0] ^= 0x11
    init.raw_data = bytes(raw)


def _opset(model: onnx.ModelProto) -> None:
    model.opset_import[0].version = 99


def _recipe_json(folder: Path) -> None:
    path = folder / "qbert_recipe.json"
    data = json.loads(path.read_text())
    data["default"]["bits"] = 8
    path.write_text(json.dumps(data))


DAMAGE: list[tuple[str, Callable[[Path], None], str, str]] = [
    # transformers 5 saves no vocab.txt beside tokenizer.json; 4.x saves both
    ("tokenizer missing", lambda f: (f / "vocab.txt").unlink(missing_ok=True) or (f / "tokenizer.json").unlink(),
     "files", "missing tokenizer.json"),
    ("model truncated", lambda f: (f / "model.onnx").write_bytes((f / "model.onnx").read_bytes()[:5000]),
     "onnx checker", ""),
    ("weight flipped", lambda f: _edit_model(f, _flip_weight), "weights hash", "weights changed"),
    ("recipe edited", _recipe_json, "recipe hash", "qbert_recipe.json hashes to"),
    ("recipe hash forged", lambda f: _edit_model(f, _set_meta("qbert.recipe_sha256", "0" * 64)), "recipe hash",
     "metadata recipe hashes to"),
    ("labels", lambda f: _edit_model(f, _set_meta("qbert.labels", '["a", "b"]')), "labels",
     "differ from model.onnx labels"),
    ("opset", lambda f: _edit_model(f, _opset), "onnxruntime opset", "opset 99 is not supported by onnxruntime"),
]


@pytest.mark.parametrize("case, damage, check, detail", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damage_fails_the_right_check(tmp_path: Path, tiny_export: Path, case: str, damage: Callable[[Path], None],
                                      check: str, detail: str) -> None:
    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    damage(folder)
    failed = {r.name: r.detail for r in check_export(folder) if not r.ok}
    assert check in failed, f"{case}: expected '{check}' to fail, failures: {failed}"
    assert detail in failed[check], failed[check]


def test_checkpoint_mismatch_and_exit_code(tmp_path: Path, tiny_export: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from qbert_deploy.checkpoint import save_checkpoint
    from tests.tiny import tiny_checkpoint

    other = tmp_path / "other.pt"
    save_checkpoint(tiny_checkpoint(seed=1), other)
    assert main(["--check", str(tiny_export), "--checkpoint", str(other)]) == 1
    captured = capsys.readouterr()
    assert "FAIL checkpoint digest: ValueError:" in captured.out, captured.out
    assert captured.err.startswith("qbert-export: error:") and "checkpoint digest" in captured.err


def test_check_and_export_arguments(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main([]) == 2
    assert "give a checkpoint and -o/--out" in capsys.readouterr().err
    assert main(["--check", str(tmp_path / "nope")]) == 1
    assert "FAIL export directory:" in capsys.readouterr().out
