"""qbert-demo's flags: a method the demo cannot show, or bad distillation weights, are one-line errors before
anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from qbert_deploy.demo import main


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "qbert-w4"], "mixed precision"), (["--method", "qbert-mp99"], "unknown method"),
    (["--distill-attention", "-1"], "must be finite and >= 0"),
])
def test_bad_flags_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                       message: str) -> None:
    code = main([*args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and err and err[-1].startswith("qbert-demo: error:") and message in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "out").exists()
