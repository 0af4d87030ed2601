"""Token-classification and QA examples as model inputs, and model outputs back as tags and answers.

Inputs are padded to `max_length` so that the outputs of every batch stack into one array; both directions are
numpy only, shared by training, validation and (for decoding) nothing that needs torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qbert_deploy.data.conll import TaggedSentence
from qbert_deploy.data.squad import Question
from qbert_deploy.tasks import best_span

IGNORE = -100  # the label PyTorch's cross entropy skips: sub-word continuations, special tokens, padding
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _arrays(encoded: Any, count: int, max_length: int) -> dict[str, np.ndarray]:
    out = {k: np.asarray(encoded[k], dtype=np.int64).reshape(count, max_length)
           for k in ("input_ids", "attention_mask")}
    types = encoded.get("token_type_ids")
    out["token_type_ids"] = (np.asarray(types, dtype=np.int64).reshape(count, max_length) if types is not None
                             else np.zeros_like(out["input_ids"]))
    return out


@dataclass
class TagFeatures:
    inputs: dict[str, np.ndarray]  # [sentences, max_length]
    labels: np.ndarray  # [sentences, max_length], tag id on each word's first sub-token, IGNORE elsewhere
    first_tokens: list[list[int]]  # per sentence, the token index of each word kept (a cut sentence keeps fewer)

    def rows(self, start: int, stop: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        return {k: v[start:stop] for k, v in self.inputs.items()}, self.labels[start:stop]


def tag_features(tokenizer: Any, sentences: Sequence[TaggedSentence], max_length: int) -> TagFeatures:
    encoded = tokenizer([list(s.words) for s in sentences], is_split_into_words=True, truncation=True,
                        max_length=max_length, padding="max_length")
    labels = np.full((len(sentences), max_length), IGNORE, dtype=np.int64)
    firsts = []
    for row, sentence in enumerate(sentences):
        seen: set[int] = set()
        first = []
        for position, word in enumerate(encoded.word_ids(row)):
            if word is not None and word not in seen:
                seen.add(word)
                labels[row, position] = sentence.tags[word]
                first.append(position)
        firsts.append(first)
    return TagFeatures(_arrays(encoded, len(sentences), max_length), labels, firsts)


def decode_tags(logits: np.ndarray, features: TagFeatures, sentences: Sequence[TaggedSentence]) -> list[list[int]]:
    """Tag ids per word from [sentences, tokens, tags] logits; words cut by truncation get tag 0 (O)."""
    out = []
    for row, sentence in enumerate(sentences):
        predicted = [int(logits[row, p].argmax()) for p in features.first_tokens[row]]
        out.append(predicted + [0] * (len(sentence.words) - len(predicted)))
    return out


@dataclass
class QAFeatures:
    inputs: dict[str, np.ndarray]  # [features, max_length]; a long context gives several overlapping features
    positions: np.ndarray  # [features, 2] answer start/end token (0, 0 = CLS where the answer is not in view)
    question_of: np.ndarray  # [features] index of the question each feature belongs to
    offsets: np.ndarray  # [features, max_length, 2] character span of each token in the context
    context: np.ndarray  # [features, max_length] bool, the token is part of the context

    def rows(self, start: int, stop: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        return {k: v[start:stop] for k, v in self.inputs.items()}, self.positions[start:stop]


def qa_features(tokenizer: Any, questions: Sequence[Question], max_length: int, stride: int | None = None,
                ) -> QAFeatures:
    """Question + context features with a doc stride: contexts longer than the window are cut into overlapping
    windows, `stride` tokens shared between neighbours (default a quarter of the window)."""
    stride = max_length // 4 if stride is None else stride
    try:
        encoded = tokenizer([q.question for q in questions], [q.context for q in questions],
                            truncation="only_second", max_length=max_length, stride=stride,
                            return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length")
    except Exception as err:  # tokenizers raises its own exception type when a question fills the whole window
        raise ValueError(f"cannot fit the questions into {max_length} tokens ({str(err)[:160]}); "
                         "raise --max-length") from None
    count = len(encoded["input_ids"])
    question_of = np.asarray(encoded["overflow_to_sample_mapping"], dtype=np.int64)
    offsets = np.zeros((count, max_length, 2), dtype=np.int64)
    context = np.zeros((count, max_length), dtype=bool)
    positions = np.zeros((count, 2), dtype=np.int64)
    for row in range(count):
        ids = encoded.sequence_ids(row)
        offsets[row] = np.asarray(encoded["offset_mapping"][row], dtype=np.int64)
        context[row] = [s == 1 for s in ids]
        answer = questions[int(question_of[row])].answers[0]
        first_char, last_char = answer.start, answer.start + len(answer.text)
        tokens = np.flatnonzero(context[row])
        if offsets[row, tokens[0], 0] <= first_char and offsets[row, tokens[-1], 1] >= last_char:
            start = tokens[offsets[row, tokens, 1] > first_char][0]
            end = tokens[offsets[row, tokens, 0] < last_char][-1]
            positions[row] = (start, end)
    return QAFeatures(_arrays(encoded, count, max_length), positions, question_of, offsets, context)


@dataclass(frozen=True)
class Span:
    text: str
    start: int  # characters into the context
    end: int
    score: float


def decode_answers(combined: np.ndarray, features: QAFeatures, questions: Sequence[Question]) -> list[Span]:
    """Each question's best answer over its features, from [features, tokens, 2] start/end logits."""
    best: dict[int, Span] = {}
    for row in range(len(combined)):
        q = int(features.question_of[row])
        first, last, score = best_span(combined[row, :, 0], combined[row, :, 1], features.context[row])
        if q not in best or score > best[q].score:
            start, end = int(features.offsets[row, first, 0]), int(features.offsets[row, last, 1])
            best[q] = Span(questions[q].context[start:end], start, end, score)
    return [best.get(i, Span("", 0, 0, float("-inf"))) for i in range(len(questions))]
