"""More text for the teacher to label: TinyBERT-style word replacement and deletion, without a masked LM.

Each variant of a training sentence visits its words in turn; with probability `probability` a word is changed:
deleted one time in four (DELETE_SHARE), otherwise replaced by a word drawn uniformly from the distinct words of
the training texts given. Words are whitespace-separated tokens, so punctuation glued to a word goes with it. A
variant that came out unchanged gets one word replaced, so that every variant is new text for the teacher.

The vocabulary is built from the texts passed in and from nothing else: callers pass the training split only, never
dev or test, and nothing here reads a file. Deterministic for a given seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_PROBABILITY = 0.3  # of each word being changed
DELETE_SHARE = 0.25  # of the changed words, the share deleted (the rest are replaced)


def vocabulary(train_texts: Sequence[str]) -> list[str]:
    """The distinct words of the training texts, sorted (so that draws do not depend on set order)."""
    return sorted({word for text in train_texts for word in text.split()})


def _variant(words: list[str], vocab: list[str], probability: float, rng: np.random.Generator) -> list[str]:
    out: list[str] = []
    for word in words:
        if rng.random() >= probability:
            out.append(word)
        elif rng.random() < DELETE_SHARE:
            continue
        else:
            out.append(vocab[int(rng.integers(len(vocab)))])
    if not out:  # everything deleted: keep one word, replaced
        out = [vocab[int(rng.integers(len(vocab)))]]
    if out == words and len(vocab) > 1:  # a one-word vocabulary cannot change anything
        where = int(rng.integers(len(out)))
        choices = [w for w in vocab if w != out[where]]
        out[where] = choices[int(rng.integers(len(choices)))]
    return out


def augment(train_texts: Sequence[str], copies: int, probability: float = DEFAULT_PROBABILITY,
            seed: int = 0) -> list[list[str]]:
    """`copies` variants of each training text (one list per text, in order), drawing on their own vocabulary."""
    if copies < 0:
        raise ValueError(f"--augment must be at least 0, got {copies}")
    if not 0 < probability <= 1:
        raise ValueError(f"the word-change probability must be in (0, 1], got {probability:g}")
    vocab = vocabulary(train_texts)
    rng = np.random.default_rng(seed)
    return [[" ".join(_variant(text.split(), vocab, probability, rng)) for _ in range(copies)]
            if vocab else [] for text in train_texts]
