"""Everything a run writes about its steps: ``metrics.jsonl`` (one JSON object per step), TensorBoard beside it
(``logging.tensorboard=true``), the progress line (shown by ``pipelines.progress``) and the collapse warning.

:class:`Reporter` logs each step one step late, once its metrics reached the host (the step never waits for the
device: ``dino_fast.step.StepMetrics``), and remembers a non-finite loss for the trainer to stop on.

TensorBoard (``tensorboard --logdir runs/demo/tb``): every numeric value of every metrics record as a scalar at the
record's ``step``, and the periodic attention maps as images, in ``<output_dir>/tb``. It uses
``torch.utils.tensorboard`` (the ``tensorboard`` package), imported only when the option is on.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from dino_fast.checkpoint import TrainPosition
from dino_fast.config import Config
from dino_fast.health import CollapseDetector
from dino_fast.schedules import StepValues
from dino_fast.step import StepMetrics
from pipelines.progress import Progress


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


class Reporter:
    """Logs each step one step late, once its metrics reached the host, and guards every checkpoint.

    ``push`` is called right after a step was queued: it reads the previous step's metrics (that step has finished
    or is about to, while the new one runs), logs them, and keeps the new step pending. A non-finite loss found
    there is remembered in ``bad``; the trainer stops on it at the next point where all ranks agree.
    """

    def __init__(self, cfg: Config, rank: int, total_steps: int, out_dir: Path, global_batch: int,
                 steps_per_epoch: int, start_step: int = 0):
        self.progress = Progress(cfg.logging.progress if rank == 0 else "none", print_every=cfg.logging.print_every)
        self.progress.phase("train", total_steps, done=start_step, unit="steps")
        self.total_steps = total_steps
        self.metrics = open_metrics_log(cfg, out_dir) if rank == 0 else None  # metrics.jsonl (+ TensorBoard)
        self.collapse = CollapseDetector(cfg.model.out_dim, warmup_steps=cfg.optim.warmup_epochs * steps_per_epoch)
        self.global_batch = global_batch
        self.pending: tuple[dict, StepMetrics] | None = None
        self.bad: str | None = None
        self.last: dict = {}
        self.images_seen, self.t_start = 0, time.perf_counter()

    def push(self, pos: TrainPosition, epoch: int, values: StepValues, metrics: StepMetrics, t_prev: float,
             t_data: float) -> None:
        t_end = time.perf_counter()
        self.images_seen += self.global_batch
        record = {
            "step": pos.global_step, "epoch": epoch, "lr": values.lr, "wd": values.wd, "momentum": values.momentum,
            "teacher_temp": values.teacher_temp, "img_per_s": self.global_batch / (t_end - t_prev),
            "img_per_s_avg": self.images_seen / (t_end - self.t_start),
            "data_wait": (t_data - t_prev) / (t_end - t_prev), "step_time": t_end - t_prev, "time": time.time(),
        }
        self.flush()
        self.pending = (record, metrics)

    def flush(self) -> None:
        """Read and log the pending step (waits for that step's device work only)."""
        if self.pending is None:
            return
        (record, metrics), self.pending = self.pending, None
        values = metrics.read()
        for key in ("loss", "koleo"):  # the DINO loss, and the KoLeo term when it is on
            if not math.isfinite(values.get(key, 0.0)):
                what = "loss" if key == "loss" else "KoLeo term"
                self.bad = self.bad or f"{what} is {values[key]} at step {record['step']} (epoch {record['epoch']})"
                return
        self.last = {**record, **values}
        record = {"step": record["step"], "epoch": record["epoch"], **values, **record}  # the old key order
        if self.metrics is not None:
            self.metrics.write(record)
        self.progress.update(record["step"], format_step(record, self.total_steps))
        warning = self.collapse.update(record["step"], record["teacher_entropy"], record["loss"],
                                       record["teacher_batch_entropy"])
        if warning:
            self.progress.warn(warning)

    def log_knn(self, knn: dict, step: int, epoch: int, what: str, k: int) -> None:
        if self.metrics is not None:
            self.metrics.write({"step": step, "epoch": epoch, **knn, "time": time.time()})
        self.progress.info(f"{what} k-NN (teacher, k={k}): top-1 {knn['knn_top1']:.2f}% top-5 {knn['knn_top5']:.2f}%")

    def close(self) -> None:
        self.progress.close()
        if self.metrics is not None:
            self.metrics.close()
