"""train() resumed from a saved state ends where an uninterrupted run ends."""

from __future__ import annotations

from typing import Any

import numpy as np
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
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
