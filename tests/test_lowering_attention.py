"""cpu-w8a8's attention: without padding each layer runs MultiHeadAttention unmasked (ORT's flash kernel), with
padding the masked one; logits stay as close to the canonical graph's as the tests of the other passes ask."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from qbert_deploy.runtimes.lowering import lower
from qbert_deploy.runtimes.session import open_session, session_options
from qbert_deploy.validation.parity import output_step
from tests.tiny import text_batch


def _branches_run(path: Path, feed: dict[str, np.ndarray], tmp_path: Path) -> Counter[str]:
    """Which MultiHeadAttention branch ran, per ORT's own profile of one run."""
    options = session_options(1)
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(["logits"], feed)
    trace = Path(session.end_profiling())
    names = [e.get("name", "") for e in json.loads(trace.read_text()) if e.get("cat") == "Node"]
    return Counter(kind for name in names if name.endswith("_kernel_time") and "MultiHeadAttention" in name
                   for kind in ("/unmasked", "/masked") if kind in name)


@pytest.mark.parametrize("padded", [False, True])
def test_attention_branch_follows_the_mask(tiny_export: Path, tmp_path: Path, padded: bool) -> None:
    canonical = tiny_export / "model.onnx"
    lowered = lower(canonical, "cpu-w8a8", tmp_path / "lowered.onnx")
    feed = text_batch() if padded else text_batch(["one unpadded sentence", "and another one, same length"][:1])
    assert bool((feed["attention_mask"] == 0).any()) == padded, feed["attention_mask"]
    ran = _branches_run(lowered, feed, tmp_path)
    expected_kind = "/masked" if padded else "/unmasked"
    assert ran == Counter({expected_kind: 2}), f"padded={padded}: branches run {dict(ran)}"
    expected = np.asarray(open_session(canonical, optimize=False).run(["logits"], feed)[0])
    got = np.asarray(open_session(lowered).run(["logits"], feed)[0])
    steps = float(np.abs(got - expected).max()) / output_step(expected)
    assert steps <= 2.0, f"padded={padded}: logits off by {steps:.2f} output steps"
