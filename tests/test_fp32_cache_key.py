"""The fp32 cache is keyed on what the base model is (its files' content), not on where it is installed."""

from __future__ import annotations

import shutil
from pathlib import Path

from qbert_deploy.models.task import base_fingerprint


def _base(folder: Path, hidden: int, weight_bytes: int = 64) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(f'{{"model_type": "bert", "hidden_size": {hidden}}}')
    (folder / "model.safetensors").write_bytes(b"\0" * weight_bytes)
    return folder


def test_same_model_in_two_places_has_one_key(tmp_path: Path) -> None:
    first = _base(tmp_path / "venv-a" / "model", 8)
    second = tmp_path / "venv-b" / "model"
    shutil.copytree(first, second)
    assert base_fingerprint(first) == base_fingerprint(second)


def test_another_config_or_weights_file_has_another_key(tmp_path: Path) -> None:
    first = _base(tmp_path / "a" / "model", 8)
    assert base_fingerprint(first) != base_fingerprint(_base(tmp_path / "b" / "model", 16))
    assert base_fingerprint(first) != base_fingerprint(_base(tmp_path / "c" / "model", 8, weight_bytes=65))


def test_same_sizes_other_bytes_is_another_model(tmp_path: Path) -> None:
    first = _base(tmp_path / "a" / "model", 8)
    second = tmp_path / "b" / "model"
    shutil.copytree(first, second)
    (second / "model.safetensors").write_bytes(b"\1" * 64)
    (first / "README.md").write_text("not part of the model")
    assert base_fingerprint(first) != base_fingerprint(second), "the key is the weights' content, not their size"
    (second / "model.safetensors").write_bytes(b"\0" * 64)
    assert base_fingerprint(first) == base_fingerprint(second), "a README is not part of the model"
