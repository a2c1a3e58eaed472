"""The one progress display of the project: a rich bar on a terminal, plain lines in logs and pipes, or nothing.

It serves conversion here, and the trainer and the feature passes (k-NN, linear probe) in ``dino_fast``; it lives
at the bottom of the data path so that nothing here imports the trainer.
"""

from __future__ import annotations

import time

import rich.progress
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text


class _BarWithDetail(rich.progress.Progress):
    """rich's progress bars with one free line of text under them (a training step's metrics)."""

    detail = ""

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        if self.detail:
            yield Text(self.detail, overflow="fold")


class Progress:
    """The one progress display, for training, feature passes (k-NN, linear probe) and conversion.

    ``mode``: ``rich`` (a rich.progress bar with ETA and a status text), ``plain`` (lines, for logs and pipes: one
    whenever the count crosses a multiple of ``print_every``, ``print_seconds`` have passed, or the phase ends),
    ``none``, or ``auto`` (rich on a terminal, else plain). Only rank 0 should build one with a mode other than
    ``none``. A run is one or more phases (:meth:`phase`), each counted with :meth:`update`; :meth:`info` and
    :meth:`warn` print above the bar.
    """

    def __init__(self, mode: str = "auto", *, stderr: bool = False, transient: bool = False, print_every: int = 0,
                 print_seconds: float = 0.0, console: Console | None = None):
        self.console = console or Console(stderr=stderr, highlight=False)
        if mode == "auto":
            mode = "rich" if self.console.is_terminal else "plain"
        if mode not in ("rich", "plain", "none"):
            raise ValueError(f"progress mode must be auto, rich, plain or none, got {mode!r}")
        self.mode, self.print_every, self.print_seconds = mode, print_every, print_seconds
        self.name, self.total, self.done, self._task = "", 0, 0, None
        self._bar: _BarWithDetail | None = None
        if mode == "rich":
            self._bar = _BarWithDetail(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(), TimeElapsedColumn(), console=self.console, transient=transient)
            self._bar.start()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def phase(self, name: str, total: int, done: int = 0, unit: str = "images") -> None:
        """Start counting ``total`` ``unit`` (images, steps) under ``name``, ``done`` of them already (a resume)."""
        self.name, self.total, self.done, self._done0, self.unit = name, total, done, done, unit
        self._t0 = self._last_print = time.perf_counter()
        if self._bar is not None:
            if self._task is not None:
                self._bar.stop_task(self._task)
            self._task = self._bar.add_task(name, total=total, completed=done, rate="")

    def update(self, done: int, status: str | None = None) -> None:
        """``done`` items of this phase are finished; ``status``, when given, is shown under the bar (rich) or is
        the whole line (plain), in place of the default "name: done/total images, N img/s, ETA" line."""
        prev, self.done, now = self.done, done, time.perf_counter()
        rate = (done - self._done0) / max(now - self._t0, 1e-9)
        speed = f"{rate:.0f} img/s" if self.unit == "images" else f"{rate:.1f} {self.unit}/s"
        if self._bar is not None:
            self._bar.detail = status or ""
            self._bar.update(self._task, completed=done, rate=speed)
        elif self.mode == "plain":
            every = self.print_every
            due = (done >= self.total or (every and done // every > prev // every)
                   or (self.print_seconds and now - self._last_print >= self.print_seconds))
            if due and done != prev:
                self._last_print = now
                if status is None:
                    eta = (self.total - done) / rate if rate > 0 else float("inf")
                    status = f"{self.name}: {done}/{self.total} {self.unit}, {speed}, ETA {eta:.0f} s"
                self.console.print(status, markup=False, highlight=False, soft_wrap=True)

    def info(self, message: str) -> None:
        if self.mode != "none":
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        if self.mode != "none":
            self.console.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
