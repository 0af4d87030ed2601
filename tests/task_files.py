"""Small generated files in the standard formats for the token-classification and QA tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from qbert_deploy.cli.quantize import main as quantize_main
from qbert_deploy.data.conll import TaggedSentence, write_conll
from qbert_deploy.data.squad import Answer, Question, write_squad

TAGS = ["O", "B-PER", "I-PER", "B-LOC"]
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
