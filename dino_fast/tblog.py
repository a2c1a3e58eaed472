"""TensorBoard beside metrics.jsonl (``logging.tensorboard=true``): every numeric value of every metrics record as a
scalar at the record's ``step``, and the periodic attention maps as images, in ``<output_dir>/tb``.

``tensorboard --logdir runs/demo/tb`` shows them. Uses ``torch.utils.tensorboard`` (needs the ``tensorboard``
package), imported only when the option is on.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from dino_fast.progress import MetricsLog

_NOT_SCALARS = ("step", "time")  # the x axis, and the wall time TensorBoard records with every event anyway


class TensorBoardLog(MetricsLog):
    """A :class:`MetricsLog` that also writes each record's numbers to TensorBoard (tag = the metrics key)."""

    def __init__(self, path: str | Path, tb_dir: str | Path):
        super().__init__(path)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(tb_dir))

    def write(self, record: dict[str, Any]) -> None:
        super().write(record)
        step, wall = int(record.get("step", 0)), record.get("time")
        for key, value in record.items():
            if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(key, value, step, walltime=wall)

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        """uint8 [H, W, 3]."""
        self.writer.add_image(tag, image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
        super().close()


def open_metrics_log(cfg, out_dir: str | Path) -> MetricsLog:
    """The run's metrics log: metrics.jsonl, and TensorBoard in ``<out_dir>/tb`` with ``logging.tensorboard``."""
    path = Path(out_dir) / cfg.logging.metrics_file
    if cfg.logging.tensorboard:
        return TensorBoardLog(path, Path(out_dir) / "tb")
    return MetricsLog(path)
