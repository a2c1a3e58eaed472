"""Atomic checkpoints: DeepSpeed engine state + teacher + center + loader position + RNG states + config.

Layout of ``<output_dir>/checkpoints/``::

    step_00001234/            one checkpoint (DeepSpeed's own files for the student and optimizer, plus ours)
        <DeepSpeed files>     mp_rank_*_model_states.pt, optimizer states per rank
        teacher.pt            teacher MultiCropWrapper state_dict (backbone.*, head.*), fp32
        dino_state.pt         center, epoch, step within the epoch, global step
        rank<r>_state.pt      every rank's torch / numpy / python (and accelerator) RNG states, and a fingerprint of
                              its teacher and center (checked equal across ranks at every save)
        config.yaml           the resolved run config
    latest                    the tag of the newest complete checkpoint

A checkpoint is written into ``.tmp/<tag>`` and renamed into place by rank 0 after a barrier, and ``latest`` is
replaced atomically afterwards: a crash mid-write leaves the previous checkpoint as the newest one.
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dino_fast.config import Config, save_config


@dataclass
class TrainPosition:
    epoch: int  # the epoch to run next
    step_in_epoch: int  # batches of that epoch already done
    global_step: int  # optimizer steps done in total


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@torch.no_grad()
def teacher_fingerprint(teacher: torch.nn.Module, center: torch.Tensor) -> torch.Tensor:
    """float64 sums and sums of squares of every teacher parameter, then the center: equal on every rank iff the
    ranks agree (to within what such sums can tell)."""
    tensors = [p.detach() for p in teacher.parameters()] + [center.detach()]
    sums = torch.stack([t.double().sum() for t in tensors])
    squares = torch.stack([t.double().square().sum() for t in tensors])
    return torch.cat([sums, squares])


def _check_ranks_agree(fingerprint: torch.Tensor) -> None:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    gathered = [torch.empty_like(fingerprint) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, fingerprint)
    bad = [r for r, f in enumerate(gathered) if not torch.equal(f, gathered[0])]
    if bad and _rank() == 0:
        warnings.warn(f"teacher/center differ between rank 0 and ranks {bad}: the ranks have diverged", stacklevel=3)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class Checkpointer:
    def __init__(self, output_dir: str | Path, keep_last: int = 3):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last

    def save(self, engine, teacher: torch.nn.Module, dino_loss: torch.nn.Module, pos: TrainPosition,
             cfg: Config) -> Path:
        """Write a checkpoint on every rank (collective: all ranks must call it)."""
        tag = f"step_{pos.global_step:08d}"
        tmp_root = self.root / ".tmp"
        rank = _rank()
        if rank == 0:
            shutil.rmtree(tmp_root / tag, ignore_errors=True)
            tmp_root.mkdir(parents=True, exist_ok=True)
        _barrier()
        engine.save_checkpoint(str(tmp_root), tag=tag, client_state={"global_step": pos.global_step},
                               save_latest=False)
        tmp = tmp_root / tag
        fingerprint = teacher_fingerprint(teacher, dino_loss.center)
        torch.save({"rng": _rng_state(), "fingerprint": fingerprint.cpu()}, tmp / f"rank{rank}_state.pt")
        _check_ranks_agree(fingerprint)
        if rank == 0:
            torch.save(teacher.state_dict(), tmp / "teacher.pt")
            torch.save({"center": dino_loss.center.detach().cpu(), "epoch": pos.epoch,
                        "step_in_epoch": pos.step_in_epoch, "global_step": pos.global_step}, tmp / "dino_state.pt")
            save_config(cfg, tmp / "config.yaml")
        _barrier()
        final = self.root / tag
        if rank == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _atomic_write_text(self.root / "latest", tag + "\n")
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        tags = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in tags[: max(0, len(tags) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        marker = self.root / "latest"
        if not marker.exists():
            return None
        path = self.root / marker.read_text().strip()
        return path if path.is_dir() else None

    def resolve(self, resume: str) -> Path | None:
        """``auto`` → newest checkpoint or None; ``none`` → None; else a checkpoint folder that must exist."""
        if resume in ("", "none"):
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not (path / "dino_state.pt").exists():
            raise FileNotFoundError(f"checkpoint.resume='{resume}' is not a dino_fast checkpoint folder")
        return path

    @staticmethod
    def load(path: Path, engine, teacher: torch.nn.Module, dino_loss: torch.nn.Module) -> TrainPosition:
        """Restore everything saved by :meth:`save` (collective)."""
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no engine state in checkpoint '{path}'")
        device = dino_loss.center.device
        teacher.load_state_dict(torch.load(path / "teacher.pt", map_location=device))
        state = torch.load(path / "dino_state.pt", map_location=device)
        dino_loss.center.copy_(state["center"])
        rank_file = path / f"rank{_rank()}_state.pt"
        if rank_file.exists():  # absent when resuming with more ranks than saved: fresh RNG on the new ranks
            _set_rng_state(torch.load(rank_file, weights_only=False)["rng"])
        return TrainPosition(state["epoch"], state["step_in_epoch"], state["global_step"])
