"""Tokenize labelled examples into padded batches of numpy arrays (per-batch padding)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from qbert_deploy.data.tsv import Example
from qbert_deploy.families import TEXT_INPUTS


def encode(tokenizer: Any, examples: Sequence[Example], max_length: int = 128,
           inputs: Sequence[str] = TEXT_INPUTS) -> dict[str, np.ndarray]:
    """The model's `inputs` (its family's) for a batch; token types are zeros when the tokenizer has none."""
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples]
    encoded = tokenizer(texts, pairs if any(p is not None for p in pairs) else None, padding=True,
                        truncation=True, max_length=max_length, return_tensors="np")
    batch = {k: np.asarray(encoded[k], dtype=np.int64) for k in ("input_ids", "attention_mask")}
    if "token_type_ids" in inputs:
        batch["token_type_ids"] = np.asarray(encoded.get("token_type_ids", np.zeros_like(batch["input_ids"])),
                                             dtype=np.int64)
    return batch


def batches(tokenizer: Any, examples: Sequence[Example], batch_size: int = 32, max_length: int = 128,
            shuffle_seed: int | None = None,
            inputs: Sequence[str] = TEXT_INPUTS) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """(inputs, labels) batches; shuffled when a seed is given."""
    order = np.arange(len(examples))
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start:start + batch_size]]
        yield encode(tokenizer, chunk, max_length, inputs), np.array([e.label for e in chunk], dtype=np.int64)
