"""Issue 19, items 8, 9 and 10: one validation of an export directory (runtimes/export_dir.py) for
`qbert-export --check` and qbert-serve.

Each broken directory below is refused by both, with the same line: qbert-serve at start (exit 2, one line, no
traceback, and never a server that answers 500 later) and `--check` as a failed check (exit 1).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest

from qbert_deploy.cli.export import main as export_main
from qbert_deploy.cli.serve import main as serve_main
from qbert_deploy.exporters.check import check_export
from qbert_deploy.runtimes.export_dir import ExportDirError, record_files
from qbert_deploy.runtimes.serving import ServedModel

DELETE = object()


def _config(**changes: Any) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / "config.json"
        config = json.loads(path.read_text())
        for key, value in changes.items():
            if value is DELETE:
                config.pop(key, None)
            else:
                config[key] = value
        path.write_text(json.dumps(config))
    return edit


def _fixed_sequence(folder: Path) -> None:
    """model.onnx's inputs declare 2^40 tokens (its sha256 recorded again: only the signature is wrong)."""
    model = onnx.load(str(folder / "model.onnx"))
    for tensor in model.graph.input:
        tensor.type.tensor_type.shape.dim[1].dim_value = 1 << 40
    onnx.save(model, str(folder / "model.onnx"))
    record_files(folder, ["model.onnx"])


# (case, edit, the line both commands give, issue item)
CASES: list[tuple[str, Callable[[Path], None], str, int]] = [
    ("id2label-list", _config(id2label=["negative", "positive"]), "id2label must be an object", 8),
    ("vocab-null", _config(vocab_size=None), "vocab_size must be an integer, got null", 8),
    ("type-vocab-null", _config(type_vocab_size=None), "type_vocab_size must be an integer, got null", 8),
    ("pad-object", _config(pad_token_id={}), "pad_token_id must be an integer, got {}", 8),
    ("positions-negative", _config(max_position_embeddings=-5), "max_position_embeddings must be in 1..", 8),
    ("three-labels", _config(id2label={"0": "a", "1": "b", "2": "c"}, num_labels=3),
     "the model gives 2 scores per row, config.json names 3 labels", 9),
    ("one-label", _config(id2label={"0": "a"}, num_labels=1),
     "the model gives 2 scores per row, config.json names 1 labels", 9),
    ("labels-disagree", _config(num_labels=1000000), "num_labels is 1000000, but id2label names 2 labels", 9),
    ("token-head", _config(architectures=["BertForTokenClassification"]),
     "a token-classification model's has rank 3", 9),
    ("pad-outside-vocab", _config(pad_token_id=99999), "pad_token_id 99999 is outside the vocabulary", 9),
    ("positions-zero", _config(max_position_embeddings=0), "max_position_embeddings must be in 1..", 9),
    ("positions-one", _config(max_position_embeddings=1), "leaves 1 tokens per sequence; at least 2", 9),
    ("model-type-gpt2", _config(model_type="gpt2"), "model_type 'gpt2' is not supported", 10),
    ("model-type-number", _config(model_type=5), "model_type 5 is not supported", 10),
    ("model-type-missing", _config(model_type=DELETE), "model_type None is not supported", 10),
    ("vocab-string", _config(vocab_size="big"), 'vocab_size must be an integer, got "big"', 10),
    ("pad-string", _config(pad_token_id="x"), 'pad_token_id must be an integer, got "x"', 10),
    ("qa-head", _config(architectures=["BertForQuestionAnswering"]), "no 'start_logits' output", 10),
    ("no-tokenizer-json", lambda f: (f / "tokenizer.json").unlink(), "no tokenizer.json", 10),
    ("tokenizer-config-list", lambda f: (f / "tokenizer_config.json").write_text("[1, 2]"),
     "expected a JSON object, got a JSON list", 10),
    ("fixed-2^40-tokens", _fixed_sequence, "has a fixed sequence size of 1099511627776", 10),
]


@pytest.mark.parametrize("case, edit, message, item", CASES, ids=[f"item{c[3]}-{c[0]}" for c in CASES])
def test_check_and_serve_refuse_the_same_directories(tmp_path: Path, tiny_export: Path, case: str,
                                                     edit: Callable[[Path], None], message: str, item: int,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    edit(folder)
    # qbert-serve: refused at start (before this, it started and answered 500, or crashed with a traceback)
    with pytest.raises(ExportDirError) as refused:
        ServedModel(folder)
    line = str(refused.value)
    assert message in line and "\n" not in line, line
    capsys.readouterr()
    assert serve_main([str(folder), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"qbert-serve: error: {line}", err
    # --check: the same line, from the same code, as a failed check
    failed = {r.name: r.detail for r in check_export(folder) if not r.ok}
    assert any(line in detail for detail in failed.values()), (line, failed)
    assert export_main(["--check", str(folder)]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err and captured.err.startswith("qbert-export: error:")


def test_an_intact_export_is_served_and_checked(tiny_export: Path) -> None:
    served = ServedModel(tiny_export)
    assert (served.labels, served.max_length, served.pad_id, served.vocab_size) == (
        ["negative", "positive"], 128, 0, 30522)
    assert all(r.ok for r in check_export(tiny_export))
