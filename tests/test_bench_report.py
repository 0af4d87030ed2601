"""The benchmark report writer (no timing is asserted: the figures here are made up to exercise the layout)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.report import END, START, write_report

LABELS = ["PyTorch fp32 eager", "ORT fp32", "ORT fp32 (fused)", "ORT dynamic int8", "ORT dynamic int8 (fused)",
          "ours cpu-w8a8", "ours weight-only"]


def _results() -> dict[str, object]:
    configs = [{"label": label, "file_bytes": None if i == 0 else 1000 * (8 - i),
                "wall": {"1": [0.01 * (8 - i)] * 3, "8": [0.05 * (8 - i)] * 3},
                "cpu": {"1": [0.02] * 3, "8": [0.1] * 3}, "peak_mib": {"1": 100.0, "8": 120.0}}
               for i, label in enumerate(LABELS)]
    profiles = {"1": {"ours cpu-w8a8": [["MatMulIntegerToFloat", 1.0, 0.5]]}}
    return {"command": "python -m benchmarks.run", "started": "t0", "finished": "t1", "load_before": [1.0, 1, 1],
            "load_after": [2.0, 2, 2], "models": {"toy": {"configs": configs, "profiles": profiles}}}


def test_report_replaces_its_own_section_only(tmp_path: Path) -> None:
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Results\n\nkept text\n")
    write_report(_results(), results_md, tmp_path / "chart.png")
    write_report(_results(), results_md, tmp_path / "chart.png")
    text = results_md.read_text()
    assert "kept text" in text and text.count(START) == 1 and text.count(END) == 1, text
    row = "(wall: ORT dynamic int8 (fused); CPU: ORT dynamic int8) | 1 | 0.75x | 1.00x | <= 0.75x | yes / NO |"
    assert row in text, text
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
