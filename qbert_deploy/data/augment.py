"""More text for the teacher to label: TinyBERT-style word replacement and deletion, without a masked LM.

Each variant of a training sentence visits its words (whitespace-separated tokens) in turn; with probability
`probability` a word is changed: deleted one time in four (DELETE_SHARE), otherwise its letters are replaced by a
word drawn uniformly from the vocabulary, the distinct lower-cased letter words of the training texts given, and
the punctuation around it stays ("film," becomes "plot,"). Tokens with digits or inner punctuation ("21st", "it's")
are kept as they are. A variant that came out unchanged gets one word replaced, so that every variant of a
sentence with a word in it is new text for the teacher.

The vocabulary is built from the texts passed in and from nothing else: callers pass the training split only, never
dev or test, and nothing here reads a file. Deterministic for a given seed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

DEFAULT_PROBABILITY = 0.3  # of each word being changed
DELETE_SHARE = 0.25  # of the changed words, the share deleted (the rest are replaced)
WORD = re.compile(r"^([^\w]*)([^\W\d_]+)([^\w]*)$")  # punctuation, the letters of a word, punctuation


def vocabulary(train_texts: Sequence[str]) -> list[str]:
    """The distinct words of the training texts (their letters, lower-cased), sorted: draws do not depend on set
    order."""
    return sorted({match[2].lower() for text in train_texts for token in text.split()
                   if (match := WORD.match(token))})


def _replaced(token: str, vocab: list[str], rng: np.random.Generator) -> str:
    """`token` with its letters replaced by another vocabulary word, its surrounding punctuation kept."""
    match = WORD.match(token)
    assert match is not None
    word = vocab[int(rng.integers(len(vocab)))]
    while word == match[2].lower() and len(vocab) > 1:
        word = vocab[int(rng.integers(len(vocab)))]
    return match[1] + word + match[3]


def _variant(tokens: list[str], vocab: list[str], probability: float, rng: np.random.Generator) -> list[str]:
    out: list[str] = []
    for token in tokens:
        if WORD.match(token) is None or rng.random() >= probability:
            out.append(token)
        elif rng.random() >= DELETE_SHARE:
            out.append(_replaced(token, vocab, rng))
    if not out and tokens:  # every word deleted: one word drawn instead
        out = [vocab[int(rng.integers(len(vocab)))]]
    changeable = [i for i, token in enumerate(out) if WORD.match(token)]
    if out == tokens and changeable and len(vocab) > 1:  # a one-word vocabulary cannot change anything
        where = changeable[int(rng.integers(len(changeable)))]
        out[where] = _replaced(out[where], vocab, rng)
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
