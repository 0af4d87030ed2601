"""Issue 18, item 3: GLUE's TSV layouts, single texts and sentence pairs, read as GLUE writes them, by qbert-quantize
and qbert-validate on tiny random BERTs; a layout that cannot be read unambiguously is refused naming its columns.

Each GLUE task's files are written in its own layout (tests/task_files.py: the exact headers, MRPC's byte order mark,
CoLA without a header, MNLI's gold_label after label1..label5).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertModel

from qbert_deploy.checkpoint import load_checkpoint
from qbert_deploy.cli.export import main as export_main
from qbert_deploy.cli.quantize import build_parser
from qbert_deploy.cli.quantize import main as quantize_main
from qbert_deploy.cli.validate import main as validate_main
from qbert_deploy.data.tsv import Columns, label_names, read_table
from tests.task_files import GLUE_NAMES, PAIR_TASKS, QUICK, SENTENCE_PAIRS, write_glue
from tests.task_files import quantize_refused as _refused
from tests.tiny import save_hf_dir, tiny_config


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("glue")
    torch.manual_seed(0)
    save_hf_dir(BertModel(tiny_config()), root / "model")  # no head: the labels come from the data
    for task in GLUE_NAMES:
        write_glue(root, task)
    return root


def _quantize(root: Path, train: Path, dev: Path, out: Path, *extra: str) -> None:
    assert quantize_main(["--model", str(root / "model"), "--train", str(train), "--dev", str(dev), *QUICK, *extra,
                          "-o", str(out)]) == 0


@pytest.mark.parametrize("task", list(GLUE_NAMES))
def test_each_glue_layout_reads_its_texts_and_glue_label_names(root: Path, task: str) -> None:
    train = read_table(root / task / "train.tsv")
    dev = read_table(root / task / "dev.tsv")
    first, pair = SENTENCE_PAIRS[0]
    question = "?" if task in ("QQP", "QNLI") else ""
    assert train.texts[0] == (first + question, (pair + ("?" if task == "QQP" else "")) if task in PAIR_TASKS
                              else None)
    assert train.pairs == dev.pairs == (task in PAIR_TASKS)
    assert label_names(train, dev) == GLUE_NAMES[task]
    assert [e.label for e in dev.examples(GLUE_NAMES[task])] == [i % (3 if task == "MNLI" else 2)
                                                                for i in range(len(SENTENCE_PAIRS))]


@pytest.mark.parametrize("task", ["QNLI", "MNLI", "MRPC", "CoLA"])
def test_quantize_trains_on_the_glue_layout_with_its_labels(root: Path, tmp_path: Path, task: str) -> None:
    """QNLI's question was dropped without a word, MNLI's gold_label and MRPC's layout were refused, CoLA's headerless
    file was read as a header: now each is read as GLUE wrote it, and model.pt records whether the model reads pairs."""
    out = tmp_path / "out"
    _quantize(root, root / task / "train.tsv", root / task / "dev.tsv", out)
    checkpoint = load_checkpoint(out / "model.pt")
    assert checkpoint.labels == GLUE_NAMES[task]
    assert checkpoint.text_pairs is (task in PAIR_TASKS)
    log = (out / "quantize.log").read_text()
    assert f"in the {task} layout" in log and ("sentence pairs" if task in PAIR_TASKS else "single texts") in log, log


def test_labels_of_other_files_are_named_as_the_help_says(root: Path, tmp_path: Path) -> None:
    """String labels without --labels got "is not one of the model's labels None"; a 0/1 file got "0" and "1"
    though the help promised negative,positive. Now: SST-2's 0/1 are GLUE's names, other ids stay ids, and string
    labels of other files are the training file's names, sorted."""
    words = tmp_path / "words.tsv"
    words.write_text("text\tlabel\n" + "".join(f"{a}\t{['spam', 'ham', 'eggs'][i % 3]}\n"
                                              for i, (a, _) in enumerate(SENTENCE_PAIRS)), encoding="utf-8")
    ids = tmp_path / "ids.tsv"
    ids.write_text("text\tlabel\n" + "".join(f"{a}\t{i % 2}\n" for i, (a, _) in enumerate(SENTENCE_PAIRS)),
                   encoding="utf-8")
    _quantize(root, words, words, tmp_path / "words")
    assert load_checkpoint(tmp_path / "words" / "model.pt").labels == ["eggs", "ham", "spam"]
    _quantize(root, ids, ids, tmp_path / "ids")
    assert load_checkpoint(tmp_path / "ids" / "model.pt").labels == ["0", "1"]
    _quantize(root, root / "SST-2" / "train.tsv", root / "SST-2" / "dev.tsv", tmp_path / "sst2")
    assert load_checkpoint(tmp_path / "sst2" / "model.pt").labels == ["negative", "positive"]
    help_text = " ".join(build_parser().format_help().split())
    assert "negative,positive for SST-2's 0/1" in help_text and "the ids as names (0,1,...)" in help_text


