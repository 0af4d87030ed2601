"""Per task: read --data, tokenize it, and score and compare each backend's outputs (qbert_deploy.tasks).

Sequence classification: accuracy; prediction agreement. Token classification: seqeval entity F1 (and P/R, token
accuracy); per-word argmax agreement and per-sentence entity-set agreement. Question answering: SQuAD F1 (and EM);
start/end argmax agreement per feature and answer-span exact agreement per question.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from qbert_deploy.data.tsv import Columns, read_tsv
from qbert_deploy.families import TEXT_INPUTS
from qbert_deploy.tasks import FEATURE, QA, SEQUENCE, TASKS, TOKEN, entities, task_kind, task_of_data

T = TypeVar("T")

Batch = dict[str, np.ndarray]


@dataclass
class Evaluation:
    task: str
    batches: list[Batch]
    examples: int
    digest: str  # what a baseline must have been measured on
    labels: np.ndarray | None  # sequence classification: gold label ids (for the confidence interval)
    score: Callable[[np.ndarray], dict[str, float]]  # combined outputs -> metrics in percent
    agree: Callable[[np.ndarray, np.ndarray], dict[str, float]]  # (outputs, reference) -> agreements in percent
    valid: np.ndarray | None = None  # [rows, tokens] bool: the positions whose outputs are compared (not padding)
    # Metrics measured against the float model's outputs (embeddings: fidelity to fp32), (outputs, float) -> percent
    reference_score: Callable[[np.ndarray, np.ndarray], dict[str, float]] | None = None
    rows: int | None = None  # the evaluated rows when the batches hold more (an embedding probe's training texts)
    main: str | None = None  # the gated metric when it is not the task's main metric

    @property
    def metric(self) -> str:
        return self.main or task_kind(self.task).main_metric

    def compared(self, outputs: np.ndarray) -> np.ndarray:
        outputs = outputs if self.rows is None else outputs[:self.rows]
        return outputs if self.valid is None else outputs[self.valid]


def spread(items: list[T], limit: int | None) -> list[T]:
    """`limit` items evenly spaced over the file (all of them without a limit): data files are often sorted by
    label, and their first N examples would all be of one class."""
    if not limit or limit >= len(items):
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


def _file_digest(path: Path, limit: int | None) -> str:
    return hashlib.sha256(path.read_bytes() + f"\nlimit={limit} spread".encode()).hexdigest()


def prepare(task: str, data_path: Path, labels: list[str], tokenizer: Any, batch_size: int, max_length: int,
            limit: int | None, inputs: Sequence[str] = TEXT_INPUTS, columns: Columns | None = None,
            probe_train: Path | None = None) -> Evaluation:
    """The data of `task` read and checked (a format that does not fit the task is an error), as batches of the
    model family's `inputs`; `columns`: a TSV's columns, when the user named them; `probe_train`: labelled texts
    an embedding model's probe is trained on."""
    if columns not in (None, Columns()) and task not in (SEQUENCE, FEATURE):
        raise ValueError(f"--text-columns and --label-column name TSV columns; {task} data has none")
    if probe_train is not None and task != FEATURE:
        raise ValueError(f"--probe-train is for embedding models; this model is {task}")
    if task == FEATURE:
        evaluation = _feature(data_path, tokenizer, batch_size, max_length, limit, columns, probe_train)
    else:
        evaluation = _prepare(task, data_path, labels, tokenizer, batch_size, max_length, limit, columns)
    return replace(evaluation, batches=[{k: v for k, v in batch.items() if k in inputs}
                                        for batch in evaluation.batches])


def _prepare(task: str, data_path: Path, labels: list[str], tokenizer: Any, batch_size: int, max_length: int,
             limit: int | None, columns: Columns | None) -> Evaluation:
    known = {suffix for kind in TASKS.values() for suffix in kind.data_formats}
    if data_path.suffix.lower() in known and task_of_data(data_path) != task:
        raise ValueError(f"{data_path}: a {task_of_data(data_path)} data file, but the model is {task}")
    if task == TOKEN:
        return _token(data_path, labels, tokenizer, batch_size, max_length, limit)
    if task == QA:
        return _qa(data_path, tokenizer, batch_size, max_length, limit)
    assert task == SEQUENCE
    return _sequence(data_path, labels, tokenizer, batch_size, max_length, limit, columns)


def _sequence(data_path: Path, labels: list[str], tokenizer: Any, batch_size: int, max_length: int,
              limit: int | None, columns: Columns | None) -> Evaluation:
    from qbert_deploy.validation.harness import dataset_digest, tokenize
    from qbert_deploy.validation.stats import agreement

    examples = spread(read_tsv(data_path, labels, columns), limit)
    gold = np.array([e.label for e in examples], dtype=np.int64)
    return Evaluation(
        SEQUENCE, tokenize(tokenizer, examples, batch_size, max_length), len(examples), dataset_digest(examples),
        gold, lambda out: {"accuracy": 100.0 * float((out.argmax(-1) == gold).mean())},
        lambda out, ref: {"agreement": 100.0 * agreement(out, ref)})


def _batches(inputs: dict[str, np.ndarray], batch_size: int) -> list[Batch]:
    rows = len(inputs["input_ids"])
    return [{k: v[i:i + batch_size] for k, v in inputs.items()} for i in range(0, rows, batch_size)]


