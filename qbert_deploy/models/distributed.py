"""One training engine from one CPU to many GPUs: the process group, this process's device, its share of a batch.

A launcher (`torchrun`, `accelerate launch`) describes the run in the environment (WORLD_SIZE, RANK, LOCAL_RANK,
MASTER_ADDR/PORT); without one the run is a single process and nothing here talks to anyone. Processes on GPUs talk
over NCCL, on CPUs over gloo. The global batch defines the run: each rank takes its slice of every global batch, so
N processes see exactly the batches one process sees, and gradients averaged by DDP are the global batch's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def launched_world_size() -> int:
    """The number of processes the launcher started (1 without a launcher); readable before any set-up."""
    text = os.environ.get("WORLD_SIZE", "1")
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"WORLD_SIZE={text!r} is not a positive process count")
    return int(text)


def check_global_batch(name: str, global_batch: int, world: int) -> None:
    """The global batch must split evenly over the processes, so every process takes the same share."""
    if global_batch % world:
        raise ValueError(f"world size {world} does not divide the global batch ({name} {global_batch}); "
                         f"use a multiple of {world}")


def device() -> torch.device:
    """This process's device: its local GPU when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def setup() -> None:
    """Join the launcher's process group (a no-op for a single process or when already joined)."""
    if launched_world_size() == 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes files and logs."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over all ranks, in place (every rank gets the same result)."""
    if dist.is_initialized():
        for tensor in tensors:
            dist.all_reduce(tensor)


def broadcast(value: T) -> T:
    """Rank 0's value (any picklable object) on every rank."""
    if not dist.is_initialized():
        return value
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_weights(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers into every rank's copy of the same architecture (on this rank's device)."""
    model.to(device())
    if dist.is_initialized():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)


def all_gather(value: T) -> list[T]:
    """Every rank's value (any picklable object), in rank order."""
    if not dist.is_initialized():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def all_reduce_range(lo: torch.Tensor, hi: torch.Tensor) -> None:
    """The global min of `lo` and max of `hi` over all ranks, in place (activation ranges of a global batch)."""
    if dist.is_initialized():
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)


def shard_bounds(size: int) -> tuple[int, int]:
    """[start, stop) of this rank's rows of a batch of `size` rows (contiguous; the first ranks get a row more
    when `size` does not divide evenly, e.g. the last batch of an epoch)."""
    world, me = world_size(), rank()
    base, extra = divmod(size, world)
    start = me * base + min(me, extra)
    return start, start + base + (me < extra)


def local_rows(size: int) -> tuple[slice, float]:
    """This rank's rows of a global batch of `size` rows, and the weight that makes the ranks' losses, averaged
    by DDP, the global batch's mean loss. A rank left without rows (a short last batch) repeats the batch's last
    row with weight 0: it must still run the step, and a repeated row leaves the activation ranges unchanged."""
    start, stop = shard_bounds(size)
    if start == stop:
        return slice(size - 1, size), 0.0
    return slice(start, stop), (stop - start) * world_size() / size
