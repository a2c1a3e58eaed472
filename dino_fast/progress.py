"""Progress display (rich live line on a TTY, plain lines otherwise) and the per-step JSON-lines metrics file."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.text import Text


class MetricsLog:
    """Appends one JSON object per step to ``path`` (line-buffered, so a crash loses at most the current line)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._fh.close()


def _fmt(m: dict[str, Any], total_steps: int) -> str:
    return (
        f"ep {m['epoch']} step {m['step']}/{total_steps} | {m['img_per_s']:.1f} img/s "
        f"(avg {m['img_per_s_avg']:.1f}) | data {100 * m['data_wait']:.0f}% | loss {m['loss']:.4f} | "
        f"lr {m['lr']:.2e} wd {m['wd']:.3f} m {m['momentum']:.4f} τt {m['teacher_temp']:.3f} | "
        f"H(t) {m['teacher_entropy']:.2f} KL {m['teacher_student_kl']:.3f}"
    )


class Progress:
    """Shows throughput, data-wait share, loss and schedules; ``mode`` is auto | rich | plain | none.

    Only rank 0 should build one with a mode other than ``none``.
    """

    def __init__(self, mode: str, total_steps: int, print_every: int = 10, console: Console | None = None):
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.mode = mode
        self.total_steps = total_steps
        self.print_every = max(1, print_every)
        self.console = console or Console(stderr=False, highlight=False)
        self._live: Live | None = None
        self._t0 = time.perf_counter()
        if mode == "rich":
            self._live = Live(Text("starting…"), console=self.console, refresh_per_second=4, transient=False)
            self._live.start()

    def info(self, message: str) -> None:
        if self.mode != "none":
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        if self.mode != "none":
            self.console.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)

    def update(self, m: dict[str, Any]) -> None:
        if self.mode == "rich" and self._live is not None:
            done = m["step"] / max(self.total_steps, 1)
            bar = "█" * int(24 * done) + "·" * (24 - int(24 * done))
            self._live.update(Text(f"{bar} {100 * done:5.1f}% | " + _fmt(m, self.total_steps)))
        elif self.mode == "plain" and (m["step"] % self.print_every == 0 or m["step"] == self.total_steps):
            print(_fmt(m, self.total_steps), flush=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
