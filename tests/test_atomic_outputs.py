"""Outputs appear whole or not at all, also when the exporter is killed midway."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qbert_deploy.atomic import atomic_dir, atomic_file, clean_stale, write_text_atomic
from qbert_deploy.exporters.check import check_export
from tests.harness import kill_export, snapshot


def test_atomic_file_failure_leaves_old_content(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"], "temp file left behind"


def test_atomic_dir_failure_leaves_old_dir(tmp_path: Path) -> None:
    target = tmp_path / "export"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("killed")
    assert snapshot(target) == {"a": b"1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_clean_stale_removes_only_dead_runs_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "export"
    dead = tmp_path / f".export.{_dead_pid()}.abc.tmp"
    live = tmp_path / f".export.{os.getpid()}.def.tmp"
    other = tmp_path / f".other.{_dead_pid()}.x.tmp"
    for folder in (dead, live, other):
        folder.mkdir()
    assert clean_stale(target) == [dead]
    assert not dead.exists() and live.exists() and other.exists()


def test_clean_stale_restores_old_dir_after_kill_between_renames(tmp_path: Path) -> None:
    target = tmp_path / "export"
    old = tmp_path / ".export.old"
    old.mkdir()
    (old / "model.onnx").write_text("x")
    clean_stale(target)
    assert snapshot(target) == {"model.onnx": b"x"} and not old.exists()


PREVIOUS = b"previous export\n"


def _assert_whole_or_absent(out: Path, before: dict[str, bytes]) -> None:
    """The previous export untouched, or nothing, or the new export complete: never a mix or a part."""
    after = snapshot(out)
    if (before and after == before) or (not before and not out.exists()):
        return
    failed = [r.line() for r in check_export(out) if not r.ok]
    assert not failed, f"a killed export left an incomplete directory: {failed}"
    assert after.get("size_report.md") != PREVIOUS, "the new export kept a file of the previous one"


@pytest.mark.parametrize("when, delay, existing", [("start", 1.0, False), ("tmpdir", 0.0, False),
                                                   ("model", 0.2, True)])
def test_killed_export_leaves_no_partial_output(tmp_path: Path, tiny_model_pt: Path, tiny_export: Path,
                                                when: str, delay: float, existing: bool) -> None:
    out = tmp_path / "export"
    if existing:  # differs from what this run writes, so a mix of old and new would show
        shutil.copytree(tiny_export, out)
        (out / "size_report.md").write_bytes(PREVIOUS)
    before = snapshot(out)
    outcome = kill_export(tiny_model_pt, out, when, delay)
    _assert_whole_or_absent(out, before)
    for name in outcome.leftovers:  # a temp sibling is hidden and never mistaken for the output
        assert name.startswith(".export.") and name.endswith(".tmp"), name
    clean_stale(out)
    assert not list(tmp_path.glob(".export.*")), "stale temporaries survive clean_stale"


def test_model_pt_is_deterministic_and_not_private(tmp_path: Path, tiny_ckpt: object) -> None:
    """Same checkpoint -> same model.pt bytes; the file gets the umask's mode, not mkstemp's 0600."""
    from qbert_deploy.checkpoint import Checkpoint, save_checkpoint

    assert isinstance(tiny_ckpt, Checkpoint)
    first, second = tmp_path / "a" / "model.pt", tmp_path / "b" / "model.pt"
    for path in (first, second):
        path.parent.mkdir()
        save_checkpoint(tiny_ckpt, path)
    assert first.read_bytes() == second.read_bytes(), "model.pt differs between two saves of one checkpoint"
    mask = os.umask(0o022)
    os.umask(mask)
    assert first.stat().st_mode & 0o777 == 0o666 & ~mask, oct(first.stat().st_mode)
