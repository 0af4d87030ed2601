"""cpu-w8a8's attention: one masked MultiHeadAttention per layer, so a row's answer does not depend on its batch.

ORT's unmasked flash kernel (taken only without a mask) sums the softmax in another order than the masked one; the
`If` that picked it when a batch had no padding made served answers depend on the batch they landed in
(docs/results/serving.md). The checks compare the attention outputs themselves, bitwise: a tiny model's logits hide
a one-ulp difference behind the 8-bit activation rounding, which MiniLM's do not always.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from benchmarks.batch_invariance import padded
from qbert_deploy.runtimes.attention_fusion import unmasked_attention_branch
from qbert_deploy.runtimes.lowering import lower_model
from qbert_deploy.runtimes.session import open_session
from qbert_deploy.validation.parity import output_step
from tests.tiny import text_batch


def _lowered(canonical: Path, flash_branch: bool = False) -> bytes:
    """cpu-w8a8 in memory (optionally with the flash branch back), each attention output also a graph output."""
    model = ir.load(canonical)
    lower_model(model, "cpu-w8a8", for_file=False)
    if flash_branch:
        unmasked_attention_branch(model)
    attention = [n.outputs[0] for n in model.graph if n.op_type in ("MultiHeadAttention", "If")]
    assert len(attention) == 2, [n.op_type for n in model.graph]
    model.graph.outputs.extend(attention)
    return ir.to_proto(model).SerializeToString()


def _requests(count: int = 12, seed: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        ids = rng.integers(1000, 30000, size=(1, int(rng.integers(3, 61)))).astype(np.int64)
        ids[0, 0], ids[0, -1] = 101, 102
        out.append(ids)
    return out


def _differences(model: bytes) -> list[str]:
    """Rows whose logits or attention outputs (real tokens only) differ bitwise between runs: alone (1 thread) vs in
    padded batches of mixed lengths, vs alone padded to 64 tokens (2 threads)."""
    alone_session, batch_session = open_session(model, threads=1), open_session(model, threads=2)
    requests = _requests()
    alone = [alone_session.run(None, padded([r])) for r in requests]
    runs = {f"batch {start // 4}": (start, batch_session.run(None, padded(requests[start:start + 4])))
            for start in range(0, len(requests), 4)}
    runs |= {f"alone padded to 64, request {i}": (i, batch_session.run(None, padded([r], 64)))
             for i, r in enumerate(requests)}
    differ = []
    for what, (start, outputs) in runs.items():
        for row in range(outputs[0].shape[0]):
            number, length = start + row, requests[start + row].shape[1]
            for index, (got, expected) in enumerate(zip(outputs, alone[number], strict=True)):
                got_row = got[row] if index == 0 else got[row, :length]
                expected_row = expected[0] if index == 0 else expected[0, :length]
                if not np.array_equal(got_row, expected_row):
                    name = "logits" if index == 0 else f"attention of layer {index - 1}"
                    differ.append(f"{what}, request {number}: {name} differs by "
                                  f"{float(np.abs(got_row - expected_row).max()):.3g}")
    return differ


def test_answers_do_not_depend_on_the_batch(tiny_export: Path) -> None:
    differ = _differences(_lowered(tiny_export / "model.onnx"))
    assert differ == [], "cpu-w8a8 answers depend on the batch:\n" + "\n".join(differ[:10])


def test_the_flash_branch_would_make_them_depend_on_it(tiny_export: Path) -> None:
    """The check above can fail: with the If back, alone (flash) and padded (masked) rows differ."""
    differ = _differences(_lowered(tiny_export / "model.onnx", flash_branch=True))
    assert any("attention" in line for line in differ), "the flash branch no longer changes any attention output"


@pytest.mark.parametrize("padded", [False, True])
def test_masked_attention_matches_the_canonical_graph(tiny_export: Path, padded: bool) -> None:
    canonical = tiny_export / "model.onnx"
    feed = text_batch() if padded else text_batch(["one unpadded sentence"])
    assert bool((feed["attention_mask"] == 0).any()) == padded, feed["attention_mask"]
    expected = np.asarray(open_session(canonical, optimize=False).run(["logits"], feed)[0])
    got = np.asarray(open_session(canonical, profile="cpu-w8a8").run(["logits"], feed)[0])
    steps = float(np.abs(got - expected).max()) / output_step(expected)
    assert steps <= 2.0, f"padded={padded}: logits off by {steps:.2f} output steps"
