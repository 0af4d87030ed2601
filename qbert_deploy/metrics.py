"""Task metrics: entity-level P/R/F1 (seqeval) and token accuracy for tagging; SQuAD v1.1 exact match and F1;
the warning for a classifier that predicts one class only."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no articles (a/an/the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def token_f1(prediction: str, truth: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], truths: Sequence[Sequence[str]]) -> dict[str, float]:
    """Exact match and F1 in percent, each the best over a question's reference answers (as SQuAD scores)."""
    if not predictions:
        return {"exact_match": 0.0, "f1": 0.0}
    em = sum(max(exact_match(p, t) for t in ts) for p, ts in zip(predictions, truths, strict=True))
    f1 = sum(max(token_f1(p, t) for t in ts) for p, ts in zip(predictions, truths, strict=True))
    return {"exact_match": 100.0 * em / len(predictions), "f1": 100.0 * f1 / len(predictions)}


def tagging_scores(predicted: Sequence[Sequence[str]], truth: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity precision, recall and F1 (seqeval, CoNLL's entity matching) and token accuracy, in percent."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    pred, gold = [list(p) for p in predicted], [list(t) for t in truth]
    tokens = sum(len(t) for t in gold)
    correct = sum(a == b for p, t in zip(pred, gold, strict=True) for a, b in zip(p, t, strict=True))
    return {"entity_precision": 100.0 * float(precision_score(gold, pred, zero_division=0)),
            "entity_recall": 100.0 * float(recall_score(gold, pred, zero_division=0)),
            "entity_f1": 100.0 * float(f1_score(gold, pred, zero_division=0)),
            "token_accuracy": 100.0 * correct / max(tokens, 1)}


def single_class_warning(predicted: Iterable[int], labels: Iterable[int], names: Sequence[str], who: str) -> str | None:
    """A warning when `who` predicts the same class for every example (None otherwise): its accuracy is then the
    share of that class, which says nothing about what it learned."""
    counts = Counter(int(p) for p in predicted)
    truth = Counter(int(y) for y in labels)
    total = sum(truth.values())
    if len(counts) != 1 or total < 2:
        return None
    only = next(iter(counts))
    share = 100.0 * truth[only] / total
    kind = "the majority class" if truth[only] == max(truth.values()) else "not even the majority class"
    name = names[only] if 0 <= only < len(names) else str(only)
    return (f"{who} predicts {name!r} for all {total} examples ({kind}, {share:.1f}% of them): its accuracy "
            "is that class's share, not something it learned (train longer, or check the labels)")
