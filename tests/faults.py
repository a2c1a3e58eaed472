"""Faults injected into a real training run from the outside, by wrapping the loader the trainer builds: the trainer
itself has no test hooks.

A fault is ``KIND@STEP`` or ``KIND@STEP:RANK`` (only that rank), e.g. ``nan@3`` (step 3's crops are NaN: a late
non-finite loss) or ``loader@3:1`` (rank 1's loader raises where step 3's batch would come, as a dead worker does).
In this process: :func:`inject` (with pytest's ``monkeypatch``); in a child started as ``python tests/fault_train.py``
(or under the DeepSpeed launcher): the environment variable ``DINO_FAST_TEST_FAULT``.
"""

from __future__ import annotations

import os
import sys

import torch

KINDS = ("nan", "loader")


class InjectedLoaderError(RuntimeError):
    """What the wrapped loader raises for ``loader@STEP``."""


def parse(fault: str) -> tuple[str, int, int | None]:
    kind, _, where = fault.partition("@")
    step, _, rank = where.partition(":")
    if kind not in KINDS or not step.isdigit():
        raise ValueError(f"fault {fault!r}: expected KIND@STEP[:RANK] with KIND one of {', '.join(KINDS)}")
    return kind, int(step), int(rank) if rank else None


class FaultyLoader:
    """The trainer's loader, with the fault injected at the ``step``-th batch this loader yields (1-based)."""

    def __init__(self, loader, kind: str, step: int, rank: int | None, my_rank: int):
        self._loader, self.kind, self.step = loader, kind, step
        self.active = rank is None or rank == my_rank
        self.yielded = 0

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self):
        for batch in self._loader:
            self.yielded += 1
            if self.active and self.yielded == self.step:
                if self.kind == "loader":
                    raise InjectedLoaderError(f"injected loader failure at step {self.step}")
                batch.crops[0] = torch.full_like(batch.crops[0], float("nan"))
            yield batch


def _wrap(build_loader, fault: str):
    kind, step, rank = parse(fault)

    def build(*args, **kwargs):
        return FaultyLoader(build_loader(*args, **kwargs), kind, step, rank, kwargs.get("rank", 0))

    return build


def _targets():
    """Every loaded module of the project that holds the loader factory under its own name (the trainer imports it
    with ``from pipelines.build import build_loader``), and the factory's own module."""
    import pipelines.build

    original = pipelines.build.build_loader
    mods = [m for name, m in list(sys.modules.items())
            if name.startswith(("dino_fast", "pipelines")) and getattr(m, "build_loader", None) is original]
    return original, mods


def inject(monkeypatch, fault: str) -> None:
    """Wrap the loader factory in this process (undone by ``monkeypatch`` after the test)."""
    original, mods = _targets()
    for m in mods:
        monkeypatch.setattr(m, "build_loader", _wrap(original, fault))


def inject_from_env() -> None:
    """For a child process: the fault named by ``DINO_FAST_TEST_FAULT``, if any."""
    fault = os.environ.get("DINO_FAST_TEST_FAULT")
    if fault:
        import dino_fast.train  # noqa: F401  (loaded first: it binds the factory the wrapper replaces)

        original, mods = _targets()
        for m in mods:
            m.build_loader = _wrap(original, fault)