def test_column_options_read_any_layout(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    claims = tmp_path / "claims.tsv"
    claims.write_text("id\tevidence\tclaim\tverdict\n" + "".join(f"{i}\t{a}\t{b}\t{['true', 'false'][i % 2]}\n"
                                                               for i, (a, b) in enumerate(SENTENCE_PAIRS)),
                      encoding="utf-8")
    args = ["--model", str(root / "model"), "--train", str(claims), "--dev", str(claims), *QUICK]
    _refused(capsys, args, tmp_path / "o1", "cannot tell which columns hold the text and the label (columns found: "
             "'id', 'evidence', 'claim', 'verdict')")
    _refused(capsys, [*args, "--text-columns", "evidence,claim", "--label-column", "label"], tmp_path / "o2",
             "no column 'label' (columns found: 'id', 'evidence', 'claim', 'verdict')")
    _quantize(root, claims, claims, tmp_path / "out", "--text-columns", "evidence,claim", "--label-column", "verdict")
    checkpoint = load_checkpoint(tmp_path / "out" / "model.pt")
    assert (checkpoint.labels, checkpoint.text_pairs) == (["false", "true"], True)
    stars = tmp_path / "stars.tsv"  # only the label column named: the text is SST-2's
    stars.write_text("sentence\tstars\nfine\t4\ndull\t1\n", encoding="utf-8")
    table = read_table(stars, Columns(label="stars"))
    assert (table.text_columns, label_names(table)) == (("sentence",), ["0", "1", "2", "3", "4"])
    # QNLI's sentence alone, by choice
    _quantize(root, root / "QNLI" / "train.tsv", root / "QNLI" / "dev.tsv", tmp_path / "single",
              "--text-columns", "sentence")
    assert load_checkpoint(tmp_path / "single" / "model.pt").text_pairs is False


def test_layouts_that_cannot_be_read_unambiguously_are_refused(root: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    cases = {
        "text\tsentence\tlabel": "the columns fit more than one layout (SST-2, text; columns found: 'text', "
                                 "'sentence', 'label')",
        "sentence\tsentence2\tlabel": "read as SST-2, the text column 'sentence2' would be left out",
        "sentence\tsentence\tlabel": "the header names a column twice",
    }
    for number, (header, message) in enumerate(cases.items()):
        data = tmp_path / f"bad{number}.tsv"
        data.write_text(header + "\n" + "\t".join(["a", "b", "0"]) + "\n", encoding="utf-8")
        _refused(capsys, ["--model", str(root / "model"), "--train", str(data), "--dev", str(data), *QUICK],
                 tmp_path / f"o{number}", message)
    _refused(capsys, ["--model", str(root / "model"), "--train", str(root / "QNLI" / "train.tsv"), "--dev",
                      str(root / "SST-2" / "dev.tsv"), *QUICK], tmp_path / "mixed",
             "holds sentence pairs")
    with pytest.raises(SystemExit) as exit_code:  # argparse's usage error
        quantize_main(["--model", str(root / "model"), *QUICK, "--text-columns", "a,b,c", "-o", str(tmp_path / "o")])
    assert exit_code.value.code == 2 and "expected one text column or two" in capsys.readouterr().err


def test_validate_reads_the_pair_layout_and_refuses_single_texts(root: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run, export = tmp_path / "run", tmp_path / "export"
    _quantize(root, root / "MNLI" / "train.tsv", root / "MNLI" / "dev.tsv", run)
    assert export_main([str(run / "model.pt"), "-o", str(export)]) == 0
    args = [str(export), "--checkpoint", str(run / "model.pt"), "--profile", "canonical", "--max-drop", "100"]
    assert validate_main([*args, "--data", str(root / "MNLI" / "dev.tsv")]) == 0
    capsys.readouterr()
    assert validate_main([*args, "--data", str(root / "SST-2" / "dev.tsv")]) == 2
    err = capsys.readouterr().err.strip()
    assert "single texts, but the model was trained on sentence pairs" in err and "\n" not in err, err
