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

A checkpoint is written into ``.tmp/<tag>``, flushed to disk (fsync of every file, then of the folders), and
renamed into place by rank 0 after a barrier; ``latest`` is replaced atomically afterwards. A crash mid-write, or a
machine that loses power after the rename, leaves the previous checkpoint as the newest complete one.

Resuming (``checkpoint.resume=auto``) takes the newest checkpoint whose files all read back whole; one that does not
(a truncated or zero-length file) is renamed ``<tag>.corrupt`` with a warning and the one before it is used. A
checkpoint written with another model shape or another global batch is refused with a message naming the keys.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dino_fast.config import Config, flatten, save_config, to_dict
from dino_fast.dist import any_rank, barrier, rank, world_size

TAG = re.compile(r"step_\d{8}")


@dataclass
class TrainPosition:
    epoch: int  # the epoch to run next
    step_in_epoch: int  # batches of that epoch already done
    global_step: int  # optimizer steps done in total


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


@torch.no_grad()
def state_is_finite(*modules: torch.nn.Module, extra: tuple[torch.Tensor, ...] = ()) -> bool:
    """Whether every floating parameter and buffer of ``modules`` (and ``extra``) is finite: one max-abs per tensor in
    one multi-tensor kernel and one host sync (for use before a checkpoint, not per step)."""
    tensors = [t.detach() for m in modules for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
    tensors += [t.detach() for t in extra]
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return True
    # The max-norm: NaN and inf propagate, large finite weights do not overflow (as a sum of squares could).
    norms = torch.stack([n.float() for n in torch._foreach_norm(tensors, float("inf"))])
    return bool(torch.isfinite(norms).all())


def _check_ranks_agree(fingerprint: torch.Tensor) -> None:
    if world_size() == 1:
        return
    gathered = [torch.empty_like(fingerprint) for _ in range(world_size())]
    dist.all_gather(gathered, fingerprint)
    bad = [r for r, f in enumerate(gathered) if not torch.equal(f, gathered[0])]
    if bad and rank() == 0:
        warnings.warn(f"teacher/center differ between rank 0 and ranks {bad}: the ranks have diverged", stacklevel=3)


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk: a rename alone survives a process crash, not a
    machine that loses power before the page cache is written."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Every file below ``folder``, then every folder (their entries name the files)."""
    paths = sorted(folder.rglob("*"))
    for p in paths:
        if p.is_file():
            _fsync(p)
    for d in sorted({p.parent for p in paths} | {folder}):
        _fsync(d)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


class CheckpointError(ValueError):
    """A checkpoint or weights file cannot be used: missing, unreadable, written by a run or model of another shape;
    the one-line message says why and what to do. The one error every CLI turns into ``error: ...`` and exit 2."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (the disk is full, a quota is exceeded); its partial files are removed, the
    previous checkpoint and ``latest`` are intact. The trainer exits with code 6."""


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# What torch's zip writer raises when a write fails mid-file (it reports no errno): "file write failed", and
# "unexpected pos" / "basic_ios::clear" when it checks the position after a short write.
_DISK_FULL_TEXT = ("file write failed", "unexpected pos", "basic_ios::clear", "no space left", "quota exceeded")


def _is_disk_full(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
            return True
        if any(t in str(exc).lower() for t in _DISK_FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _folder_bytes(folder: Path | None) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder and folder.is_dir() else 0


def _state_bytes(*modules: torch.nn.Module) -> int:
    """A checkpoint's size when none was written yet: the tensors of the modules, and AdamW's two moments of the
    student's (roughly: DeepSpeed adds a copy of the weights with the optimizer state)."""
    sizes = [sum(t.numel() * t.element_size() for t in m.state_dict().values()) for m in modules]
    return sizes[0] * 3 + sum(sizes[1:])


def unreadable_file(folder: Path) -> str | None:
    """The first problem with checkpoint ``folder`` ("teacher.pt: truncated ..."), or None when every file reads
    back whole: each ``.pt`` (a zip archive, torch's format) is checked member by member against its CRC."""
    for name in ("dino_state.pt", "teacher.pt", "config.yaml"):
        if not (folder / name).is_file():
            return f"{name} is missing"
    for f in sorted(folder.glob("*.pt")):
        try:
            with zipfile.ZipFile(f) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:  # truncated, zero-length, unreadable
            return f"{f.name}: {type(exc).__name__}: {exc}"
        if bad is not None:
            return f"{f.name}: member {bad} fails its CRC check"
    return None


# Keys whose change alters the shapes of the saved weights and optimizer state: such a checkpoint cannot be loaded.
# model.use_bn_in_head adds BatchNorm weights and buffers to the head; optim.name another optimizer state (AdamW's
# moments, SGD's momentum_buffer, LARS's mu).
SHAPE_KEYS = ("model.arch", "model.patch_size", "model.depth", "model.out_dim", "model.norm_last_layer",
              "model.head_hidden_dim", "model.head_bottleneck_dim", "model.head_nlayers", "model.use_bn_in_head",
              "data.global_crop_size", "deepspeed.zero_stage", "optim.name")


def check_resumable(folder: Path, cfg: Config, world_size: int, steps_per_epoch: int) -> None:
    """Refuse, with the keys and what to do, a checkpoint this run cannot continue: another model shape (the weights
    would not load) or another global batch (the position and the per-iteration schedules would not carry over).

    Raises:
        CheckpointError: naming the differing keys, the checkpoint's values and this run's.
    """
    import yaml

    # Compared as plain values, so a checkpoint of an older version with keys since renamed still reads; a key it
    # predates (e.g. optim.name) had the value that is now its default.
    saved, now = flatten(yaml.safe_load((folder / "config.yaml").read_text()) or {}), flatten(to_dict(cfg))
    defaults = flatten(to_dict(Config()))
    saved = {k: saved.get(k, defaults.get(k)) for k in SHAPE_KEYS} | saved
    differ = [k for k in SHAPE_KEYS if saved.get(k) != now.get(k)]
    fresh = "or start a new run: checkpoint.resume=none, or another checkpoint.output_dir"
    if differ:
        pairs = ", ".join(f"{k}={saved.get(k)!r} (this run: {now.get(k)!r})" for k in differ)
        raise CheckpointError(f"checkpoint '{folder}' was written by a model of another shape: {pairs}. Resume with "
                              f"the checkpoint's settings (its config.yaml), {fresh}")
    state = torch.load(folder / "dino_state.pt", map_location="cpu")
    saved_world = state.get("world_size")  # absent in checkpoints written before it was recorded
    if saved_world is not None:
        per_gpu = saved["data.batch_size_per_gpu"]
        saved_batch, batch = per_gpu * saved_world, cfg.data.batch_size_per_gpu * world_size
        if saved_batch != batch:
            keep = (f"set data.batch_size_per_gpu={saved_batch // world_size} to keep it"
                    if saved_batch % world_size == 0 else f"use a rank count dividing {saved_batch} to keep it")
            raise CheckpointError(
                f"checkpoint '{folder}' was written with a global batch of {saved_batch} ({saved_world} rank(s) × "
                f"data.batch_size_per_gpu={per_gpu}); this run has {batch} ({world_size} × "
                f"{cfg.data.batch_size_per_gpu}): the position and the per-step schedules do not carry over; {keep}, "
                f"{fresh}")
        if state.get("steps_per_epoch") not in (None, steps_per_epoch):
            warnings.warn(f"the dataset changed since checkpoint '{folder}': {state['steps_per_epoch']} steps per "
                          f"epoch then, {steps_per_epoch} now; the schedules are stretched to the new length",
                          stacklevel=2)


class Checkpointer:
    def __init__(self, output_dir: str | Path, keep_last: int = 3):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last

    def save(self, engine, teacher: torch.nn.Module, dino_loss: torch.nn.Module, pos: TrainPosition,
             cfg: Config, steps_per_epoch: int | None = None) -> Path:
        """Write a checkpoint on every rank (collective: all ranks must call it)."""
        tag = f"step_{pos.global_step:08d}"
        tmp_root = self.root / ".tmp"
        tmp = tmp_root / tag
        me = rank()
        if me == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp_root.mkdir(parents=True, exist_ok=True)
        barrier()
        final = self.root / tag
        try:
            self._write(tmp, engine, teacher, dino_loss, pos, cfg, steps_per_epoch)
            barrier()
            if me == 0:
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _fsync(self.root)
                _atomic_write_text(self.root / "latest", tag + "\n")
        except (OSError, RuntimeError) as exc:  # partial files go; the previous checkpoint stays the newest
            shutil.rmtree(tmp, ignore_errors=True)
            if not _is_disk_full(exc):
                raise
            if me == 0 and final.exists() and self.latest() != final:
                shutil.rmtree(final, ignore_errors=True)  # whole, but ``latest`` could not be moved to it
            raise self._disk_full(tag, engine, teacher) from None
        if me == 0:
            self._prune()
        barrier()
        return final

    def _disk_full(self, tag: str, engine, teacher: torch.nn.Module) -> CheckpointWriteError:
        latest = self.latest()
        need = _folder_bytes(latest) or _state_bytes(engine.module, teacher)
        free = shutil.disk_usage(self.root).free
        resume = f"it resumes from {latest} (intact)" if latest else "no checkpoint was written yet"
        return CheckpointWriteError(
            f"cannot write checkpoint {tag} to {self.root}: the disk is full or over its quota (a checkpoint takes "
            f"~{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free); free space there or set checkpoint.output_dir "
            f"on a larger disk, then rerun the same command: {resume}")

    @staticmethod
    def _write(tmp: Path, engine, teacher: torch.nn.Module, dino_loss: torch.nn.Module, pos: TrainPosition,
               cfg: Config, steps_per_epoch: int | None) -> None:
        """Every file of one checkpoint into ``tmp`` (this rank's share), flushed to the disk."""
        me = rank()
        engine.save_checkpoint(str(tmp.parent), tag=tmp.name, client_state={"global_step": pos.global_step},
                               save_latest=False)
        dino_loss.apply_center_update()
        fingerprint = teacher_fingerprint(teacher, dino_loss.center)
        torch.save({"rng": _rng_state(), "fingerprint": fingerprint.cpu(),  # + this rank's Sinkhorn-Knopp queue
                    **{k: v.detach().cpu() for k, v in dino_loss.rank_state().items()}}, tmp / f"rank{me}_state.pt")
        _check_ranks_agree(fingerprint)
        if me == 0:
            torch.save(teacher.state_dict(), tmp / "teacher.pt")
            torch.save({"center": dino_loss.center.detach().cpu(), "epoch": pos.epoch,
                        "step_in_epoch": pos.step_in_epoch, "global_step": pos.global_step, "world_size": world_size(),
                        "steps_per_epoch": steps_per_epoch}, tmp / "dino_state.pt")
            save_config(cfg, tmp / "config.yaml")
        barrier()
        _fsync_tree(tmp)  # every rank: on a shared filesystem each flushes what it wrote

    def tags(self) -> list[Path]:
        """Complete checkpoint folders, oldest first (``.corrupt`` ones and ``.tmp`` excluded)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and TAG.fullmatch(p.name))

    def _prune(self) -> None:
        tags = self.tags()
        for old in tags[: max(0, len(tags) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        marker = self.root / "latest"
        if not marker.exists():
            return None
        path = self.root / marker.read_text().strip()
        return path if path.is_dir() else None

    def resolve(self, resume: str) -> Path | None:
        """``auto`` → the newest checkpoint that reads back whole, or None when there is none; ``none`` → None; else
        a checkpoint folder that must exist and read back whole (collective under torch.distributed).

        With ``auto``, a newer checkpoint that does not read back is renamed ``<tag>.corrupt`` (kept, not deleted)
        with a warning naming the bad file. Raises CheckpointError when checkpoints exist but none reads back, or
        when the folder given is unreadable.
        """
        if resume in ("", "none"):
            return None
        if resume != "auto":
            path = Path(resume)
            if not (path / "dino_state.pt").exists():
                raise FileNotFoundError(f"checkpoint.resume='{resume}' is not a dino_fast checkpoint folder")
            problem = unreadable_file(path)
            if any_rank(problem is not None)[0]:
                raise CheckpointError(f"checkpoint '{path}' cannot be read back ({problem or 'on another rank'}); "
                                      f"pick another one or set checkpoint.resume=auto")
            return path
        latest = self.latest()
        candidates = [p for p in reversed(self.tags()) if latest is None or p.name <= latest.name]
        for i, path in enumerate(candidates):
            problem = unreadable_file(path)
            if not any_rank(problem is not None)[0]:
                return path
            barrier()
            if rank() == 0:
                then = f", resuming from {candidates[i + 1].name} instead" if i + 1 < len(candidates) else ""
                warnings.warn(f"checkpoint '{path}' cannot be read back ({problem or 'on another rank'}); moved to "
                              f"'{path.name}.corrupt'{then}", stacklevel=2)
                os.replace(path, path.with_name(path.name + ".corrupt"))
            barrier()
        if candidates:
            raise CheckpointError(f"no checkpoint in '{self.root}' reads back whole (moved to *.corrupt); set "
                                  f"checkpoint.resume=none to start over or point checkpoint.resume at a good one")
        return None

    @staticmethod
    def load(path: Path, engine, teacher: torch.nn.Module, dino_loss: torch.nn.Module) -> TrainPosition:
        """Restore everything saved by :meth:`save` (collective)."""
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no engine state in checkpoint '{path}'")
        device = dino_loss.center.device
        dino_loss.apply_center_update()  # none may be left in flight to land on the loaded center
        teacher.load_state_dict(torch.load(path / "teacher.pt", map_location=device))
        state = torch.load(path / "dino_state.pt", map_location=device)
        dino_loss.center.copy_(state["center"])
        rank_file = path / f"rank{rank()}_state.pt"
        if rank_file.exists():  # absent when resuming with more ranks than saved: fresh RNG on the new ranks
            rank_state = torch.load(rank_file, weights_only=False)
            _set_rng_state(rank_state["rng"])
            # The queue only when every rank gets its own back: Sinkhorn-Knopp needs the same rows on every rank.
            dino_loss.load_rank_state(rank_state if state.get("world_size") == world_size() else {})
        return TrainPosition(state["epoch"], state["step_in_epoch"], state["global_step"])
