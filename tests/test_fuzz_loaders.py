"""Mutated and truncated model.pt and model.onnx never crash the tools with a traceback, and never hang."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import pytest

from qbert_deploy.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from qbert_deploy.exporters.check import check_export
from tests.harness import mutate, run_cli
from tests.tiny import tiny_checkpoint

# Iteration counts are part of the reliability table (benchmarks/reliability.py runs more).
ITERATIONS = {"load_checkpoint": 200, "check_export": 30, "cli_model_pt": 2, "cli_model_onnx": 2}
SLOWEST_ALLOWED_S = 30.0  # one load of a 2 MB file; anything near this is a hang


@pytest.fixture(scope="module")
def small_model_pt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "model.pt"
    save_checkpoint(tiny_checkpoint(hidden=16, layers=1, heads=2, intermediate=32), path)
    return path


def fuzz_load_checkpoint(source: Path, work: Path, iterations: int, seed: int = 0) -> dict[str, int]:
    """Outcome counts; any exception other than CheckpointError propagates (a crash)."""
    rng = random.Random(seed)
    data = source.read_bytes()
    counts = {"loaded": 0, "refused": 0}
    for i in range(iterations):
        kind, mutated = mutate(data, rng)
        path = work / "model.pt"
        path.write_bytes(mutated)
        start = time.monotonic()
        try:
            load_checkpoint(path)
            counts["loaded"] += 1
        except CheckpointError as err:
            assert "\n" not in str(err), f"iteration {i} ({kind}): multi-line message {err}"
            counts["refused"] += 1
        assert time.monotonic() - start < SLOWEST_ALLOWED_S, f"iteration {i} ({kind}) took too long"
    return counts


def test_fuzz_load_checkpoint(tmp_path: Path, small_model_pt: Path) -> None:
    counts = fuzz_load_checkpoint(small_model_pt, tmp_path, ITERATIONS["load_checkpoint"])
    assert counts["refused"] > 0, counts


def test_fuzz_check_export(tmp_path: Path, tiny_export: Path) -> None:
    rng = random.Random(1)
    data = (tiny_export / "model.onnx").read_bytes()
    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    failed = 0
    for i in range(ITERATIONS["check_export"]):
        kind, mutated = mutate(data, rng)
        (folder / "model.onnx").write_bytes(mutated)
        results = check_export(folder)  # must return, never raise
        assert results and all("\n" not in r.detail for r in results), f"iteration {i} ({kind})"
        failed += not all(r.ok for r in results)
    assert failed > 0


@pytest.mark.parametrize("seed", range(ITERATIONS["cli_model_pt"]))
def test_fuzz_cli_export(tmp_path: Path, small_model_pt: Path, seed: int) -> None:
    # corrupt the pickle (the first KB), where a mutation is never harmless: each run stays an import + a refusal
    kind, mutated = mutate(small_model_pt.read_bytes(), random.Random(100 + seed), ("flip", "overwrite", "delete"),
                           head=4096)
    (tmp_path / "model.pt").write_bytes(mutated)
    outcome = run_cli([str(tmp_path / "model.pt"), "-o", str(tmp_path / "out"), "--no-parity"])
    assert outcome.code is not None, f"{kind}: hung"
    if outcome.code != 0:
        assert outcome.clean_error, f"{kind}: exit {outcome.code}, stderr:\n{outcome.stderr}"
        assert not (tmp_path / "out").exists(), f"{kind}: a failed export wrote output"


@pytest.mark.parametrize("seed", range(ITERATIONS["cli_model_onnx"]))
def test_fuzz_cli_check(tmp_path: Path, tiny_export: Path, seed: int) -> None:
    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    kind, mutated = mutate((folder / "model.onnx").read_bytes(), random.Random(200 + seed))
    (folder / "model.onnx").write_bytes(mutated)
    outcome = run_cli(["--check", str(folder)])
    assert outcome.code is not None, f"{kind}: hung"
    assert outcome.code == 0 or outcome.clean_error, f"{kind}: exit {outcome.code}, stderr:\n{outcome.stderr}"
    assert "Traceback" not in outcome.stdout + outcome.stderr
