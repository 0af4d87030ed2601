"""GLUE-style TSV: one labelled example a line, a single text or a sentence pair.

The columns are found from the header in the layouts GLUE ships (`LAYOUTS`: SST-2, MRPC, QQP, QNLI, RTE, WNLI,
MNLI, plus plain `text` and `premise`/`hypothesis` files) or, for CoLA, from its fixed headerless layout; `Columns`
names them for any other file. A header that fits no layout, or fits one but holds another text column the layout
would leave out, is refused in one line naming the columns found: nothing is dropped without a word.

Label names, when neither the model's head nor --labels gives them (`label_names`): integer labels take GLUE's
names for the recognised layout (SST-2 negative,positive; CoLA unacceptable,acceptable; MRPC
not_equivalent,equivalent; QQP not_duplicate,duplicate; RTE/WNLI's shared header: WNLI's not_entailment,entailment),
else their ids as names ("0", "1", ...). String labels take GLUE's list when they all belong to it (MNLI
entailment,neutral,contradiction; QNLI and RTE entailment,not_entailment), else the training file's names sorted,
so that the ids do not depend on the order of the lines.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
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


@dataclass(frozen=True)
class Layout:
    name: str
    texts: tuple[str, ...]  # one text column, or the two of a sentence pair
    label: str
    id_names: tuple[str, ...] = ()  # GLUE's names of the integer labels 0, 1, ...
    string_names: tuple[str, ...] = ()  # GLUE's order of string labels


NLI = ("entailment", "not_entailment")
LAYOUTS = (
    Layout("SST-2", ("sentence",), "label", ("negative", "positive")),
    Layout("MRPC", ("#1 String", "#2 String"), "Quality", ("not_equivalent", "equivalent")),
    Layout("QQP", ("question1", "question2"), "is_duplicate", ("not_duplicate", "duplicate")),
    Layout("QNLI", ("question", "sentence"), "label", NLI, NLI),
    # RTE and WNLI share a header: RTE's labels are names, WNLI's are 0 (not_entailment) and 1 (entailment)
    Layout("RTE/WNLI", ("sentence1", "sentence2"), "label", ("not_entailment", "entailment"), NLI),
    Layout("MNLI", ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction"),
           ("entailment", "neutral", "contradiction")),
    Layout("text", ("text",), "label"),
    Layout("premise/hypothesis", ("premise", "hypothesis"), "label"),
)
COLA = Layout("CoLA", ("sentence",), "label", ("unacceptable", "acceptable"))
COLA_COLUMNS = ("source", "label", "original judgement", "sentence")  # CoLA's files have no header
TEXT_LIKE = {c for layout in LAYOUTS for c in layout.texts}
KNOWN = "SST-2, CoLA, MRPC, QQP, QNLI, RTE, MNLI, WNLI, or text/premise,hypothesis with label"


@dataclass(frozen=True)
class Columns:
    """Columns named by the user (--text-columns, --label-column); None: found from the layout."""
    texts: tuple[str, ...] | None = None
    label: str | None = None


@dataclass(frozen=True)
class Table:
    """A TSV read but not yet labelled: its texts and raw labels, and the layout they were found by."""
    path: Path
    layout: Layout | None  # the GLUE layout whose columns these are (its label names apply), None for others
    text_columns: tuple[str, ...]
    label_column: str
    texts: list[tuple[str, str | None]]
    raw_labels: list[str]
    lines: list[int]  # each example's line number, for messages

    @property
    def pairs(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def kind(self) -> str:
        return "sentence pairs" if self.pairs else "single texts"

    def describe(self) -> str:
        what = f"the {self.layout.name} layout" if self.layout else "named columns"
        return (f"{len(self.texts)} {self.kind} in {what}, text {' + '.join(map(repr, self.text_columns))}, "
                f"label {self.label_column!r}")

    def examples(self, labels: Sequence[str]) -> list[Example]:
        return [Example(text, _label_id(raw, labels, f"{self.path}:{line}"), pair)
                for (text, pair), raw, line in zip(self.texts, self.raw_labels, self.lines, strict=True)]


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


def read_tsv(path: str | Path, labels: Sequence[str] | None = None, columns: Columns | None = None) -> list[Example]:
    """Labelled examples; labels may be ids or names of `labels` (default: `label_names` of this file)."""
    table = read_table(path, columns)
    return table.examples(labels if labels is not None else label_names(table))


def read_table(path: str | Path, columns: Columns | None = None) -> Table:
    path = Path(path)
    if not path.is_file():
        raise TsvError(f"{path}: no such data file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # GLUE's MRPC files start with a byte order mark
    except UnicodeDecodeError:
        raise TsvError(f"{path}: not UTF-8 text") from None
    rows = list(csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise TsvError(f"{path}: empty file")
    columns = columns or Columns()
    header, first = rows[0], 2
    layout: Layout | None
    texts: tuple[str, ...]
    if columns == Columns() and _is_cola(header):
        layout, header, first = COLA, list(COLA_COLUMNS), 1
        texts, label = COLA.texts, COLA.label
    else:
        if len(set(header)) != len(header):
            raise TsvError(f"{path}: the header names a column twice ({_names(header)})")
        layout, texts, label = _choose(path, header, columns)
    text_at, label_at = [header.index(c) for c in texts], header.index(label)
    texts_read, raw, lines = [], [], []
    for number, row in enumerate(rows[first - 1:], start=first):
        if len(row) != len(header):
            raise TsvError(f"{path}:{number}: {len(row)} columns, the {'header' if first == 2 else 'CoLA layout'} "
                           f"has {len(header)}")
        texts_read.append((row[text_at[0]], row[text_at[1]] if len(text_at) > 1 else None))
        raw.append(row[label_at].strip())
        lines.append(number)
    if not texts_read:
        raise TsvError(f"{path}: no examples")
    return Table(path, layout, texts, label, texts_read, raw, lines)


def _is_cola(first_row: list[str]) -> bool:
    """CoLA's headerless line: source, 0/1, the original judgement mark (empty, *, ?, ...), sentence."""
    return (len(first_row) == 4 and first_row[1] in ("0", "1") and set(first_row[2]) <= set("*?#")
            and not TEXT_LIKE & set(first_row))


