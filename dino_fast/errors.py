"""How a run ends when it cannot go on: the errors the trainer raises, their one-line messages (what happened, what is
kept, what to do) and the exit code of each (``python -m dino_fast.train`` prints ``error: <message>`` and exits with
it; no traceback on the console).

| code | error | meaning |
|---|---|---|
| 2 | ConfigError, DataError, CheckpointError, FileNotFoundError | bad input: a key, a path, the data, a checkpoint |
| 3 | NonFiniteLossError | the loss or the weights became NaN/inf; no checkpoint holds that state |
| 4 | LoaderError | the data loader failed between steps; every finished step was checkpointed first |
| 130 | KeyboardInterrupt | a second Ctrl-C: quit without checkpointing the current step |
"""

from __future__ import annotations

from pathlib import Path

from dino_fast.checkpoint import CheckpointError
from dino_fast.config import ConfigError
from pipelines.folder import DataError


class NonFiniteLossError(RuntimeError):
    """The loss (or the weights) became NaN/inf; training stops without checkpointing that state."""


class LoaderError(RuntimeError):
    """The data loader failed between steps; every finished step was checkpointed first."""


EXIT_CODES: dict[type[BaseException], int] = {
    ConfigError: 2, DataError: 2, CheckpointError: 2, FileNotFoundError: 2,
    NonFiniteLossError: 3,
    LoaderError: 4,
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
