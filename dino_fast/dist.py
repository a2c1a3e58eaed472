"""The few torch.distributed facts the trainer and the checkpointer need; each also works without a process group."""

from __future__ import annotations

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def barrier() -> None:
    if initialized():
        dist.barrier()


def any_rank(*flags: bool) -> list[bool]:
    """Each flag, True on every rank when it is True on any (one small all-reduce; no communication on one rank).

    The ranks must call it at the same points: it is how they agree to stop together (a signal that reached one
    rank, a loader that failed on one) instead of one rank leaving a collective the others then wait in forever.
    """
    if world_size() == 1:
        return [bool(f) for f in flags]
    device = "cpu"
    if dist.get_backend() == "nccl":
        from deepspeed.accelerator import get_accelerator

        device = get_accelerator().current_device_name()
    t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]
