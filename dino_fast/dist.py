"""The few torch.distributed facts the trainer and the checkpointer need; each also works without a process group.
Also where a process learns its rank without a launcher: from SLURM's environment (:func:`slurm_environment`)."""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping

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


# ---------------------------------------------------------------------------------------------------------- SLURM
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000  # MASTER_PORT from the job id: 20000-39999, the same on every task


class SlurmEnvironmentError(ValueError):
    """SLURM's variables are there but not enough to place this task (one line: which are missing)."""


def _split_top_level(text: str) -> list[str]:
    """``a[1-2],b3`` → ``["a[1-2]", "b3"]``: commas inside brackets belong to the range."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_range(spec: str) -> list[str]:
    """``01-04,07`` → ``["01", "02", "03", "04", "07"]`` (zero padding kept, as SLURM writes it)."""
    out = []
    for item in spec.split(","):
        lo, _, hi = item.partition("-")
        if not hi:
            out.append(lo)
            continue
        out.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return out


def parse_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list → host names: ``node[01-04,07]`` → node01..node04, node07; ``gpu-a[1-2],gpu-b3``
    → gpu-a1, gpu-a2, gpu-b3; several bracket groups in a name expand as their product (``r[1-2]n[1-2]``)."""
    hosts = []
    for part in _split_top_level(hostlist.strip()):
        pieces = re.split(r"(\[[^\]]*\])", part)
        choices = [_expand_range(p[1:-1]) if p.startswith("[") else [p] for p in pieces if p]
        if any(p.count("[") != p.count("]") for p in pieces):
            raise SlurmEnvironmentError(f"cannot read the SLURM host list {hostlist!r}")
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def slurm_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT of a task started by ``srun`` (one task per GPU, no
    launcher), or None when this is no SLURM task or a launcher already set them (``RANK`` present: torchrun,
    DeepSpeed's runner, also ``deepspeed --launcher slurm``).

    From ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, the first host of ``SLURM_STEP_NODELIST`` (else
    ``SLURM_JOB_NODELIST``) and a port every task derives alike from ``SLURM_JOB_ID``; an explicit ``MASTER_ADDR`` or
    ``MASTER_PORT`` wins. Raises SlurmEnvironmentError naming what is missing.
    """
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return None
    missing = [v for v in ("SLURM_NTASKS", "SLURM_LOCALID") if v not in environ]
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    if nodelist is None and "MASTER_ADDR" not in environ:
        missing.append("SLURM_STEP_NODELIST or SLURM_JOB_NODELIST")
    if "SLURM_JOB_ID" not in environ and "MASTER_PORT" not in environ:
        missing.append("SLURM_JOB_ID (or MASTER_PORT)")
    if missing:
        raise SlurmEnvironmentError(f"SLURM_PROCID is set but {', '.join(missing)} not: start one task per GPU with "
                                    f"srun (docs/slurm.md), or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and "
                                    f"MASTER_PORT yourself")
    port = environ.get("MASTER_PORT") or str(SLURM_PORT_BASE + int(environ["SLURM_JOB_ID"]) % SLURM_PORT_SPAN)
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_NTASKS"],
            "LOCAL_RANK": environ["SLURM_LOCALID"],
            "MASTER_ADDR": environ.get("MASTER_ADDR") or parse_hostlist(nodelist)[0], "MASTER_PORT": port}


def local_device_index(local_rank: int, visible_devices: int) -> int:
    """The GPU of this task among those it sees: its local rank when it sees all of the node's GPUs (one task per
    node's GPU, all visible), 0 when it sees one (``srun --gpus-per-task=1`` or CUDA_VISIBLE_DEVICES per task)."""
    if visible_devices <= 1:
        return 0
    if local_rank >= visible_devices:
        raise SlurmEnvironmentError(f"local rank {local_rank} but only {visible_devices} GPUs visible: start at most "
                                    f"one task per visible GPU")
    return local_rank
