"""Fine-tuning and evaluation loops for sequence classification, with progress bars and resumable state."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

Batch = tuple[dict[str, np.ndarray], np.ndarray]
# Called with the full training state (model, optimizer, schedule, step, losses) every `save_every` steps.
SaveHook = Callable[[dict[str, Any]], None]


def to_torch(inputs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in inputs.items()}


def label_arguments(model: nn.Module, labels: np.ndarray) -> dict[str, torch.Tensor]:
    """The loss arguments of a batch's labels: a QA head takes start/end positions ([batch, 2]), others labels."""
    if "start_positions" in inspect.signature(model.forward).parameters:
        return {"start_positions": torch.from_numpy(labels[:, 0]), "end_positions": torch.from_numpy(labels[:, 1])}
    return {"labels": torch.from_numpy(labels)}


def _cycle(make_batches: Callable[[int], Iterable[Batch]]) -> Iterator[Batch]:
    epoch = 0
    while True:
        yield from make_batches(epoch)
        epoch += 1


def train(model: nn.Module, make_batches: Callable[[int], Iterable[Batch]], steps: int, lr: float = 5e-5,
          desc: str = "fine-tune", warmup: float = 0.1, resume: dict[str, Any] | None = None,
          save: SaveHook | None = None, save_every: int = 50) -> list[float]:
    """AdamW with linear warm-up and decay for `steps` steps; `make_batches(epoch)` yields shuffled batches.

    `resume` is a state that `save` was given earlier: training goes on from its step with the same data order.
    """
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    warm = max(1, int(steps * warmup))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    losses: list[float] = []
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        start, losses = int(resume["step"]), list(resume["losses"])
    data = _cycle(make_batches)
    for _ in itertools.islice(data, start):  # same batches as an uninterrupted run
        pass
    with tqdm(total=steps, initial=start, desc=desc, unit="step", dynamic_ncols=True) as bar:
        for step in range(start, steps):
            inputs, labels = next(data)
            out = model(**to_torch(inputs), **label_arguments(model, labels))
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(float(out.loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            bar.update()
            if save is not None and (step + 1) % save_every == 0 and step + 1 < steps:
                save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "schedule": schedule.state_dict(), "step": step + 1, "losses": losses})
    model.eval()
    return losses


@torch.no_grad()
def predict_logits(model: nn.Module, batches: Iterable[Batch], desc: str = "evaluate") -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels over all batches."""
    model.eval()
    logits, labels = [], []
    for inputs, y in tqdm(list(batches), desc=desc, unit="batch", leave=False, dynamic_ncols=True):
        out = model(**to_torch(inputs))
        logits.append(out.logits.float().numpy() if "logits" in out else
                      np.stack([out.start_logits.float().numpy(), out.end_logits.float().numpy()], axis=-1))
        labels.append(y)
    return np.concatenate(logits), np.concatenate(labels)


def accuracy(model: nn.Module, batches: Iterable[Batch], desc: str = "evaluate") -> float:
    logits, labels = predict_logits(model, batches, desc)
    return float((logits.argmax(-1) == labels).mean())
