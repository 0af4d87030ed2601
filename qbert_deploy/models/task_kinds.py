"""Token classification and extractive QA as workflow tasks: the same Task interface over their own features."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qbert_deploy.data.conll import TaggedSentence
from qbert_deploy.data.features import (
    QAFeatures,
    TagFeatures,
    decode_answers,
    decode_tags,
    qa_features,
    tag_features,
)
from qbert_deploy.data.squad import Question
from qbert_deploy.metrics import squad_scores, tagging_scores
from qbert_deploy.models.task import Task
from qbert_deploy.models.train import Batch
from qbert_deploy.tasks import QA, TOKEN


def _trimmed(inputs: dict[str, np.ndarray], labels: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A training batch cut to its longest sequence: features are padded to max_length, training need not be."""
    longest = max(int(inputs["attention_mask"].sum(1).max()), 2)
    per_token = labels.ndim == 2 and labels.shape[1] == inputs["input_ids"].shape[1]
    return ({k: np.ascontiguousarray(v[:, :longest]) for k, v in inputs.items()},
            np.ascontiguousarray(labels[:, :longest]) if per_token else labels)


class _FeatureTask(Task):
    """Shared batching over precomputed, fixed-length features (`_rows(dev)`)."""

    def _rows(self, dev: bool) -> Any:
        raise NotImplementedError

    def _keep(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model family's inputs only (features always carry token_type_ids; DistilBERT takes none)."""
        return {k: v for k, v in inputs.items() if k in self.inputs}

    def _size(self, dev: bool) -> int:
        return len(self._rows(dev).inputs["input_ids"])

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        features = self._rows(False)
        order = np.random.default_rng(epoch).permutation(self._size(False))
        for start in range(0, len(order), self.batch_size):
            rows = np.sort(order[start:start + self.batch_size])
            yield _trimmed({k: v[rows] for k, v in self._keep(features.inputs).items()}, self._labels(features)[rows])

    def dev_batches(self) -> list[Batch]:
        features = self._rows(True)
        return [(self._keep(inputs), labels) for inputs, labels in
                (features.rows(i, i + 64) for i in range(0, self._size(True), 64))]

    def input_batches(self, count: int, seed: int, size: int | None = None) -> list[dict[str, torch.Tensor]]:
        features, size = self._rows(False), size or self.batch_size
        order = np.random.default_rng(10_000 + seed).permutation(self._size(False))
        out = []
        for start in range(0, len(order), size):
            rows = np.sort(order[start:start + size])
            inputs, labels = _trimmed({k: v[rows] for k, v in self._keep(features.inputs).items()},
                                      self._labels(features)[rows])
            out.append({k: torch.from_numpy(v) for k, v in inputs.items()} | self._label_tensors(labels))
            if len(out) == count:
                break
        return out

    @staticmethod
    def _labels(features: Any) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def _label_tensors(labels: np.ndarray) -> dict[str, torch.Tensor]:
        return {"labels": torch.from_numpy(labels)}


@dataclass
class TokenTask(_FeatureTask):
    """CoNLL sentences: `train`/`dev` hold TaggedSentence, `labels` the tag names."""

    kind = TOKEN
    _cache: dict[bool, TagFeatures] = field(default_factory=dict, repr=False)

    def _rows(self, dev: bool) -> TagFeatures:
        if dev not in self._cache:
            sentences: list[TaggedSentence] = self.dev if dev else self.train
            self._cache[dev] = tag_features(self.tokenizer, sentences, self.max_length)
        return self._cache[dev]

    @staticmethod
    def _labels(features: Any) -> np.ndarray:
        return np.asarray(features.labels)

    def score(self, logits: np.ndarray, labels: np.ndarray) -> float:
        sentences: list[TaggedSentence] = self.dev
        predicted = decode_tags(logits, self._rows(True), sentences)
        names = self.labels
        scores = tagging_scores([[names[t] for t in p] for p in predicted],
                                [[names[t] for t in s.tags] for s in sentences])
        return scores["entity_f1"] / 100.0


@dataclass
class QATask(_FeatureTask):
    """SQuAD questions: `train`/`dev` hold Question; `labels` is ["start", "end"]."""

    kind = QA
    stride: int | None = None
    _cache: dict[bool, QAFeatures] = field(default_factory=dict, repr=False)

    def cache_key(self) -> dict[str, Any]:
        return super().cache_key() | {"doc stride": self.stride}  # the stride makes the training windows

    def _rows(self, dev: bool) -> QAFeatures:
        if dev not in self._cache:
            questions: list[Question] = self.dev if dev else self.train
            self._cache[dev] = qa_features(self.tokenizer, questions, self.max_length, self.stride)
        return self._cache[dev]

    @staticmethod
    def _labels(features: Any) -> np.ndarray:
        return np.asarray(features.positions)

    @staticmethod
    def _label_tensors(labels: np.ndarray) -> dict[str, torch.Tensor]:
        return {"start_positions": torch.from_numpy(labels[:, 0]), "end_positions": torch.from_numpy(labels[:, 1])}

    def agreement(self, logits: np.ndarray, reference: np.ndarray) -> float:
        """Start and end positions ([rows, tokens, 2]: argmax over the tokens) that two models share."""
        return float((logits.argmax(1) == reference.argmax(1)).mean())

    def score(self, combined: np.ndarray, labels: np.ndarray) -> float:
        questions: list[Question] = self.dev
        spans = decode_answers(combined, self._rows(True), questions)
        scores = squad_scores([s.text for s in spans], [[a.text for a in q.answers] for q in questions])
        return scores["f1"] / 100.0
