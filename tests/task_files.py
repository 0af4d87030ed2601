"""Small generated files in the standard formats for the token-classification and QA tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from qbert_deploy.cli.quantize import main as quantize_main
from qbert_deploy.data.conll import TaggedSentence, write_conll
from qbert_deploy.data.squad import Answer, Question, write_squad

TAGS = ["O", "B-PER", "I-PER", "B-LOC"]
# qbert-quantize in seconds on a tiny model: plumbing, not accuracy
QUICK = ["--method", "directq", "--bits", "4", "--groups", "4", "--finetune-steps", "0", "--calibration-batches", "1",
         "--batch-size", "4"]
PEOPLE = [("john", "smith"), ("mary", "jones"), ("alan", "turing"), ("ada", "lovelace")]
PLACES = ["paris", "london", "berlin", "rome"]


def tagged_sentences() -> list[TaggedSentence]:
    out = []
    for i, (first, last) in enumerate(PEOPLE):
        place = PLACES[i]
        out.append(TaggedSentence((first, last, "went", "to", place, "."), (1, 2, 0, 0, 3, 0)))
        out.append(TaggedSentence(("in", place, first, "met", "a", "friend"), (0, 3, 1, 0, 0, 0)))
    return out


def write_conll_pair(folder: Path) -> tuple[Path, Path]:
    """train.conll (CoNLL-2003 style, four columns) and dev.conll."""
    train, dev = folder / "train.conll", folder / "dev.conll"
    sentences = tagged_sentences()
    lines = ["-DOCSTART- -X- -X- O", ""]
    for s in sentences * 3:
        lines += [f"{w} NN B-NP {TAGS[t]}" for w, t in zip(s.words, s.tags, strict=True)] + [""]
    train.write_text("\n".join(lines), encoding="utf-8")
    write_conll(dev, sentences, TAGS)
    return train, dev


def questions() -> list[Question]:
    out = []
    for i, ((first, last), place) in enumerate(zip(PEOPLE, PLACES, strict=True)):
        context = f"{first.title()} {last.title()} was born in {place.title()} and later moved away to work."
        city = place.title()
        out.append(Question(f"q{i}a", f"Where was {first.title()} born?", context,
                            (Answer(city, context.index(city)),)))
        who = f"{first.title()} {last.title()}"
        out.append(Question(f"q{i}b", f"Who was born in {city}?", context, (Answer(who, 0),)))
    long_context = "It rained. " * 20 + "The treasure is hidden under the old oak tree. " + "It rained. " * 20
    out.append(Question("long", "Where is the treasure hidden?", long_context,
                        (Answer("under the old oak tree", long_context.index("under the old oak tree")),)))
    return out


def write_squad_pair(folder: Path) -> tuple[Path, Path]:
    train, dev = folder / "train.json", folder / "dev.json"
    write_squad(train, questions() * 3)
    write_squad(dev, questions())
    return train, dev


def quantize_refused(capsys: pytest.CaptureFixture[str], argv: list[str], out: Path, message: str) -> None:
    """qbert-quantize refuses `argv` in one line naming `message`, exit 2, and writes nothing to `out`."""
    capsys.readouterr()
    assert quantize_main([*argv, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qbert-quantize: error: ") and "\n" not in err and "Traceback" not in err, err
    assert message in err, err
    assert not out.exists(), "nothing may be written on bad input"


# ---- GLUE TSV files in each task's own layout (headers as GLUE ships them) ----

SENTENCE_PAIRS = [("a gorgeous, moving film", "the film moved me"), ("dull and lifeless", "it was full of life"),
                  ("not bad at all", "it was quite good"), ("the plot is a mess", "the story holds together"),
                  ("one of the best performances", "the acting was great"),
                  ("i wanted my hours back", "time well spent"), ("charming", "it has charm"),
                  ("tedious", "it was gripping")]
NLI = ["entailment", "not_entailment"]
MNLI = ["entailment", "neutral", "contradiction"]
GLUE_NAMES = {"SST-2": ["negative", "positive"], "CoLA": ["unacceptable", "acceptable"],
              "MRPC": ["not_equivalent", "equivalent"], "QQP": ["not_duplicate", "duplicate"], "QNLI": NLI,
              "RTE": NLI, "WNLI": ["not_entailment", "entailment"], "MNLI": MNLI}
PAIR_TASKS = ("MRPC", "QQP", "QNLI", "RTE", "WNLI", "MNLI")


def _glue_lines(task: str, dev: bool) -> list[str]:
    rows = []
    for i, (a, b) in enumerate(SENTENCE_PAIRS):
        y = i % 2
        rows.append({
            "SST-2": f"{a}\t{y}",
            "CoLA": f"gj04\t{y}\t{'' if y else '*'}\t{a}",
            "MRPC": f"{y}\t{1000 + i}\t{2000 + i}\t{a}\t{b}",
            "QQP": f"{i}\t{2 * i}\t{2 * i + 1}\t{a}?\t{b}?\t{y}",
            "QNLI": f"{i}\t{a}?\t{b}\t{NLI[y]}",
            "RTE": f"{i}\t{a}\t{b}\t{NLI[y]}",
            "WNLI": f"{i}\t{a}\t{b}\t{y}",
            "MNLI": (f"{i}\t{31193 + i}\t{31193 + i}n\tfiction\t( {a} )\t( {b} )\t(ROOT (S {a}))\t(ROOT (S {b}))"
                     f"\t{a}\t{b}" + f"\t{MNLI[i % 3]}" * (5 if dev else 1) + f"\t{MNLI[i % 3]}"),
        }[task])
    mnli = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
            "sentence2_parse\tsentence1\tsentence2\t" + "\t".join(f"label{k}" for k in range(1, 6 if dev else 2))
            + "\tgold_label")
    header = {"SST-2": "sentence\tlabel", "CoLA": None, "MRPC": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
              "QQP": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "QNLI": "index\tquestion\tsentence\tlabel",
              "RTE": "index\tsentence1\tsentence2\tlabel", "WNLI": "index\tsentence1\tsentence2\tlabel",
              "MNLI": mnli}[task]
    return ([header] if header else []) + rows


def write_glue(folder: Path, task: str) -> tuple[Path, Path]:
    """train.tsv and dev.tsv of a GLUE task in its own layout (MRPC's with its byte order mark, CoLA's headerless,
    MNLI's dev with label1..label5), under folder/task."""
    (folder / task).mkdir(parents=True, exist_ok=True)
    train, dev = folder / task / "train.tsv", folder / task / "dev.tsv"
    train.write_text("\n".join(_glue_lines(task, False)) + "\n", encoding="utf-8")
    dev.write_text("\n".join(_glue_lines(task, True)) + "\n", encoding="utf-8")
    return train, dev