def _token(data_path: Path, labels: list[str], tokenizer: Any, batch_size: int, max_length: int,
           limit: int | None) -> Evaluation:
    from qbert_deploy.data.conll import read_conll
    from qbert_deploy.data.features import decode_tags, tag_features
    from qbert_deploy.metrics import tagging_scores

    sentences = spread(read_conll(data_path, labels), limit)
    features = tag_features(tokenizer, sentences, max_length)
    gold = [[labels[t] for t in s.tags] for s in sentences]
    words = np.zeros_like(features.labels, dtype=bool)
    for row, first in enumerate(features.first_tokens):
        words[row, first] = True

    def tags(out: np.ndarray) -> list[list[str]]:
        return [[labels[t] for t in p] for p in decode_tags(out, features, sentences)]

    def score(out: np.ndarray) -> dict[str, float]:
        return tagging_scores(tags(out), gold)

    def agree(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
        same_tokens = (out.argmax(-1) == ref.argmax(-1))[words]
        same_sets = [set(entities(a)) == set(entities(b)) for a, b in zip(tags(out), tags(ref), strict=True)]
        return {"token_agreement": 100.0 * float(same_tokens.mean()) if same_tokens.size else 100.0,
                "entity_set_agreement": 100.0 * float(np.mean(same_sets))}

    return Evaluation(TOKEN, _batches(features.inputs, batch_size), len(sentences), _file_digest(data_path, limit),
                      None, score, agree, features.inputs["attention_mask"].astype(bool))


def _qa(data_path: Path, tokenizer: Any, batch_size: int, max_length: int, limit: int | None) -> Evaluation:
    from qbert_deploy.data.features import decode_answers, qa_features
    from qbert_deploy.data.squad import read_squad
    from qbert_deploy.metrics import squad_scores

    questions = spread(read_squad(data_path), limit)
    features = qa_features(tokenizer, questions, max_length)
    truths = [[a.text for a in q.answers] for q in questions]
    context = features.context

    def score(out: np.ndarray) -> dict[str, float]:
        return squad_scores([s.text for s in decode_answers(out, features, questions)], truths)

    def agree(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
        def ends(x: np.ndarray, axis: int) -> np.ndarray:
            return np.asarray(np.where(context, x[..., axis], -np.inf).argmax(-1))

        start_end = (ends(out, 0) == ends(ref, 0)) & (ends(out, 1) == ends(ref, 1))
        spans = [(a.start, a.end) == (b.start, b.end) for a, b in
                 zip(decode_answers(out, features, questions), decode_answers(ref, features, questions), strict=True)]
        return {"start_end_agreement": 100.0 * float(start_end.mean()),
                "span_agreement": 100.0 * float(np.mean(spans))}

    return Evaluation(QA, _batches(features.inputs, batch_size), len(questions), _file_digest(data_path, limit),
                      None, score, agree, features.inputs["attention_mask"].astype(bool))


def _feature(data_path: Path, tokenizer: Any, batch_size: int, max_length: int, limit: int | None,
             columns: Columns | None, probe_train: Path | None) -> Evaluation:
    """Embeddings: fidelity to the float model (mean and 5th-percentile cosine, 10-nearest-neighbour overlap in the
    dev set) and to fake-quant; with `probe_train`, MTEB's probe accuracy (trained on that file's embeddings by the
    same backend, tested on --data's labels). The probe's texts run after the evaluated rows, in the same batches."""
    from qbert_deploy.data.tsv import Example
    from qbert_deploy.tasks.embeddings import EmbeddingDataError, fidelity, probe_accuracy, read_text_data
    from qbert_deploy.validation.harness import tokenize

    if data_path.suffix.lower() == ".json":
        raise ValueError(f"{data_path}: a question-answering data file, but the model is {FEATURE}; give a .txt "
                         "file (one text per line) or a TSV")
    texts, raw = read_text_data(data_path, columns)
    chosen = spread(list(range(len(texts))), limit)
    texts, raw = [texts[i] for i in chosen], [raw[i] for i in chosen] if raw else []
    if len(texts) < 2:
        raise EmbeddingDataError(f"{data_path}: the neighbour measure needs at least two texts")
    probe: tuple[list[str], np.ndarray, np.ndarray] | None = None
    if probe_train is not None:
        if not raw:
            raise EmbeddingDataError(f"{data_path}: the probe needs labelled texts (a TSV with a label column)")
        train_texts, train_raw = read_text_data(probe_train, columns)
        if not train_raw:
            raise EmbeddingDataError(f"{probe_train}: the probe needs labelled texts (a TSV with a label column)")
        names = sorted(set(train_raw))
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise EmbeddingDataError(f"{data_path}: labels {', '.join(unknown[:5])} are not in {probe_train}")
        probe = (train_texts, np.array([names.index(r) for r in train_raw]), np.array([names.index(r) for r in raw]))
    rows = len(texts)
    every = texts + (probe[0] if probe else [])
    batches = tokenize(tokenizer, [Example(t, 0) for t in every], batch_size, max_length)
    digest = hashlib.sha256(("\n".join(every) + f"\nlimit={limit} probe={probe_train is not None}").encode()
                            ).hexdigest()

    def score(out: np.ndarray) -> dict[str, float]:
        if probe is None:
            return {}
        return {"probe_accuracy": probe_accuracy(out[rows:], probe[1], out[:rows], probe[2])}

    def agree(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
        return {k: 100.0 * v for k, v in fidelity(out[:rows], ref[:rows]).items()}

    def against_float(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
        return {f"{k}_fp32": v for k, v in agree(out, ref).items()}

    return Evaluation(FEATURE, batches, rows, digest, None, score, agree, None, against_float, rows,
                      main="mean_cosine_fp32")


def main_agreement(values: dict[str, float]) -> float:
    return next(iter(values.values()))


__all__ = ["Evaluation", "main_agreement", "prepare"]
