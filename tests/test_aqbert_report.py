"""benchmarks.aqbert's budget parsing and its markdown tables (ratios against ORT dynamic int8 of the same run)."""

from __future__ import annotations

import pytest

from benchmarks.aqbert import budget_name, markdown, parse_budgets


def _row(label: str, acc: float, b1: float, b8: float, **extra: float) -> dict[str, object]:
    return {"label": label, "dev_accuracy": acc, "agreement_fp32": 1.0, "batch1_ms": b1, "batch8_ms": b8,
            "file_bytes": 20e6, "canonical_bytes": None, **extra}


def test_budgets_parse_keep_optional_megabytes_and_layers() -> None:
    assert parse_budgets("0.6,0.4:13.5,1.0@3,0.75:14@4") == [(0.6, None, None), (0.4, 13.5, None), (1.0, None, 3),
                                                             (0.75, 14.0, 4)]
    assert budget_name(0.4, 13.5) == "keep0.40-13.5mb" and budget_name(0.6, None) == "keep0.60"
    assert budget_name(1.0, None, 3) == "keep1.00-L3"
    for bad in ("half", "0.5@three"):
        with pytest.raises(SystemExit, match="is not KEEP\\[:MB\\]\\[@LAYERS\\]"):
            parse_budgets(bad)


def test_markdown_gives_ratios_to_int8_and_accuracy_against_fp32() -> None:
    summary = {"minilm": [_row("ORT fp32", 0.87, 30.0, 300.0), _row("ORT dynamic int8", 0.86, 10.0, 100.0),
                          _row("AQ-BERT keep0.50", 0.85, 5.0, 40.0, macs_kept=0.5, search_steps=80, qat_steps=190)],
               "bert_base": {"ORT fp32": {"file_bytes": 400e6, "batch1_ms": 300.0, "batch8_ms": 2000.0},
                             "ORT dynamic int8": {"file_bytes": 100e6, "batch1_ms": 100.0, "batch8_ms": 800.0},
                             "AQ-BERT keep0.50 (canonical)": {"file_bytes": 40e6}}}
    text = markdown(summary)
    assert "| AQ-BERT keep0.50 | 85.00 (-2.00) | 100.00 | 5.0 | 40.0 | 0.50 | 0.40 |" in text
    assert "| 0.50 | 80 / 190 |" in text
    assert "| AQ-BERT keep0.50 (canonical) | – | – | – | – | 40.00 | 0.100 |" in text
