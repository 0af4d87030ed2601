"""The Triton model repository: config.pbtxt parses with tritonclient's ModelConfig, its model runs in ORT."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx_ir as ir
import pytest
import tritonclient
from google.protobuf import text_format

from qbert_deploy.cli.export import main as export_main
from qbert_deploy.runtimes.lowering import lower
from qbert_deploy.runtimes.triton_repo import write_triton_repo
from tests.served import Reference
from tests.tiny import LABELS, text_batch


def _model_config_pb2() -> ModuleType:
    """tritonclient's ModelConfig protobuf; loaded from its file so that grpcio need not be installed."""
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    assert spec is not None and spec.loader is not None, f"no ModelConfig protobuf at {path}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse(config: Path) -> object:
    pb2 = _model_config_pb2()
    return text_format.Parse(config.read_text(), pb2.ModelConfig())


def test_cpu_repository_parses_and_runs(tiny_export: Path, tmp_path: Path) -> None:
    repo = write_triton_repo(tiny_export, tmp_path / "repo", max_batch=16, max_delay_ms=2.5)
    config = _parse(repo.config)
    pb2 = _model_config_pb2()
    assert config.name == "qbert" and config.backend == "onnxruntime" and config.max_batch_size == 16  # type: ignore[attr-defined]
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [  # type: ignore[attr-defined]
        (n, pb2.TYPE_INT64, [-1]) for n in ("input_ids", "attention_mask", "token_type_ids")]
    (output,) = config.output  # type: ignore[attr-defined]
    assert (output.name, output.data_type, list(output.dims)) == ("logits", pb2.TYPE_FP32, [len(LABELS)])
    assert config.dynamic_batching.max_queue_delay_microseconds == 2500  # type: ignore[attr-defined]
    assert [(g.kind, g.count) for g in config.instance_group] == [(pb2.ModelInstanceGroup.KIND_CPU, 1)]  # type: ignore[attr-defined]
    assert (repo.root / "qbert" / output.label_filename).read_text().split() == LABELS
    assert sorted(p.name for p in repo.root.iterdir()) == ["README.md", "qbert"], "Triton loads every sub-folder"
    assert (repo.profile, repo.lowered, repo.source.name) == ("cpu-w8a8", True, "model.onnx"), repo
    assert "model.onnx lowered to cpu-w8a8" in repo.config.read_text()
    batch = text_batch()
    served = Reference(repo.model).logits(batch)
    expected = Reference(tiny_export / "model.onnx", "cpu-w8a8").logits(batch)
    assert np.array_equal(served, expected), f"{served} != {expected}"


def test_gpu_repository_and_lowered_profile_choice(tiny_export: Path, tmp_path: Path) -> None:
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    lower(export / "model.onnx", "cpu-w8a8", export / "model.cpu-w8a8.onnx")
    cpu = write_triton_repo(export, tmp_path / "cpu")
    assert (cpu.source.name, cpu.profile, cpu.lowered) == ("model.cpu-w8a8.onnx", "cpu-w8a8", False), cpu
    assert (tmp_path / "cpu" / "qbert" / "1" / "model.onnx").read_bytes() == cpu.source.read_bytes()
    canonical = write_triton_repo(export, tmp_path / "canonical", profile="canonical")
    assert (canonical.source.name, canonical.profile, canonical.lowered) == ("model.onnx", "canonical", False)
    gpu = write_triton_repo(export, tmp_path / "gpu", device="gpu", instances=2)
    assert (gpu.source.name, gpu.profile, gpu.lowered) == ("model.onnx", "cuda", True), gpu
    assert ir.load(gpu.model).metadata_props["qbert.lowering"].count('"profile": "cuda"') == 1
    pb2 = _model_config_pb2()
    groups = _parse(gpu.config).instance_group  # type: ignore[attr-defined]
    assert [(g.kind, g.count) for g in groups] == [(pb2.ModelInstanceGroup.KIND_GPU, 2)]


def test_cli_errors_are_one_line(tiny_export: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "qbert_deploy.cli.triton_repo", str(tiny_export), "-o",
                           str(tmp_path / "repo"), "--profile", "cuda-w4"], capture_output=True, text=True)
    assert done.returncode == 2, done
    assert done.stderr.startswith("qbert-triton-repo: error:") and "no profile 'cuda-w4'" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "repo").exists()


def test_export_flag_writes_a_repository(tiny_model_pt: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code = export_main([str(tiny_model_pt), "-o", str(tmp_path / "export"), "--no-parity",
                        "--triton-repo", str(tmp_path / "triton")])
    assert code == 0, capsys.readouterr().err
    assert _parse(tmp_path / "triton" / "qbert" / "config.pbtxt").max_batch_size == 32  # type: ignore[attr-defined]
    assert (tmp_path / "triton" / "qbert" / "1" / "model.onnx").is_file()


def test_an_embedding_repository_gives_sentence_embedding(embedding_export: Path, tmp_path: Path) -> None:
    repo = write_triton_repo(embedding_export, tmp_path / "repo", profile="canonical")  # a float graph: as exported
    config = _parse(repo.config)
    pb2 = _model_config_pb2()
    (output,) = config.output  # type: ignore[attr-defined]
    assert (output.name, output.data_type, list(output.dims), output.label_filename) == (
        "sentence_embedding", pb2.TYPE_FP32, [64], "")
    assert not (repo.root / "qbert" / "labels.txt").exists()
    assert (repo.model.read_bytes() == (embedding_export / "model.onnx").read_bytes())
