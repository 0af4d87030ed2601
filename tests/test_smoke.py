from pathlib import Path

import numpy as np

from qbert_deploy.models.build import build_model
from qbert_deploy.validation.parity import parity_check
from tests.tiny import text_batch


def test_tiny_export_matches_pytorch(tiny_ckpt, tiny_export: Path) -> None:
    results = parity_check(build_model(tiny_ckpt), tiny_export / "model.onnx", text_batch())
    for r in results:
        assert r.argmax_agreement == 1.0, r.line()
        assert r.max_error_steps <= 2.0, r.line()
    assert np.isfinite([r.max_abs_error for r in results]).all()
