"""benchmarks.gpu's report on the CPU: the committed H100 JSON (batch 1/8) and the issue-14 layout (batch 1/8/32,
CUDA-graph configurations, ratios against the fused fp16 anchor, node counts, op profile)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.gpu import ANCHOR16, GRAPH, report_lines, write_report

ROOT = Path(__file__).resolve().parent.parent


def _issue14_results() -> dict[str, Any]:
    """A results file in the new layout, with round numbers: ours cuda-fused at half the anchor's latency."""
    labels = {ANCHOR16: 2.0, ANCHOR16 + GRAPH: 1.6, "ours cuda-fp16": 4.0, "ours cuda-fused": 1.0,
              "ours cuda-fused" + GRAPH: 0.8}
    wall = {b: {label: [ms / 1000] * 3 for label, ms in labels.items()} for b in ("1", "8", "32")}
    model = {"file_bytes": {label: 1_000_000 for label in labels}, "wall": wall,
             "gpu_mib": {ANCHOR16: {"1": 400.0, "8": 420.0, "32": 500.0},
                         "ours cuda-fused": {"1": 120.0, "8": 126.0, "32": 200.0}},
             "fidelity": {"ours cuda-fused": {"max_error_steps": 1.5, "argmax_agreement": 0.97}},
             "nodes": {"ours cuda-fused": {"nodes": 60, "top": [["MatMulNBits", 36], ["SkipLayerNormalization", 13]]}},
             "op_profile": {"ours cuda-fused": {"1": [["MatMulNBits", 0.5, 0.6]]}}}
    return {"command": "python -m benchmarks.gpu run X Y", "started": "s", "finished": "f", "device": "GPU",
            "driver": "1", "onnxruntime": "1.31.1", "torch": "2.11", "tensorrt_libraries": None,
            "batches": [1, 8, 32], "models": {"bert-base": model}}


def test_report_reads_the_committed_h100_results() -> None:
    results = json.loads((ROOT / "docs" / "results" / "gpu_bench.json").read_text())
    text = "\n".join(report_lines(results))
    assert "| ours cuda-fp16 |" in text and "ours cuda-fp16 batch 8: " in text and "b32" not in text


def test_report_states_the_issue14_ratios(tmp_path: Path) -> None:
    text = "\n".join(report_lines(_issue14_results()))
    assert "| b1 median ms | b8 median ms | b32 median ms |" in text
    assert f"ours cuda-fused batch 1: 0.50x of {ANCHOR16};" in text
    assert f"ours cuda-fused{GRAPH} batch 8: 0.50x of {ANCHOR16}{GRAPH}" in text
    assert "ours cuda-fused: 0.30x" in text, "memory at batch 8 against the anchor's"
    assert "argmax agreement 97.0%" in text and "ours cuda-fused: 60 nodes (MatMulNBits 36" in text
    markdown = tmp_path / "RESULTS.md"
    markdown.write_text("# Results\n")
    write_report(_issue14_results(), markdown, tmp_path / "gpu_latency.png")
    assert (tmp_path / "gpu_latency.png").stat().st_size > 0 and "#### bert-base" in markdown.read_text()
