"""The per-step JSON-lines metrics file and the training step's progress line (shown by pipelines.progress)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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


def format_step(m: dict[str, Any], total_steps: int) -> str:
    """One training step's line: throughput, data-wait share, loss, schedules and the teacher's health."""
    return (
        f"ep {m['epoch']} step {m['step']}/{total_steps} | {m['img_per_s']:.1f} img/s "
        f"(avg {m['img_per_s_avg']:.1f}) | data {100 * m['data_wait']:.0f}% | loss {m['loss']:.4f} | "
        f"lr {m['lr']:.2e} wd {m['wd']:.3f} m {m['momentum']:.4f} τt {m['teacher_temp']:.3f} | "
        f"H(t) {m['teacher_entropy']:.2f} KL {m['teacher_student_kl']:.3f}"
    )
