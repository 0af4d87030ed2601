"""A classification task on disk and its base model: tokenizer, splits, batching, and the cached fp32 fine-tune."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qbert_deploy.atomic import atomic_dir
from qbert_deploy.checkpoint import FP32_MODEL_FILES, Fp32Reference, fp32_digest
from qbert_deploy.data.batches import batches
from qbert_deploy.data.tsv import Example
from qbert_deploy.families import TEXT_INPUTS, family
from qbert_deploy.models import distributed
from qbert_deploy.models.cache_keys import differences, examples_digest
from qbert_deploy.models.hf_compat import ATTENTION
from qbert_deploy.models.train import Batch, predict_logits, train
from qbert_deploy.tasks import FEATURE, SEQUENCE, task_kind

log = logging.getLogger("qbert_deploy.quantize")
FP32_STAMP = "qbert_fp32.json"
# What transformers reads of a base model folder: the model files and the tokenizer's (not README.md and the like)
BASE_MODEL_FILES = re.compile(FP32_MODEL_FILES.pattern + r"|tokenizer.*|vocab.*|merges\.txt|special_tokens_map\.json"
                              r"|added_tokens\.json|.+\.model")


def _length(example: Example) -> int:
    return len(example.text) + len(example.text_pair or "")


@dataclass
class Task:
    """Labelled train/dev examples, the tokenizer, and the batch shape used everywhere in the workflow."""

    tokenizer: Any
    train: list[Any]  # Example here; TaggedSentence or Question in models/task_kinds.py
    dev: list[Any]
    labels: list[str]
    batch_size: int = 32
    max_length: int = 64
    inputs: tuple[str, ...] = TEXT_INPUTS  # the model's inputs: its family's (no token_type_ids for DistilBERT)
    # Variants of the training examples (--augment) that only training batches carry: the distillation's extra text.
    # Their labels are their originals', which the Distiller never reads (its loss is the teacher's outputs).
    distill_only: list[Any] = field(default_factory=list)
    kind = SEQUENCE  # which head and metric (qbert_deploy.tasks)
    agreement_name = "agreement with fp32"  # what `agreement` measures, as the quantize log names it

    @property
    def metric(self) -> str:
        return task_kind(self.kind).main_metric

    @property
    def text_pairs(self) -> bool | None:
        """Sequence classification: whether the examples are sentence pairs (None for the other tasks)."""
        return any(e.text_pair is not None for e in self.train) if self.kind == SEQUENCE else None

    def evaluate(self, model: nn.Module, desc: str = "evaluate") -> float:
        """The task's main metric on the dev data, as a fraction."""
        return self.score(*predict_logits(model, self.dev_batches(), desc))

    def score(self, logits: np.ndarray, labels: np.ndarray) -> float:
        """The main metric of dev logits (`predict_logits` over `dev_batches`): accuracy here."""
        return float((logits.argmax(-1) == labels).mean())

    def agreement(self, logits: np.ndarray, reference: np.ndarray) -> float:
        """The fraction of dev predictions (argmax over the classes) that two models share."""
        return float((logits.argmax(-1) == reference.argmax(-1)).mean())

    def cache_key(self) -> dict[str, Any]:
        """What of the task changes a model trained on it: the training data's content, labels, batching."""
        key = {"task": self.kind, "training data": examples_digest(self.train), "labels": list(self.labels),
               "batch size": self.batch_size, "max length": self.max_length, "inputs": list(self.inputs)}
        return key | ({"distillation-only data": examples_digest(self.distill_only)} if self.distill_only else {})

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        """Shuffled batches of similar lengths: each pool of 16 batches is sorted by length, so batches carry
        little padding (a third less compute on short sentences) while their order stays random."""
        examples = self.train + self.distill_only
        rng = np.random.default_rng(epoch)
        order = rng.permutation(len(examples))
        pool = self.batch_size * 16
        chunks: list[list[Example]] = []
        for start in range(0, len(order), pool):
            ordered = sorted((examples[i] for i in order[start:start + pool]), key=_length)
            chunks += [ordered[i:i + self.batch_size] for i in range(0, len(ordered), self.batch_size)]
        for index in rng.permutation(len(chunks)):
            yield from batches(self.tokenizer, chunks[index], self.batch_size, self.max_length, inputs=self.inputs)

    def steps_per_epoch(self) -> int:
        """Batches in one pass of `train_batches` (each pool of 16 batches may end in a short one)."""
        pool = self.batch_size * 16
        full, rest = divmod(len(self.train) + len(self.distill_only), pool)
        return full * 16 + -(-rest // self.batch_size)

    def dev_batches(self) -> list[Batch]:
        # Sorted by length so that batches carry little padding: evaluation is most of a PTQ run's time.
        ordered = sorted(self.dev, key=_length)
        return list(batches(self.tokenizer, ordered, 64, self.max_length, inputs=self.inputs))

    def input_batches(self, count: int, seed: int, size: int | None = None) -> list[dict[str, torch.Tensor]]:
        """`count` random training batches with labels, as torch tensors (calibration, Hessian subsets)."""
        out = []
        for inputs, labels in batches(self.tokenizer, self.train, size or self.batch_size, self.max_length,
                                      shuffle_seed=10_000 + seed, inputs=self.inputs):
            out.append({**{k: torch.from_numpy(v) for k, v in inputs.items()}, "labels": torch.from_numpy(labels)})
            if len(out) == count:
                break
        return out


def with_augmented_text(task: Task, copies: int, probability: float, seed: int) -> Task:
    """`task` whose training batches also carry `copies` word-replacement/deletion variants of every training example
    (data/augment.py), drawn from the training texts alone; calibration, dev and the cache key stay the task's."""
    from qbert_deploy.data.augment import augment

    if task.kind != SEQUENCE or type(task) is not Task:
        raise ValueError("--augment applies to sequence classification")
    texts = augment([e.text for e in task.train], copies, probability, seed)
    pairs: list[list[str | None]] = [list(p) for p in augment([e.text_pair or "" for e in task.train], copies,
                                                              probability, seed + 1)] \
        if task.text_pairs else [[None] * copies for _ in task.train]
    variants = [Example(text, e.label, pair) for e, ts, ps in zip(task.train, texts, pairs, strict=True)
                for text, pair in zip(ts, ps, strict=True)]
    return replace(task, distill_only=variants)


def _auto_class(task: str) -> Any:
    import transformers

    return getattr(transformers, task_kind(task).auto_class)


def load_base(model_dir: str | Path, labels: list[str], task: str = SEQUENCE) -> nn.Module:
    """A Hugging Face encoder directory (any family in `qbert_deploy.families`) with the task's head (eager
    attention: export-friendly)."""
    from transformers import AutoConfig

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: not a Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(path)
    try:
        family(config.model_type)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    model = _auto_class(task).from_pretrained(
        path, num_labels=len(labels), attn_implementation=ATTENTION,
        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    assert isinstance(model, nn.Module)
    return model


def load_teacher(path: Path, task: Task) -> nn.Module:
    """A fine-tuned classifier to distil from; its labels must be the task's (checked before, again here)."""
    model = _auto_class(task.kind).from_pretrained(path, attn_implementation=ATTENTION)
    if model.config.num_labels != len(task.labels):
        raise ValueError(f"{path}: the teacher predicts {model.config.num_labels} labels, the task has "
                         f"{len(task.labels)}")
    return model.eval()


def base_fingerprint(model_dir: str | Path) -> str:
    """What identifies the base model in the fp32 cache: the content of its model and tokenizer files, not where it
    lives, so the same package installed in another virtual environment reuses the fine-tune."""
    return fp32_digest(model_dir, BASE_MODEL_FILES) if Path(model_dir).is_dir() else ""


def fp32_reference(folder: Path, model_pt: Path, sha256: str | None = None) -> Fp32Reference | None:
    """What model.pt records of the fp32 folder `fp32_model` kept (None if it holds no model); `sha256` its
    fp32_digest, when already computed."""
    return Fp32Reference.of(folder, model_pt, sha256) if (folder / "config.json").is_file() else None


def fp32_model(model_dir: str | Path, task: Task, steps: int, lr: float, cache: Path | None,
               seed: int = 0) -> tuple[nn.Module, float]:
    """The fine-tuned fp32 baseline and its dev metric, reused from `cache` when it was made the same way."""
    if task.kind == FEATURE:  # an embedding model is its own fp32 baseline: nothing to fine-tune
        from qbert_deploy.models.embedding import EmbeddingTask, embedding_fp32

        assert isinstance(task, EmbeddingTask)
        return embedding_fp32(model_dir, task, cache)
    key = {"base model": base_fingerprint(model_dir), "steps": steps, "lr": lr, "seed": seed,
           "dev data": examples_digest(task.dev)} | task.cache_key()  # the stamp records the dev figure too
    stamp = cache / FP32_STAMP if cache else None
    saved: dict[str, Any] | None = None
    if distributed.is_main() and cache is not None and stamp is not None and stamp.is_file():
        saved = json.loads(stamp.read_text())
        if saved.get("key") != key:
            log.info("fp32: %s was made differently (%s); fine-tuning again", cache, differences(saved.get("key"), key))
            saved = None
    saved = distributed.broadcast(saved)  # rank 0 reads the cache; other machines need not see the folder
    if saved is not None:
        assert cache is not None
        log.info("fp32: reusing the fine-tuned baseline in %s (dev %s %.4f): same base model, data and settings",
                 cache, task.metric, saved["accuracy"])
        if distributed.is_main():
            model = _auto_class(task.kind).from_pretrained(cache, attn_implementation=ATTENTION)
        else:
            with torch.random.fork_rng(devices=[]):  # the head's random init must not move this rank's RNG
                model = load_base(model_dir, task.labels, task.kind)
        distributed.broadcast_weights(model)
        return model.eval(), float(saved["accuracy"])
    torch.manual_seed(seed)
    model = load_base(model_dir, task.labels, task.kind)
    if steps > 0:
        train(model, task.train_batches, steps, lr=lr, desc="fine-tune fp32")
    acc = distributed.broadcast(task.evaluate(model, "dev fp32"))
    log.info("fp32: %d steps, dev %s %.4f", steps, task.metric, acc)
    if cache is not None and distributed.is_main():
        with atomic_dir(cache) as tmp:
            model.save_pretrained(tmp)  # type: ignore[operator]
            task.tokenizer.save_pretrained(tmp)
            (tmp / FP32_STAMP).write_text(json.dumps({"key": key, "accuracy": acc}, indent=1))
    return model.eval(), acc
