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


_control_group = None


def control_group():
    """The process group the ranks agree in (stop, failure, non-finite flags): one that runs on the host, so agreeing
    never waits for the device. The default group when it is gloo (CPU runs); else (NCCL on GPUs, whose collectives
    are queued on the device and read back with a sync) a gloo group over the same ranks, made at the first call.
    Collective: every rank must make its first call at the same point (:func:`any_rank` is called that way)."""
    global _control_group
    if _control_group is None:
        _control_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _control_group


def any_rank(*flags: bool) -> list[bool]:
    """Each flag, True on every rank when it is True on any (one small host all-reduce; nothing on one rank).

    The ranks must call it at the same points: it is how they agree to stop together (a signal that reached one
    rank, a loader that failed on one) instead of one rank leaving a collective the others then wait in forever. It
    runs on the host (:func:`control_group`): a rank whose loader failed answers at once, and the others' hosts wait
    for its host, never for a device.
    """
    if world_size() == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=control_group())
    return [bool(v) for v in t.tolist()]
