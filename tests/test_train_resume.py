"""train() resumed from a saved state ends where an uninterrupted run ends, bit for bit."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import BertForSequenceClassification

from qbert_deploy.data.tsv import Example
from qbert_deploy.models.task import Task
from qbert_deploy.models.train import train
from tests.tiny import LABELS, SENTENCES, tiny_config, tokenizer


def _model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_config())  # dropout 0: training is deterministic


def test_resume_matches_an_uninterrupted_run() -> None:
    task = Task(tokenizer(), [Example(s, i % 2) for i, s in enumerate(SENTENCES * 2)], [], LABELS, batch_size=4)
    full = _model()
    train(full, task.train_batches, steps=6, lr=1e-3)
    states: list[dict[str, Any]] = []
    partial = _model()
    train(partial, task.train_batches, steps=6, lr=1e-3, save=lambda s: states.append(
        {k: (v if not isinstance(v, dict) else __import__("copy").deepcopy(v)) for k, v in s.items()}), save_every=2)
    assert [s["step"] for s in states] == [2, 4], [s["step"] for s in states]
    resumed = _model()
    train(resumed, task.train_batches, steps=6, lr=1e-3, resume=states[0])
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name}: resume is bit-exact"


def test_loss_fn_hook_replaces_the_model_loss() -> None:
    task = Task(tokenizer(), [Example(s, i % 2) for i, s in enumerate(SENTENCES * 2)], [], LABELS, batch_size=4)
    default = _model()
    default_losses = train(default, task.train_batches, steps=3, lr=1e-3)
    seen: list[tuple[set[str], int]] = []

    def doubled(model: torch.nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        seen.append((set(inputs), len(labels)))
        return 2 * model(**inputs, labels=labels).loss

    hooked = _model()
    hooked_losses = train(hooked, task.train_batches, steps=3, lr=1e-3, loss_fn=doubled)
    assert len(seen) == 3 and all("labels" not in keys and n == 4 for keys, n in seen), seen
    assert hooked_losses[0] == pytest.approx(2 * default_losses[0], rel=1e-5), "the hook's loss is the one trained"
