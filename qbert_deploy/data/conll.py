"""CoNLL columns: one token a line with its tag in the last column, a blank line between sentences.

`-DOCSTART-` lines are skipped. CoNLL-2003 files (word POS chunk NER) read as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qbert_deploy.atomic import atomic_file


class ConllError(ValueError):
    """A data file that cannot be read as CoNLL columns."""


@dataclass(frozen=True)
class TaggedSentence:
    words: tuple[str, ...]
    tags: tuple[int, ...]  # tag ids into the label list


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ConllError(f"{path}: no such data file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConllError(f"{path}: not UTF-8 text") from None


def read_tags(path: str | Path) -> list[list[tuple[str, str]]]:
    """Sentences as (word, tag) pairs, tags as written."""
    path = Path(path)
    sentences: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        parts = line.split()
        if not parts:
            if current:
                sentences.append(current)
            current = []
            continue
        if parts[0] == "-DOCSTART-":
            continue
        if len(parts) < 2:
            raise ConllError(f"{path}:{number}: {parts[0]!r} has no tag (expected 'word ... TAG' columns)")
        current.append((parts[0], parts[-1]))
    if current:
        sentences.append(current)
    if not sentences:
        raise ConllError(f"{path}: no sentences")
    return sentences


def tag_names(sentences: list[list[tuple[str, str]]]) -> list[str]:
    """The label list made from data: 'O' first, then the others sorted."""
    found = {tag for sentence in sentences for _, tag in sentence}
    return (["O"] if "O" in found else []) + sorted(found - {"O"})


def read_conll(path: str | Path, labels: list[str]) -> list[TaggedSentence]:
    """Sentences with tag ids; a tag outside `labels` is an error that names it."""
    out = []
    index = {name: i for i, name in enumerate(labels)}
    for sentence in read_tags(path):
        unknown = sorted({tag for _, tag in sentence if tag not in index})
        if unknown:
            raise ConllError(f"{path}: tag {unknown[0]!r} is not one of the model's tags {labels}")
        out.append(TaggedSentence(tuple(w for w, _ in sentence), tuple(index[t] for _, t in sentence)))
    return out


def write_conll(path: Path, sentences: list[TaggedSentence], labels: list[str]) -> None:
    lines = ["-DOCSTART- -X- -X- O", ""]
    for sentence in sentences:
        lines += [f"{w} {labels[t]}" for w, t in zip(sentence.words, sentence.tags, strict=True)] + [""]
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
