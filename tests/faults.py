"""Faults injected into a real training run from the outside, by wrapping the loader the trainer builds: the trainer
itself has no test hooks.

A fault is ``KIND@STEP`` or ``KIND@STEP:RANK`` (only that rank), e.g. ``nan@3`` (step 3's crops are NaN: a late
non-finite loss), ``loader@3:1`` (rank 1's loader raises where step 3's batch would come, as a dead worker does) or
``oom@3:1`` (rank 1's step 3 runs out of device memory: the step object raises ``torch.OutOfMemoryError``).
In this process: :func:`inject` (with pytest's ``monkeypatch``); in a child started as ``python tests/fault_train.py``
(or under the DeepSpeed launcher): the environment variable ``DINO_FAST_TEST_FAULT``.
"""

from __future__ import annotations

import os
import sys

import torch

KINDS = ("nan", "loader", "oom")


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


class FaultyStep:
    """The trainer's step object, raising ``torch.OutOfMemoryError`` at its ``step``-th call (1-based), as CUDA's
    caching allocator does when the step's activations do not fit."""

    def __init__(self, step, at: int, active: bool):
        self._step, self.at, self.active, self.calls = step, at, active, 0

    def __getattr__(self, name):
        return getattr(self._step, name)

    def __call__(self, crops, values):
        self.calls += 1
        if self.active and self.calls == self.at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return self._step(crops, values)


def _wrapped(fault: str) -> tuple[str, object]:
    """(the factory's name, the wrapped factory) for ``fault``."""
    import dino_fast.engine
    import pipelines.build

    kind, step, rank = parse(fault)
    if kind == "oom":
        make_step = dino_fast.engine.make_step

        def make(*args, **kwargs):
            from dino_fast.dist import rank as my_rank

            return FaultyStep(make_step(*args, **kwargs), step, rank is None or rank == my_rank())

        return "make_step", make
    build_loader = pipelines.build.build_loader

    def build(*args, **kwargs):
        return FaultyLoader(build_loader(*args, **kwargs), kind, step, rank, kwargs.get("rank", 0))

    return "build_loader", build


def _targets(name: str) -> list:
    """Every loaded module of the project that holds the factory ``name`` (the trainer's engine imports
    ``build_loader`` with ``from pipelines.build import build_loader`` and defines ``make_step``)."""
    import dino_fast.engine
    import pipelines.build

    original = getattr(pipelines.build if name == "build_loader" else dino_fast.engine, name)
    return [m for key, m in list(sys.modules.items())
            if key.startswith(("dino_fast", "pipelines")) and getattr(m, name, None) is original]


def inject(monkeypatch, fault: str) -> None:
    """Wrap the factory the fault needs in this process (undone by ``monkeypatch`` after the test)."""
    name, wrapped = _wrapped(fault)
    for m in _targets(name):
        monkeypatch.setattr(m, name, wrapped)


def inject_from_env() -> None:
    """For a child process: the fault named by ``DINO_FAST_TEST_FAULT``, if any."""
    fault = os.environ.get("DINO_FAST_TEST_FAULT")
    if fault:
        name, wrapped = _wrapped(fault)
        for m in _targets(name):
            setattr(m, name, wrapped)
