"""model.pt is data, never code: a pickle that would run code is refused and the code never runs."""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from qbert_deploy.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from qbert_deploy.exporters.onnx_export import export_checkpoint
from qbert_deploy.safetensors_format import load_safetensors_checkpoint, save_safetensors_checkpoint


class _WritesMarker:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def _payload(tiny_ckpt: Checkpoint, marker: Path) -> dict[str, object]:
    payload = tiny_ckpt.to_payload()
    payload["metrics"] = {"accuracy": _WritesMarker(marker)}
    return payload


def _assert_refused(path: Path, marker: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "refused to load" in message and "\n" not in message, message
    assert not marker.exists(), f"loading {path.name} ran the embedded code"
    return message


def test_live_payload_runs_under_plain_pickle(tmp_path: Path) -> None:
    """The crafted payload really is live: an unsafe loader would run it (so the refusals below mean something)."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_WritesMarker(marker)))
    assert marker.read_text() == "ran"


def test_torch_zip_with_code_is_refused(tmp_path: Path, tiny_ckpt: Checkpoint) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "model.pt"
    torch.save(_payload(tiny_ckpt, marker), path)
    assert zipfile.is_zipfile(path)
    message = _assert_refused(path, marker)
    assert "GLOBAL" in message and "exec" in message, message


@pytest.mark.parametrize("protocol", [2, 4])
def test_raw_pickle_with_code_is_refused(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"format": "qbert-deploy/model.pt", "x": _WritesMarker(marker)},
                                  protocol=protocol))
    _assert_refused(path, marker)


def test_code_inside_zip_member_is_refused(tmp_path: Path, tiny_ckpt: Checkpoint) -> None:
    """Swap data.pkl of a valid model.pt for a code-running pickle, keeping the zip otherwise intact."""
    good = tmp_path / "good.pt"
    save_checkpoint(tiny_ckpt, good)
    marker = tmp_path / "marker"
    bad = tmp_path / "model.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data.pkl"):
                data = pickle.dumps(_WritesMarker(marker), protocol=2)
            dst.writestr(info, data)
    _assert_refused(bad, marker)


def test_safetensors_folder_is_the_same_checkpoint(tmp_path: Path, tiny_ckpt: Checkpoint) -> None:
    folder = tmp_path / "ckpt"
    save_safetensors_checkpoint(tiny_ckpt, folder)
    loaded = load_checkpoint(folder)
    assert loaded.digest() == tiny_ckpt.digest()
    assert (loaded.config, loaded.labels, loaded.tokenizer_files, loaded.activation_ranges) == \
        (tiny_ckpt.config, tiny_ckpt.labels, tiny_ckpt.tokenizer_files, tiny_ckpt.activation_ranges)
    assert load_checkpoint(folder / "model.safetensors").digest() == tiny_ckpt.digest()
    assert b"pickle" not in (folder / "model.safetensors").read_bytes()[:64]


def test_deterministic_export_from_both_formats(tmp_path: Path, tiny_model_pt: Path, tiny_ckpt: Checkpoint,
                                               tiny_export: Path) -> None:
    """model.pt (loaded from disk) and the safetensors folder (through `qbert-export FOLDER -o OUT`) both export
    byte for byte the fixture's model.onnx."""
    from qbert_deploy.cli.export import main

    folder = tmp_path / "st"
    save_safetensors_checkpoint(tiny_ckpt, folder)
    digests = {"in-memory (fixture)": hashlib.sha256((tiny_export / "model.onnx").read_bytes()).hexdigest()}
    export_checkpoint(load_checkpoint(tiny_model_pt), tmp_path / "from-pt")
    assert main([str(folder), "-o", str(tmp_path / "from-st"), "--no-parity"]) == 0
    for label, out in (("model.pt", tmp_path / "from-pt"), ("safetensors via CLI", tmp_path / "from-st")):
        digests[label] = hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    assert len(set(digests.values())) == 1, digests


def test_export_metadata_records_versions_and_hashes(tiny_export: Path, tiny_ckpt: Checkpoint) -> None:
    import json

    import onnx

    meta = {p.key: p.value for p in onnx.load(str(tiny_export / "model.onnx"), load_external_data=False)
            .metadata_props}
    versions = json.loads(meta["qbert.versions"])
    for package in ("torch", "onnx", "onnxruntime"):
        assert versions.get(package), f"qbert.versions lacks {package}: {versions}"
    assert meta["qbert.recipe_sha256"] == tiny_ckpt.recipe.digest()
    assert meta["qbert.checkpoint_sha256"] == tiny_ckpt.digest()
    assert len(meta["qbert.weights_sha256"]) == 64


@pytest.mark.parametrize("mutate, expected", [
    (lambda f: (f / "qbert_checkpoint.json").write_text("{"), "not valid JSON"),
    (lambda f: (f / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}"),
     "not a readable safetensors file"),
    (lambda f: (f / "model.safetensors").unlink(), "no such file"),
    (lambda f: (f / "tokenizer.json").unlink(), "tokenizer file listed in qbert_checkpoint.json is missing"),
    (lambda f: (f / "qbert_checkpoint.json").write_text('{"format": "other"}'), "not a qbert-deploy checkpoint"),
])
def test_safetensors_folder_errors(tmp_path: Path, tiny_ckpt: Checkpoint, mutate: object, expected: str) -> None:
    folder = tmp_path / "st"
    save_safetensors_checkpoint(tiny_ckpt, folder)
    mutate(folder)  # type: ignore[operator]
    with pytest.raises(CheckpointError, match=expected):
        load_safetensors_checkpoint(folder)


def test_safetensors_header_claiming_huge_tensor_is_refused(tmp_path: Path, tiny_ckpt: Checkpoint) -> None:
    """A header that declares far more data than the file holds is refused before any allocation."""
    import json
    import struct

    folder = tmp_path / "st"
    save_safetensors_checkpoint(tiny_ckpt, folder)
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_safetensors_checkpoint(folder)


def test_unsafe_tokenizer_names_are_refused(tiny_ckpt: Checkpoint) -> None:
    from qbert_deploy.checkpoint import checkpoint_from_payload

    for name in ("../evil.txt", "model.onnx", ".hidden", "a/b.json", "config.json"):
        payload = tiny_ckpt.to_payload()
        payload["tokenizer_files"] = {name: "x"}
        with pytest.raises(CheckpointError, match="not a plain file name"):
            checkpoint_from_payload(payload, "model.pt")
