"""Feature extraction, the torch half of its adapter: encoder + the directory's pooling and normalisation as one
module, and the label-free task that trains and measures it against the fp32 model's own embeddings.

Label-free Q-BERT: a batch's "labels" are the fp32 model's sentence embeddings of its texts, and the model's loss
is the squared distance of its sentence embedding to them (sum over the dimension, mean over the batch: 2 - 2 cos
for unit vectors). At the fp32 point that loss's Hessian is a Gauss-Newton curvature of the embedding, which is
what the Hessian sensitivity ranks layers by. QAT minimises that loss plus, by default, the MSE of every hidden
state to fp32's (models/distill.py with its `own` weight; qbert-quantize's _embedding_distill_weights).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PretrainedConfig
from transformers.utils import ModelOutput

from qbert_deploy.atomic import atomic_dir
from qbert_deploy.models.hf_compat import ATTENTION
from qbert_deploy.models.task import Task
from qbert_deploy.models.train import Batch, model_device
from qbert_deploy.tasks import FEATURE
from qbert_deploy.tasks.embeddings import NORMALIZE_KEY, POOLING_KEY, Pooling, cosines, neighbour_overlap

log = logging.getLogger("qbert_deploy.quantize")


def pool(tokens: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """sentence-transformers' pooling of token vectors [batch, tokens, dim] under an attention mask."""
    if mode == "cls":
        return tokens[:, 0]
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    if mode == "mean":
        return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
    if mode == "max":
        return tokens.masked_fill(weights == 0, -1e9).max(1).values
    raise ValueError(f"pooling {mode!r} is not supported")


@dataclass
class EmbeddingOutput(ModelOutput):
    """`logits` is the sentence embedding too, so code that reads a head's logits reads the embedding."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    sentence_embedding: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class EmbeddingModel(nn.Module):
    """A bare encoder (BertModel...) under its family's prefix (bert., distilbert., roberta.), so module names and
    recipes are those of the task models, plus pooling and optional L2 normalisation."""

    def __init__(self, encoder: nn.Module, pooling: Pooling) -> None:
        super().__init__()
        self.prefix = str(getattr(encoder, "base_model_prefix", "") or "encoder")
        setattr(self, self.prefix, encoder)
        self.pooling = pooling
        self.config: PretrainedConfig = encoder.config  # type: ignore[assignment]
        setattr(self.config, POOLING_KEY, pooling.mode)
        setattr(self.config, NORMALIZE_KEY, pooling.normalize)

    @property
    def encoder(self) -> nn.Module:
        module = getattr(self, self.prefix)
        assert isinstance(module, nn.Module)
        return module

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> EmbeddingModel:
        """The model a checkpoint's config describes (its pooling keys included)."""
        pooling = Pooling(str(getattr(config, POOLING_KEY, "mean")), bool(getattr(config, NORMALIZE_KEY, False)))
        return cls(AutoModel.from_config(config, attn_implementation=ATTENTION), pooling)

    @classmethod
    def from_pretrained(cls, folder: str | Path, pooling: Pooling) -> EmbeddingModel:
        return cls(AutoModel.from_pretrained(folder, attn_implementation=ATTENTION), pooling)

    pools_tokens = True  # the exporter passes the 2-D mask as `pooling_mask` (the encoder may get a 4-D one)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                pooling_mask: torch.Tensor | None = None, **kwargs: Any) -> EmbeddingOutput:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        tokens = out.last_hidden_state
        embedding = pool(tokens, attention_mask if pooling_mask is None else pooling_mask, self.pooling.mode)
        if self.pooling.normalize:
            embedding = F.normalize(embedding, p=2, dim=1)
        loss = None
        if labels is not None:
            loss = ((embedding - labels.to(embedding.dtype)) ** 2).sum(-1).mean()
        return EmbeddingOutput(loss=loss, logits=embedding, last_hidden_state=tokens, sentence_embedding=embedding,
                               hidden_states=getattr(out, "hidden_states", None),
                               attentions=getattr(out, "attentions", None))


