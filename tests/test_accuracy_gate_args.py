"""ci/accuracy_gate.py's arguments: the CPU gate as it was, `--providers cuda` refused in one line without a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "ci"))
import accuracy_gate  # noqa: E402

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def test_providers_choose_profiles_and_baseline() -> None:
    parser = accuracy_gate.build_parser()
    assert accuracy_gate.resolve(parser.parse_args([])) == (
        "canonical,cpu-w8a8,weight-only", accuracy_gate.BASELINE), "the CPU gate must stay what CI runs"
    assert accuracy_gate.resolve(parser.parse_args(["--providers", "cuda"])) == (
        "cuda,cuda-fp16,cuda-fused,cuda-fused-w8", None)
    assert accuracy_gate.resolve(parser.parse_args(["--providers", "cuda", "--profiles", "cuda-fused",
                                                    "--baseline", "b.json"])) == ("cuda-fused", Path("b.json"))


def _gate(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "ci" / "accuracy_gate.py"), "--out", str(tmp_path / "out"),
                           *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
def test_cuda_without_onnxruntime_gpu_is_a_one_line_error(tmp_path: Path) -> None:
    done = _gate(tmp_path, "--providers", "cuda")
    assert done.returncode == 2, done
    assert done.stderr.startswith("accuracy_gate: error: --providers cuda: ") and "onnxruntime-gpu" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists(), done.stderr


def test_cuda_baseline_refresh_needs_its_own_file(tmp_path: Path) -> None:
    done = _gate(tmp_path, "--providers", "cuda", "--write-baseline")
    assert done.returncode == 2 and "needs --baseline PATH" in done.stderr, done
    assert len(done.stderr.strip().splitlines()) == 1


def test_unknown_provider_is_refused_by_the_parser(tmp_path: Path) -> None:
    done = _gate(tmp_path, "--providers", "tpu")
    assert done.returncode == 2 and "invalid choice: 'tpu'" in done.stderr, done
