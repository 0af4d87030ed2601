"""Issue 19, item 11: a model with a trained head keeps its labels; data labels it does not know are refused.

A head with real id2label names (not transformers' LABEL_0...) defines the labels: data in which one of them never
occurs still quantizes (before: a bare "Error(s) in loading state_dict for Linear"), a data label outside them is
refused by name, and so is a --labels that is not the head's. Labels come from the data only for a model without a
head. Token and sequence classification alike.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification, BertForTokenClassification

from qbert_deploy.checkpoint import load_checkpoint
from qbert_deploy.cli.quantize import main as quantize_main
from qbert_deploy.data.conll import TaggedSentence, write_conll
from qbert_deploy.data.tsv import Example, write_tsv
from tests.task_files import QUICK
from tests.task_files import quantize_refused as _refused
from tests.tiny import SENTENCES, save_hf_dir, tiny_config

TAGS = ["O", "B-LOC", "I-LOC", "B-PER"]  # the tagger's head; the data below never use B-PER
SENTIMENT = ["bad", "good"]


def _head(model_class: type, labels: list[str], folder: Path) -> Path:
    config = tiny_config()
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    torch.manual_seed(0)
    return save_hf_dir(model_class(config), folder)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("heads")
    _head(BertForTokenClassification, TAGS, root / "tagger")
    _head(BertForSequenceClassification, SENTIMENT, root / "sentiment")
    sentences = [TaggedSentence(("in", "new", "york", "today"), (0, 1, 2, 0)),
                 TaggedSentence(("rome", "is", "old"), (1, 0, 0)), TaggedSentence(("hello", "there"), (0, 0))]
    write_conll(root / "train.conll", sentences * 4, TAGS)
    write_conll(root / "dev.conll", sentences, TAGS)
    (root / "unknown.conll").write_text("john B-ORG\nin O\nparis B-CITY\n\nrome B-LOC\n", encoding="utf-8")
    rows = "".join(f"{s}\tgood\n" for s in SENTENCES)  # labels by name, and "bad" never occurs
    (root / "train.tsv").write_text("sentence\tlabel\n" + rows * 2, encoding="utf-8")
    (root / "dev.tsv").write_text("sentence\tlabel\n" + rows, encoding="utf-8")
    (root / "meh.tsv").write_text("sentence\tlabel\nso so\tmeh\nfine\tgood\n", encoding="utf-8")
    return root


def test_a_trained_tagger_keeps_its_tags_when_the_data_lack_one(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert quantize_main(["--model", str(root / "tagger"), "--train", str(root / "train.conll"),
                          "--dev", str(root / "dev.conll"), *QUICK, "-o", str(out)]) == 0
    checkpoint = load_checkpoint(out / "model.pt")
    assert (checkpoint.task, checkpoint.labels) == ("token-classification", TAGS)
    assert checkpoint.state_dict["classifier.weight"].shape[0] == len(TAGS)


def test_a_trained_tagger_refuses_tags_and_labels_it_does_not_know(root: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    model = ["--model", str(root / "tagger"), *QUICK]
    _refused(capsys, [*model, "--train", str(root / "train.conll"), "--dev", str(root / "unknown.conll")],
             tmp_path / "o1", "tags the model's trained head does not know: 'B-CITY', 'B-ORG' (its tags: O, B-LOC")
    _refused(capsys, [*model, "--train", str(root / "train.conll"), "--dev", str(root / "dev.conll"),
                      "--labels", "O,B-LOC,I-LOC,B-ORG"], tmp_path / "o2",
             "--labels O,B-LOC,I-LOC,B-ORG names 'B-ORG', which it does not know")
    _refused(capsys, [*model, "--train", str(root / "train.conll"), "--dev", str(root / "dev.conll"),
                      "--labels", "O,B-LOC,I-LOC"], tmp_path / "o3", "differs in order or count")


def test_a_trained_classifier_keeps_its_labels_and_refuses_others(root: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    model = ["--model", str(root / "sentiment"), *QUICK]
    assert quantize_main([*model, "--train", str(root / "train.tsv"), "--dev", str(root / "dev.tsv"),
                          "-o", str(out)]) == 0
    assert load_checkpoint(out / "model.pt").labels == SENTIMENT
    _refused(capsys, [*model, "--train", str(root / "train.tsv"), "--dev", str(root / "meh.tsv")], tmp_path / "o1",
             "label 'meh' is not one of the model's labels ['bad', 'good']")
    _refused(capsys, [*model, "--train", str(root / "train.tsv"), "--dev", str(root / "dev.tsv"),
                      "--labels", "good,bad"], tmp_path / "o2", "the model's trained head has the labels bad, good")


def test_a_head_with_default_names_needs_as_many_labels_as_outputs(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """LABEL_0, LABEL_1: the names come from the data or --labels, but the count must fit the head."""
    torch.manual_seed(0)
    plain = save_hf_dir(BertForSequenceClassification(tiny_config()), tmp_path / "plain")
    write_tsv(tmp_path / "d.tsv", [Example(s, i % 2) for i, s in enumerate(SENTENCES)])
    _refused(capsys, ["--model", str(plain), *QUICK, "--train", str(tmp_path / "d.tsv"), "--dev",
                      str(tmp_path / "d.tsv"), "--labels", "a,b,c"], tmp_path / "o1",
             "the model's head has 2 outputs, but there are 3 --labels (a, b, c)")