def _digest(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


@dataclass
class EmbeddingTask(Task):
    """Unlabelled texts (`train`/`dev` hold str, `labels` is empty); the targets are `reference`'s embeddings."""

    kind = FEATURE
    pooling: Pooling = field(default_factory=lambda: Pooling("mean", False))
    reference: nn.Module | None = field(default=None, repr=False)

    def cache_key(self) -> dict[str, Any]:
        return {"task": self.kind, "training data": _digest(self.train), "pooling": self.pooling.mode,
                "normalize": self.pooling.normalize, "batch size": self.batch_size, "max length": self.max_length,
                "inputs": list(self.inputs)}

    def _encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="np")
        return {k: np.asarray(v, dtype=np.int64) for k, v in encoded.items() if k in self.inputs}

    @torch.no_grad()
    def _targets(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if self.reference is None:
            raise RuntimeError("the embedding task has no fp32 reference model yet")
        self.reference.eval()
        device = model_device(self.reference)
        out = self.reference(**{k: torch.from_numpy(v).to(device) for k, v in inputs.items()})
        return np.asarray(out.sentence_embedding.float().cpu().numpy())

    def _batch(self, texts: list[str]) -> Batch:
        inputs = self._encode(texts)
        return inputs, self._targets(inputs)

    def _chunks(self, texts: list[str], size: int, seed: int) -> list[list[str]]:
        order = np.random.default_rng(seed).permutation(len(texts))
        return [[texts[i] for i in order[start:start + size]] for start in range(0, len(order), size)]

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        for chunk in self._chunks(self.train, self.batch_size, epoch):
            yield self._batch(chunk)

    def steps_per_epoch(self) -> int:
        return -(-len(self.train) // self.batch_size)

    def dev_batches(self) -> list[Batch]:
        # in file order (not by length): validation and the neighbour measure index the dev texts as given
        return [self._batch(self.dev[i:i + 64]) for i in range(0, len(self.dev), 64)]

    def input_batches(self, count: int, seed: int, size: int | None = None) -> list[dict[str, torch.Tensor]]:
        out = []
        for chunk in self._chunks(self.train, size or self.batch_size, 10_000 + seed)[:count]:
            inputs, targets = self._batch(chunk)
            out.append({k: torch.from_numpy(v) for k, v in inputs.items()} | {"labels": torch.from_numpy(targets)})
        return out

    def score(self, logits: np.ndarray, labels: np.ndarray) -> float:
        """Mean cosine of the dev embeddings to the fp32 model's (the targets)."""
        return float(cosines(logits, labels).mean())

    agreement_name = "10-NN overlap with fp32"

    def agreement(self, logits: np.ndarray, reference: np.ndarray) -> float:
        """The mean overlap of each dev text's 10 nearest neighbours (within the dev set) under the two models."""
        return neighbour_overlap(logits, reference, 10)


def embedding_fp32(model_dir: str | Path, task: EmbeddingTask, cache: Path | None) -> tuple[nn.Module, float]:
    """The fp32 embedding model (not fine-tuned: there are no labels), bound to the task as its reference, and
    saved to `cache` as a Hugging Face encoder folder with the pooling in its config (qbert-validate's fp32)."""
    from qbert_deploy.models import distributed

    model = EmbeddingModel.from_pretrained(model_dir, task.pooling).eval()
    task.reference = model
    log.info("fp32: the encoder of %s with %s pooling%s, not fine-tuned (embeddings have no labels); the Hessian "
             "loss is the squared distance to the fp32 sentence embedding (QAT's: above)", model_dir, task.pooling.mode,
             " and L2 normalisation" if task.pooling.normalize else "")
    if cache is not None and distributed.is_main() and not (cache / "config.json").is_file():
        with atomic_dir(cache) as tmp:
            model.encoder.save_pretrained(tmp)  # type: ignore[operator]
            task.tokenizer.save_pretrained(tmp)
            (tmp / "qbert_fp32.json").write_text(json.dumps({"key": task.cache_key(), "accuracy": 1.0}, indent=1))
    return model, 1.0
