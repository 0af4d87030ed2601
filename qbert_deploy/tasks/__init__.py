"""The three tasks in one table: which head, which outputs, which data format, which metric.

Torch-free (numpy only), so serving and the Triton writer read the same table as training and validation. A fourth
task is one more row here plus its data reader and metric.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SEQUENCE = "sequence-classification"
TOKEN = "token-classification"
QA = "question-answering"
FEATURE = "feature-extraction"  # sentence embeddings: encoder + the directory's pooling and normalisation


@dataclass(frozen=True)
class TaskKind:
    name: str
    auto_class: str  # the transformers Auto class that builds this head
    architecture_suffix: str  # what Hugging Face configs end their architecture names with
    outputs: tuple[str, ...]  # ONNX output names (Optimum's)
    pipeline: str  # transformers pipeline name
    main_metric: str  # the metric the gate works on (percent)
    data_formats: tuple[str, ...]  # file suffixes of its data


TASKS: dict[str, TaskKind] = {t.name: t for t in (
    TaskKind(SEQUENCE, "AutoModelForSequenceClassification", "ForSequenceClassification", ("logits",),
             "text-classification", "accuracy", (".tsv",)),
    TaskKind(TOKEN, "AutoModelForTokenClassification", "ForTokenClassification", ("logits",),
             "token-classification", "entity_f1", (".conll", ".txt")),
    TaskKind(QA, "AutoModelForQuestionAnswering", "ForQuestionAnswering", ("start_logits", "end_logits"),
             "question-answering", "f1", (".json",)),
    # No head and no labels; its data (one text per line) is chosen by --task or a sentence-transformers directory.
    TaskKind(FEATURE, "AutoModel", "Model", ("last_hidden_state", "sentence_embedding"),
             "feature-extraction", "mean_cosine", ()),
)}
DEFAULT_TASK = SEQUENCE
QA_LABELS = ["start", "end"]  # a QA head's two "labels": start and end logits per token


def task_kind(name: str) -> TaskKind:
    if name not in TASKS:
        raise ValueError(f"task {name!r} is not supported; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def task_of_head(architectures: Iterable[str] | None) -> str | None:
    """The task of a Hugging Face config's architectures (e.g. BertForTokenClassification), None for a bare encoder."""
    for arch in architectures or ():
        for kind in TASKS.values():
            if kind.name != FEATURE and str(arch).endswith(kind.architecture_suffix):
                return kind.name
    return None


def task_of_data(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    for kind in TASKS.values():
        if suffix in kind.data_formats:
            return kind.name
    raise ValueError(f"{path}: cannot tell the task from the file name; use .tsv (GLUE), .conll/.txt (CoNLL) "
                     "or .json (SQuAD v1.1), or give --task")


def architecture(model_type: str, task: str) -> str:
    """Hugging Face architecture name of a model type's head for `task` (what Optimum reads from config.json)."""
    prefixes = {"bert": "Bert", "distilbert": "DistilBert", "roberta": "Roberta"}
    return prefixes.get(model_type, model_type.capitalize()) + task_kind(task).architecture_suffix


def combine(task: str, outputs: Sequence[np.ndarray]) -> np.ndarray:
    """One array per batch for every task: QA's start/end logits stacked on a last axis of 2."""
    if task == QA:
        return np.stack([outputs[0], outputs[1]], axis=-1)
    return np.asarray(outputs[0])


def served_outputs(task: str) -> tuple[str, ...]:
    """The outputs a server runs and answers with: an embedding model's pooled sentence_embedding alone (its
    last_hidden_state would cost rows x tokens x hidden floats per answer that no embedding client reads)."""
    return ("sentence_embedding",) if task == FEATURE else task_kind(task).outputs


def split(task: str, combined: np.ndarray) -> dict[str, np.ndarray]:
    """The named outputs of a combined array (inverse of `combine`; an embedding model's: its served output)."""
    names = served_outputs(task)
    if task == QA:
        return {names[0]: np.ascontiguousarray(combined[..., 0]), names[1]: np.ascontiguousarray(combined[..., 1])}
    return {names[0]: combined}


def entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, first, last) spans of BIO/IOB1/BIOES tags, inclusive; a tag without prefix continues its type."""
    spans: list[tuple[str, int, int]] = []
    current: list[Any] | None = None
    for i, tag in enumerate(tags):
        if tag == "O" or not tag:
            if current is not None:
                spans.append((current[0], current[1], current[2]))
            current = None
            continue
        prefix, kind = (tag[0], tag[2:]) if len(tag) > 2 and tag[1] == "-" and tag[0] in "BIES" else ("I", tag)
        if current is not None and (prefix in ("B", "S") or kind != current[0]):
            spans.append((current[0], current[1], current[2]))
            current = None
        if current is None:
            current = [kind, i, i]
        current[2] = i
        if prefix in ("E", "S"):
            spans.append((current[0], current[1], current[2]))
            current = None
    if current is not None:
        spans.append((current[0], current[1], current[2]))
    return spans


def best_span(start: np.ndarray, end: np.ndarray, allowed: np.ndarray, max_answer_tokens: int = 30,
              ) -> tuple[int, int, float]:
    """The (start, end) token pair with the highest start+end logit, start <= end < start + max_answer_tokens,
    both where `allowed` (context tokens); and its score."""
    s = np.where(allowed, start.astype(np.float64), -np.inf)
    e = np.where(allowed, end.astype(np.float64), -np.inf)
    scores = s[:, None] + e[None, :]
    n = len(s)
    rows, cols = np.indices((n, n))
    scores[(cols < rows) | (cols >= rows + max_answer_tokens)] = -np.inf
    flat = int(np.argmax(scores))
    first, last = divmod(flat, n)
    return first, last, float(scores[first, last])


def output_dims(task: str, width: int) -> list[int]:
    """Each served output's shape after the batch axis (-1: as long as the input): [labels], [tokens, labels],
    [tokens], and an embedding model's [hidden]; `width` is the label count, or the embedding size."""
    return {SEQUENCE: [width], TOKEN: [-1, width], QA: [-1], FEATURE: [width]}[task_kind(task).name]


SENTENCE_TRANSFORMERS_MODULES = "modules.json"  # what makes a folder a sentence-transformers model directory


def is_sentence_transformers_dir(folder: str | Path) -> bool:
    return (Path(folder) / SENTENCE_TRANSFORMERS_MODULES).is_file()
