"""GLUE-style TSV: a header naming the columns, one example a line (sentence<TAB>label, or a sentence pair)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from qbert_deploy.atomic import atomic_file


class TsvError(ValueError):
    """A data file that cannot be read as a labelled TSV."""


@dataclass(frozen=True)
class Example:
    text: str
    label: int
    text_pair: str | None = None


def write_tsv(path: Path, examples: list[Example]) -> None:
    pair = any(e.text_pair is not None for e in examples)
    header = "sentence1\tsentence2\tlabel" if pair else "sentence\tlabel"
    lines = [header]
    for e in examples:
        clean = e.text.replace("\t", " ").replace("\n", " ")
        if pair:
            lines.append(f"{clean}\t{(e.text_pair or '').replace(chr(9), ' ')}\t{e.label}")
        else:
            lines.append(f"{clean}\t{e.label}")
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_tsv(path: str | Path, labels: list[str] | None = None, text_column: str | None = None,
             pair_column: str | None = None, label_column: str = "label") -> list[Example]:
    """Read labelled examples. Labels may be integer ids or label names (when `labels` is given)."""
    path = Path(path)
    if not path.is_file():
        raise TsvError(f"{path}: no such data file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TsvError(f"{path}: not UTF-8 text") from None
    rows = list(csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise TsvError(f"{path}: empty file")
    header = rows[0]
    text_column = text_column or next((c for c in ("sentence", "sentence1", "text", "premise", "question")
                                       if c in header), None)
    if text_column is None or text_column not in header:
        raise TsvError(f"{path}: no text column (looked for sentence/sentence1/text/premise/question; "
                       f"header is {header})")
    if label_column not in header:
        raise TsvError(f"{path}: no '{label_column}' column (header is {header})")
    if pair_column is None:
        pair_column = next((c for c in ("sentence2", "hypothesis") if c in header), None)
    t, y = header.index(text_column), header.index(label_column)
    p = header.index(pair_column) if pair_column else None
    examples = []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise TsvError(f"{path}:{number}: {len(row)} columns, the header has {len(header)}")
        examples.append(Example(row[t], _label_id(row[y], labels, f"{path}:{number}"),
                                row[p] if p is not None else None))
    if not examples:
        raise TsvError(f"{path}: no examples")
    return examples


def _label_id(raw: str, labels: list[str] | None, where: str) -> int:
    raw = raw.strip()
    if labels is not None and raw in labels:
        return labels.index(raw)
    try:
        value = int(raw)
    except ValueError:
        raise TsvError(f"{where}: label {raw!r} is not one of the model's labels {labels}") from None
    if labels is not None and not 0 <= value < len(labels):
        raise TsvError(f"{where}: label {value} is out of range for {len(labels)} labels {labels}")
    return value
