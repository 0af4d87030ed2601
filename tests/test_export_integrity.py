"""Issue 19, items 2 and 18: every model file of an export is verified, and an export is verified before it is
put in place.

Item 2: `qbert-export --check` covers model.<profile>.onnx (the file qbert-serve runs by default) with the onnx
checker, the onnxruntime load and the sha256 recorded at export; qbert-serve checks that sha256 at start.
Item 18: lowering, the self-check and parity run in the temporary directory; a failure or Ctrl-C leaves OUT as it
was.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qbert_deploy.checkpoint import Checkpoint, save_checkpoint
from qbert_deploy.cli.export import main as export_main
from qbert_deploy.exporters.check import check_export
from qbert_deploy.exporters.onnx_export import export_checkpoint
from qbert_deploy.runtimes.export_dir import ExportDirError, file_sha256
from qbert_deploy.runtimes.serving import ServedModel
from tests.served import running_server
from tests.tiny import text_batch, tiny_checkpoint

LOWERED = "model.cpu-w8a8.onnx"


@pytest.fixture(scope="module")
def lowered_export(tmp_path_factory: pytest.TempPathFactory, tiny_model_pt: Path) -> Path:
    """An export with model.cpu-w8a8.onnx, written by `qbert-export --lower cpu-w8a8`."""
    out = tmp_path_factory.mktemp("lowered") / "export"
    assert export_main([str(tiny_model_pt), "-o", str(out), "--lower", "cpu-w8a8", "--no-parity"]) == 0
    return out


def _tamper_layernorm(folder: Path) -> None:
    """The probe's tampering: the embeddings' LayerNorm gain times -3, in the lowered file only."""
    model = onnx.load(str(folder / LOWERED))
    init = next(t for t in model.graph.initializer if t.name == "bert.embeddings.LayerNorm.weight")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * -3.0, init.name))
    onnx.save(model, str(folder / LOWERED))


DAMAGE: list[tuple[str, Callable[[Path], None]]] = [
    ("truncated", lambda f: (f / LOWERED).write_bytes((f / LOWERED).read_bytes()[:5000])),
    ("empty", lambda f: (f / LOWERED).write_bytes(b"")),
    ("random", lambda f: (f / LOWERED).write_bytes(np.random.default_rng(0).bytes(20000))),
    ("tampered", _tamper_layernorm),
]


def test_export_records_the_sha256_of_every_model_file(lowered_export: Path) -> None:
    files = json.loads((lowered_export / "qbert_recipe.json").read_text())["files"]
    assert files == {name: file_sha256(lowered_export / name) for name in ("model.onnx", LOWERED)}, files
    results = check_export(lowered_export)
    assert all(r.ok for r in results), [r.line() for r in results if not r.ok]
    assert {"file hashes", f"lowered {LOWERED}"} <= {r.name for r in results}


@pytest.mark.parametrize("case, damage", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_check_fails_a_damaged_lowered_file(tmp_path: Path, lowered_export: Path, case: str,
                                            damage: Callable[[Path], None],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "export"
    shutil.copytree(lowered_export, folder)
    damage(folder)
    failed = {r.name: r.detail for r in check_export(folder) if not r.ok}
    assert "file hashes" in failed and "the file changed after export" in failed["file hashes"], failed
    if case != "tampered":  # a file that is not a model also fails the checker and the onnxruntime load
        assert f"lowered {LOWERED}" in failed, failed
    assert export_main(["--check", str(folder)]) == 1
    captured = capsys.readouterr()
    assert f"FAIL file hashes: UnverifiedFileError: {folder / LOWERED}: sha256" in captured.out, captured.out
    assert captured.err.startswith("qbert-export: error:") and "Traceback" not in captured.err


def test_serve_refuses_a_tampered_lowered_file_and_no_verify_says_so(tmp_path: Path, lowered_export: Path) -> None:
    folder = tmp_path / "export"
    shutil.copytree(lowered_export, folder)
    _tamper_layernorm(folder)
    with pytest.raises(ExportDirError, match=r"differs from the \w+ recorded in qbert_recipe\.json"):
        ServedModel(folder)
    done = subprocess.run([sys.executable, "-m", "qbert_deploy.cli.serve", str(folder), "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("qbert-serve: error:"), done
    assert f"{folder / LOWERED}: sha256" in lines[0] and "the file changed after export" in lines[0], lines[0]
    # --no-verify serves the file as it is (here: the altered weights), and says so
    honest, altered = ServedModel(lowered_export), ServedModel(folder, verify=False)
    feed = text_batch()
    assert not np.allclose(honest.run(feed), altered.run(feed))
    with running_server(folder, tmp_path, "--no-verify") as server:
        assert "qbert-serve: warning: --no-verify:" in server.log_text() and LOWERED in server.log_text()


def test_serve_refuses_an_unrecorded_lowered_file(tmp_path: Path, lowered_export: Path) -> None:
    folder = tmp_path / "export"
    shutil.copytree(lowered_export, folder)
    shutil.copyfile(folder / LOWERED, folder / "model.cuda.onnx")  # placed by hand: nothing vouches for it
    with pytest.raises(ExportDirError, match="records no sha256 for it"):
        ServedModel(folder, profile="cuda")
    failed = {r.name: r.detail for r in check_export(folder) if not r.ok}
    assert "records no sha256" in failed["file hashes"], failed
    assert "lowered for profile 'cpu-w8a8', but named for 'cuda'" in failed["lowered model.cuda.onnx"], failed


# ---- item 18: nothing is put in place before it is verified ----

def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_a_failed_verification_leaves_the_earlier_export(tmp_path: Path, tiny_ckpt: Checkpoint) -> None:
    out = tmp_path / "export"
    export_checkpoint(tiny_ckpt, out)
    before = _snapshot(out)
    seen: dict[str, bool] = {}

    def verify(model_path: Path) -> None:
        # what parity sees: the new export, lowered files included, still beside OUT and not in it
        seen["in temporary dir"] = model_path.parent != out and model_path.parent.parent == out.parent
        seen["lowered there"] = (model_path.parent / LOWERED).is_file()
        seen["recorded there"] = LOWERED in json.loads((model_path.parent / "qbert_recipe.json").read_text())["files"]
        seen["OUT untouched"] = _snapshot(out) == before
        raise RuntimeError("parity failed")

    with pytest.raises(RuntimeError, match="parity failed"):
        export_checkpoint(tiny_checkpoint(seed=1), out, lower=["cpu-w8a8"], verify=verify)
    assert seen == {"in temporary dir": True, "lowered there": True, "recorded there": True, "OUT untouched": True}
    assert _snapshot(out) == before, "a failed export must not change the earlier one"
    assert not _leftovers(out)


def test_ctrl_c_after_lowering_leaves_the_earlier_export(tmp_path: Path, tiny_ckpt: Checkpoint) -> None:
    """SIGINT once the lowered file exists (in the temporary directory: on the old code it was written in OUT,
    after OUT had been replaced): exit 130, one line, and OUT is the earlier export, byte for byte."""
    out, model_pt = tmp_path / "export", tmp_path / "model.pt"
    export_checkpoint(tiny_ckpt, out)
    before = _snapshot(out)
    save_checkpoint(tiny_checkpoint(seed=1), model_pt)
    process = subprocess.Popen([sys.executable, "-m", "qbert_deploy.cli.export", str(model_pt), "-o", str(out),
                                "--lower", "cpu-w8a8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               # a test runner started in the background may pass SIGINT on as ignored
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline, sent = time.monotonic() + 300, False
        while process.poll() is None and time.monotonic() < deadline:
            if any(out.parent.glob(f".{out.name}.*.tmp/{LOWERED}")):
                process.send_signal(signal.SIGINT)
                sent = True
                break
            time.sleep(0.005)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert sent, f"the lowered file never appeared in a temporary directory (rc {process.returncode}): {stdout}"
    assert process.returncode == 130, (process.returncode, stderr)
    assert stderr.strip().splitlines() == ["qbert-export: error: interrupted"], stderr
    assert _snapshot(out) == before, "an interrupted export must leave the earlier one in place"
    assert not _leftovers(out)
