"""The session factory's profiles, the torch-free import of qbert_deploy.runtimes, and `qbert-export --lower`."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qbert_deploy.runtimes.lowering import lower
from qbert_deploy.runtimes.session import SessionError, model_lowering, open_session
from tests.tiny import text_batch

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
TENSORRT_LISTED = "TensorrtExecutionProvider" in ort.get_available_providers()
HAS_TENSORRT = TENSORRT_LISTED and ctypes.util.find_library("nvinfer") is not None


def test_profile_lowers_a_canonical_model_in_memory(tiny_export: Path, tmp_path: Path) -> None:
    canonical = tiny_export / "model.onnx"
    dump = tmp_path / "optimized.onnx"
    session = open_session(canonical, threads=1, profile="auto", optimized_model_path=dump)
    ops = Counter(n.op_type for n in onnx.load(str(dump)).graph.node)
    assert ops["MatMulIntegerToFloat"] == 12, f"profile auto on the CPU should be cpu-w8a8: {ops}"
    lowered = lower(canonical, "cpu-w8a8", tmp_path / "model.cpu-w8a8.onnx")
    expected = open_session(lowered, threads=1, profile="cpu-w8a8").run(["logits"], text_batch())[0]
    np.testing.assert_array_equal(session.run(["logits"], text_batch())[0], expected)
    assert model_lowering(lowered) == "cpu-w8a8" and model_lowering(canonical) is None


def test_profile_mismatches_are_refused(tiny_export: Path, tmp_path: Path) -> None:
    lowered = lower(tiny_export / "model.onnx", "cpu-w8a8", tmp_path / "model.cpu-w8a8.onnx")
    with pytest.raises(SessionError, match="lowered for 'cpu-w8a8', not 'weight-only'"):
        open_session(lowered, profile="weight-only")
    with pytest.raises(SessionError, match="profile 'tensorrt' is for tensorrt, not cpu"):
        open_session(tiny_export / "model.onnx", profile="tensorrt")
    with pytest.raises(SessionError, match="unknown lowering profile"):
        open_session(tiny_export / "model.onnx", profile="fastest")


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
def test_missing_provider_needs_allow_fallback(tiny_export: Path) -> None:
    with pytest.raises(SessionError, match="CUDAExecutionProvider is not available"):
        open_session(tiny_export / "model.onnx", providers=("cuda", "cpu"), profile="cuda")
    with pytest.warns(UserWarning, match="falling back to CPUExecutionProvider"):
        session = open_session(tiny_export / "model.onnx", providers=("cuda", "cpu"), allow_fallback=True,
                               profile="auto")
    assert session.get_providers() == ["CPUExecutionProvider"]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and onnxruntime-gpu")
@pytest.mark.parametrize(("profile", "tolerance"), [("cuda", 4), ("cuda-fp16", 8)])
def test_cuda_profiles_run_on_the_gpu(tiny_export: Path, tmp_path: Path, profile: str, tolerance: int) -> None:
    lowered = lower(tiny_export / "model.onnx", profile, tmp_path / f"model.{profile}.onnx")
    expected = open_session(tiny_export / "model.onnx", optimize=False).run(["logits"], text_batch())[0]
    session = open_session(lowered, providers=("cuda",), profile=profile)
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    if profile == "cuda":
        assert session.get_provider_options()["CUDAExecutionProvider"]["use_tf32"] == "0", "cuda profile runs TF32"
    got = session.run(["logits"], text_batch())[0]
    step = (expected.max() - min(expected.min(), 0)) / 255
    assert np.abs(got - expected).max() <= tolerance * step, f"{profile} logits drift from the canonical graph's"
    assert (got.argmax(-1) == expected.argmax(-1)).all(), f"{profile} changes predictions"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs TensorRT and onnxruntime-gpu")
def test_tensorrt_profile_runs_on_tensorrt(tiny_export: Path, tmp_path: Path) -> None:
    lowered = lower(tiny_export / "model.onnx", "tensorrt", tmp_path / "model.tensorrt.onnx")
    expected = open_session(tiny_export / "model.onnx", optimize=False).run(["logits"], text_batch())[0]
    got = open_session(lowered, providers=("tensorrt",), profile="tensorrt").run(["logits"], text_batch())[0]
    assert (got.argmax(-1) == expected.argmax(-1)).all(), "TensorRT changes predictions"


@pytest.mark.gpu
@pytest.mark.skipif(not TENSORRT_LISTED or HAS_TENSORRT, reason="needs onnxruntime-gpu without TensorRT's libraries")
def test_provider_that_does_not_start_is_refused(tiny_export: Path, tmp_path: Path) -> None:
    lowered = lower(tiny_export / "model.onnx", "tensorrt", tmp_path / "model.tensorrt.onnx")
    with pytest.raises(SessionError, match="TensorrtExecutionProvider is in this onnxruntime build but did not start"):
        open_session(lowered, providers=("tensorrt",), profile="tensorrt")


def test_runtimes_import_and_lower_without_torch(tiny_export: Path, tmp_path: Path) -> None:
    """A production server may have only onnxruntime: torch and transformers must never be imported."""
    script = textwrap.dedent(f"""
        import sys
        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers"):
                    raise ImportError("blocked in this test: " + name)
        sys.meta_path.insert(0, Refuse())
        import qbert_deploy.runtimes, qbert_deploy.runtimes.lowering, qbert_deploy.runtimes.session
        from qbert_deploy.runtimes.lowering import lower
        from qbert_deploy.runtimes.session import open_session
        out = lower({str(tiny_export / "model.onnx")!r}, "cpu-w8a8", {str(tmp_path / "m.onnx")!r})
        open_session(out, profile="cpu-w8a8")
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_export_cli_writes_lowered_files(tiny_model_pt: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    done = subprocess.run([sys.executable, "-m", "qbert_deploy.cli.export", str(tiny_model_pt), "-o", str(out),
                           "--no-parity", "--lower", "cpu-w8a8,weight-only", "--lower", "cuda"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for profile in ("cpu-w8a8", "weight-only", "cuda"):
        path = out / f"model.{profile}.onnx"
        assert path.is_file(), done.stdout
        assert model_lowering(path) == profile


def test_export_cli_rejects_an_unknown_profile(tiny_model_pt: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "qbert_deploy.cli.export", str(tiny_model_pt), "-o",
                           str(tmp_path / "x"), "--lower", "cpu-w8a8,gpu"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "unknown lowering profile 'gpu'" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "x").exists()