def _names(header: Sequence[str]) -> str:
    return ", ".join(repr(c if len(c) <= 40 else c[:37] + "...") for c in header[:16]) + (
        f" and {len(header) - 16} more" if len(header) > 16 else "")


def _choose(path: Path, header: list[str], columns: Columns) -> tuple[Layout | None, tuple[str, ...], str]:
    """The text columns and the label column (named, else the recognised layout's), and the GLUE layout they are,
    if any (whose label names apply)."""
    for name in (*(columns.texts or ()), *([columns.label] if columns.label else [])):
        if name not in header:
            raise TsvError(f"{path}: no column {name!r} (columns found: {_names(header)})")
    texts: tuple[str, ...] | None
    if columns.texts is not None:
        texts, label = columns.texts, columns.label or ("label" if "label" in header else None)
    else:
        layout = _recognise(path, header, columns.label)
        texts, label = (layout.texts, columns.label or layout.label) if layout else (None, columns.label)
    if texts is None or label is None:
        raise TsvError(f"{path}: cannot tell which columns hold the text and the label (columns found: "
                       f"{_names(header)}); the layouts read are {KNOWN}; name them with --text-columns A[,B] and "
                       "--label-column C")
    if label in texts:
        raise TsvError(f"{path}: column {label!r} cannot be both a text and the label")
    return next((g for g in LAYOUTS if (g.texts, g.label) == (texts, label)), None), texts, label


def _recognise(path: Path, header: list[str], label: str | None) -> Layout | None:
    """The one layout the header fits, its label column `label` when the user named it (a layout inside another,
    SST-2's inside QNLI's, is the other's), or None. Two layouts, or one that would leave a text column out, are
    refused."""
    def columns(layout: Layout) -> set[str]:
        return {*layout.texts, label or layout.label}

    fits = [layout for layout in LAYOUTS if columns(layout) <= set(header)]
    fits = [a for a in fits if not any(columns(a) < columns(b) for b in fits)]
    if len(fits) > 1:
        raise TsvError(f"{path}: the columns fit more than one layout ({', '.join(f.name for f in fits)}; columns "
                       f"found: {_names(header)}); name them with --text-columns A[,B] and --label-column C")
    if not fits:
        return None
    left_out = [c for c in header if c in TEXT_LIKE and c not in fits[0].texts]
    if left_out:
        raise TsvError(f"{path}: read as {fits[0].name}, the text column {left_out[0]!r} would be left out (columns "
                       f"found: {_names(header)}); name the text columns with --text-columns A[,B]")
    return fits[0]


def label_names(train: Table, *others: Table, count: int | None = None) -> list[str]:
    """The label names of data whose model has none (the module docstring says which); `count`: the head's
    outputs, when it has some (the ids' names are then as many). Names come from `train` alone: the other files'
    labels must be among them."""
    layout = train.layout
    if all(_is_id(raw) for raw in train.raw_labels):
        ids = [int(raw) for t in (train, *others) for raw in t.raw_labels if _is_id(raw)]
        size = max(ids) + 1
        if layout is not None and layout.id_names and size <= len(layout.id_names) and count in (None,
                                                                                                  len(layout.id_names)):
            return list(layout.id_names)
        return [str(i) for i in range(max(size, count or 2))]
    found = set(train.raw_labels)
    if layout is not None and layout.string_names and found <= set(layout.string_names):
        return list(layout.string_names)
    return sorted(found)


def _is_id(raw: str) -> bool:
    return raw.isdigit() and raw.isascii()


def _label_id(raw: str, labels: Sequence[str], where: str) -> int:
    if raw in labels:
        return list(labels).index(raw)
    try:
        value = int(raw)
    except ValueError:
        raise TsvError(f"{where}: label {raw!r} is not one of the model's labels {list(labels)}") from None
    if not 0 <= value < len(labels):
        raise TsvError(f"{where}: label {value} is out of range for {len(labels)} labels {list(labels)}")
    return value


# The command-line options that name a TSV's columns, shared by qbert-quantize and qbert-validate.

def _text_columns(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(","))
    if len(names) > 2 or not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected one text column or two (a sentence pair), e.g. "
                                         f"question,sentence; got {text!r}")
    return names


def add_column_options(parser: argparse.ArgumentParser) -> None:
    """--text-columns and --label-column: the TSV columns, for a layout the header does not tell."""
    parser.add_argument("--text-columns", type=_text_columns, metavar="A[,B]",
                        help="TSV: the column holding the text, or the two of a sentence pair (default: found from "
                        "the header in the GLUE layouts SST-2, CoLA, MRPC, QQP, QNLI, RTE, MNLI, WNLI)")
    parser.add_argument("--label-column", metavar="C",
                        help="TSV: the column holding the label (default: the layout's, else 'label')")


def columns_of(args: argparse.Namespace) -> Columns:
    """The TSV columns the user named."""
    return Columns(args.text_columns, args.label_column)
