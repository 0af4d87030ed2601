"""qbert-demo's flags: a method the demo cannot show is a one-line error before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from qbert_deploy.demo import main


@pytest.mark.parametrize(("method", "message"), [("qbert-w4", "mixed precision"), ("qbert-mp99", "unknown method")])
def test_bad_method_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], method: str,
                                        message: str) -> None:
    code = main(["--method", method, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and err and err[-1].startswith("qbert-demo: error:") and message in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "out").exists()
