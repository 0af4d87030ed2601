"""Fine-tuning and evaluation loops for sequence classification, with progress bars and resumable state.

The same loops run in one process (CPU or GPU) or in many under a launcher (see `distributed`): each step takes one
global batch, every rank trains on its slice, and the gradients averaged over ranks are the global batch's.
"""

from __future__ import annotations

import inspect
import itertools
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from qbert_deploy.models import distributed

Batch = tuple[dict[str, np.ndarray], np.ndarray]
# Called with the full training state (model, optimizer, schedule, step, losses) every `save_every` steps.
SaveHook = Callable[[dict[str, Any]], None]
# The training loss of one batch: (model, inputs without labels, labels) -> scalar. Default: the model's own loss.
LossFn = Callable[[nn.Module, dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


def to_torch(inputs: dict[str, np.ndarray], device: torch.device | None = None) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_loss(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """The task loss the model computes itself from its labels (cross-entropy for classification)."""
    return model(**inputs, **label_arguments(model, labels)).loss


def label_arguments(model: nn.Module, labels: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
    """The loss arguments of a batch's labels: a QA head takes start/end positions ([batch, 2]), others labels."""
    target = torch.as_tensor(labels)
    head = getattr(model, "module", model)  # under DDP, the wrapped model's signature
    if "start_positions" in inspect.signature(head.forward).parameters:
        return {"start_positions": target[:, 0], "end_positions": target[:, 1]}
    return {"labels": target}


def rng_state() -> dict[str, Any]:
    """Every random generator a training step may draw from (dropout, Quant-Noise), in types `torch.load` reads
    with weights_only: resuming with them makes the steps after a kill the steps an uninterrupted run takes."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "position": position,
                      "has_gauss": has_gauss, "gauss": gauss},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["gauss"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))


def _cycle(make_batches: Callable[[int], Iterable[Batch]]) -> Iterator[Batch]:
    epoch = 0
    while True:
        yield from make_batches(epoch)
        epoch += 1


def train(model: nn.Module, make_batches: Callable[[int], Iterable[Batch]], steps: int, lr: float = 5e-5,
          desc: str = "fine-tune", warmup: float = 0.1, resume: dict[str, Any] | None = None,
          save: SaveHook | None = None, save_every: int = 50, loss_fn: LossFn | None = None) -> list[float]:
    """AdamW with linear warm-up and decay for `steps` steps; `make_batches(epoch)` yields shuffled batches.

    `resume` is a state that `save` was given earlier: training goes on from its step with the same data order,
    optimizer, schedule and random generators, so it ends bit for bit where an uninterrupted run ends.
    `loss_fn` computes each batch's loss (e.g. distillation); by default the model's own loss on the labels.
    It gets the model itself (no wrapper), so hooks and attributes work as in one process. Only rank 0 calls `save`.
    """
    loss_fn = loss_fn or model_loss
    device = distributed.device()
    model.to(device).train()
    distributed.broadcast_weights(model)  # every rank starts from rank 0's weights
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
        restore_rng(resume["rng"])
    data = _cycle(make_batches)
    for _ in itertools.islice(data, start):  # same batches as an uninterrupted run
        pass
    with tqdm(total=steps, initial=start, desc=desc, unit="step", dynamic_ncols=True,
              disable=not distributed.is_main()) as bar:
        for step in range(start, steps):
            inputs, labels = next(data)
            rows, weight = distributed.local_rows(len(labels))
            loss = loss_fn(model, to_torch({k: v[rows] for k, v in inputs.items()}, device),
                           torch.from_numpy(labels[rows]).to(device))
            optimizer.zero_grad(set_to_none=True)
            (loss * weight).backward()
            distributed.average_gradients(model)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            # The global batch's mean loss: the ranks' weighted losses sum to world size times it.
            logged = (loss.detach() * weight / distributed.world_size()).reshape(1)
            distributed.all_reduce_sum([logged])
            losses.append(float(logged))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            bar.update()
            if save is not None and distributed.is_main() and (step + 1) % save_every == 0 and step + 1 < steps:
                save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "schedule": schedule.state_dict(), "step": step + 1, "losses": losses, "rng": rng_state()})
    model.eval()
    return losses


@torch.no_grad()
def predict_logits(model: nn.Module, batches: Iterable[Batch], desc: str = "evaluate") -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels over all batches; when distributed, each rank runs every world-size-th batch and all
    ranks get all of them, in order."""
    model.eval()
    device = model_device(model)
    every = list(batches)
    mine = list(range(distributed.rank(), len(every), distributed.world_size()))
    results = {}
    for index in tqdm(mine, desc=desc, unit="batch", leave=False, dynamic_ncols=True,
                      disable=not distributed.is_main()):
        inputs, y = every[index]
        out = model(**to_torch(inputs, device))
        logits = (out.logits.float() if "logits" in out else
                  torch.stack([out.start_logits.float(), out.end_logits.float()], dim=-1))
        results[index] = (logits.cpu().numpy(), y)
    for part in distributed.all_gather(results):
        results.update(part)
    return (np.concatenate([results[i][0] for i in range(len(every))]),
            np.concatenate([results[i][1] for i in range(len(every))]))


def accuracy(model: nn.Module, batches: Iterable[Batch], desc: str = "evaluate") -> float:
    logits, labels = predict_logits(model, batches, desc)
    return float((logits.argmax(-1) == labels).mean())
