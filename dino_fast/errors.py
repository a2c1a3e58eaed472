"""How a run ends when it cannot go on: the errors the trainer raises, their one-line messages (what happened, what is
kept, what to do) and the exit code of each (``python -m dino_fast.train`` prints ``error: <message>`` and exits with
it; no traceback on the console).

| code | error | meaning |
|---|---|---|
| 2 | ConfigError, DataError, CheckpointError, FileNotFoundError | bad input: a key, a path, the data, a checkpoint |
| 3 | NonFiniteLossError | the loss or the weights became NaN/inf; no checkpoint holds that state |
| 4 | LoaderError | the data loader failed between steps; every finished step was checkpointed first |
| 5 | OutOfMemory | the step ran out of device memory; the message names the levers and the checkpoint to resume |
| 6 | CheckpointWriteError | a checkpoint could not be written (disk full, quota); the previous one is intact |
| 130 | KeyboardInterrupt | a second Ctrl-C: quit without checkpointing the current step |

With several ranks the rank that fails writes its message (and the traceback) to ``<output_dir>/error-rank<r>.log``;
a rank whose collective then fails because that peer is gone reports the peer's message and exit code instead of its
own connection error (:func:`peer_failure`), so every rank ends with the failing rank's line.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path

import torch

from dino_fast.checkpoint import CheckpointError, CheckpointWriteError
from dino_fast.config import ConfigError
from pipelines.folder import DataError


class NonFiniteLossError(RuntimeError):
    """The loss (or the weights) became NaN/inf; training stops without checkpointing that state."""


class LoaderError(RuntimeError):
    """The data loader failed between steps; every finished step was checkpointed first."""


class OutOfMemory(RuntimeError):
    """The step ran out of device memory (CUDA's allocator raised torch.OutOfMemoryError)."""


EXIT_CODES: dict[type[BaseException], int] = {
    CheckpointWriteError: 6,  # (a CheckpointError: before it in this order)
    ConfigError: 2, DataError: 2, CheckpointError: 2, FileNotFoundError: 2,
    NonFiniteLossError: 3,
    LoaderError: 4,
    OutOfMemory: 5,
}
INTERRUPTED = 130
INTERRUPTED_MESSAGE = ("interrupted (second Ctrl-C): quit without a checkpoint of the current step; the newest "
                       "checkpoint is untouched")


def exit_code(exc: BaseException) -> int | None:
    """The exit code of an error the trainer reports in one line, or None for one it does not expect (a bug)."""
    return next((code for kind, code in EXIT_CODES.items() if isinstance(exc, kind)), None)


def non_finite(bad: str | None, latest: Path | None) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"{bad or 'the loss or the weights became non-finite on another rank'}; stopped without checkpointing it. "
        f"Last good checkpoint: {latest or 'none'}. Lower optim.lr, raise optim.warmup_epochs or check the data."
    )


def loader_failed(failure: BaseException | None, latest: Path | None, step: int) -> Exception:
    kept = f"every finished step is in checkpoint {latest or 'none'}"
    if isinstance(failure, DataError):  # the data's fault, said by the loader: exit code 2
        return DataError(f"{failure} ({kept}; fix the data and rerun to resume)")
    where = f"{type(failure).__name__}: {failure}" if failure else "on another rank"
    return LoaderError(f"the data loader failed before step {step} ({where}); {kept}. Rerun the same command to "
                       f"resume; if the kernel's OOM killer ended a worker (see dmesg), lower data.num_workers first")


MEMORY_LEVERS = ("data.batch_size_per_gpu (halve it)", "model.grad_checkpointing=true", "model.packed_crops=true",
                 "deepspeed.zero_stage=1 or 2", "deepspeed.offload_optimizer=cpu")


def out_of_memory(exc: BaseException, latest: Path | None, step: int) -> OutOfMemory:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
    resume = f"it resumes from {latest}" if latest else "no checkpoint was written yet: it starts over"
    return OutOfMemory(f"step {step} ran out of device memory ({first}). Lower the memory in this order: "
                       f"{', '.join(MEMORY_LEVERS)} (docs/memory.md); then rerun the same command: {resume}")


def _log_path(out_dir: str | Path, rank: int) -> Path:
    return Path(out_dir) / f"error-rank{rank}.log"


def report(exc: BaseException, code: int, out_dir: str | Path | None, rank: int, world: int) -> None:
    """Keep the failure in the run folder (exit code, message, traceback; what the other ranks read) when several
    ranks run or the error is not the user's input; the caller prints the one line."""
    if out_dir is not None and (world > 1 or code not in (2, 130)):
        try:
            log = _log_path(out_dir, rank)
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(f"{code}\n{exc}\n\n" + "".join(traceback.format_exception(exc)))
        except OSError:  # a full disk may be why we are here: the console line is what counts
            pass


def peer_failure(out_dir: str | Path | None, rank: int, world: int, since: float,
                 wait_s: float = 15.0) -> tuple[int, str] | None:
    """Another rank's recorded failure (exit code, one-line message) written after ``since`` (epoch seconds), waiting
    up to ``wait_s`` for it: a collective that failed here because a peer died is that peer's failure."""
    if out_dir is None or world < 2:
        return None
    deadline = time.time() + wait_s
    while True:
        for r in range(world):
            log = _log_path(out_dir, r)
            if r != rank and log.is_file() and log.stat().st_mtime >= since - 1:
                code, message = log.read_text().split("\n", 2)[:2]
                return int(code), f"rank {r} failed: {message}"
        if time.time() > deadline:
            return None
        time.sleep(0.5)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()

