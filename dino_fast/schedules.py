"""Schedules as arrays computed up front and indexed by iteration (or epoch), as the reference does."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0,
) -> np.ndarray:
    """Per-iteration values: a linear warmup over ``warmup_epochs`` epochs from ``start_warmup_value`` to
    ``base_value`` (both ends included), then a half cosine from ``base_value`` down to ``final_value``.

    Identical to the reference: the cosine part is ``final + 0.5·(base − final)·(1 + cos(π·i/M))`` for
    ``i = 0..M−1``, M = the iterations left after the warmup, so ``final_value`` itself is never reached.

    Returns:
        float64 array of length ``epochs * niter_per_ep``.
    """
    total = epochs * niter_per_ep
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_epochs > 0 else np.array([])
    m = total - warmup_iters
    i = np.arange(m)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * i / m)) if m > 0 else np.array([])
    schedule = np.concatenate((warmup, cosine))
    if len(schedule) != total:
        raise ValueError(f"schedule has {len(schedule)} values for {total} iterations (warmup longer than training?)")
    return schedule


def teacher_temp_schedule(
    warmup_teacher_temp: float, teacher_temp: float, warmup_epochs: int, nepochs: int
) -> np.ndarray:
    """Per-epoch teacher temperature: linear over ``warmup_epochs`` (both ends included), then constant."""
    return np.concatenate(
        (np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs), np.ones(nepochs - warmup_epochs) * teacher_temp)
    )


def momentum_schedule(base_momentum: float, epochs: int, niter_per_ep: int, final_momentum: float = 1.0) -> np.ndarray:
    """Teacher EMA momentum per iteration: cosine from ``base_momentum`` to ``final_momentum`` (the reference: 1)."""
    return cosine_scheduler(base_momentum, final_momentum, epochs, niter_per_ep)


@dataclass(frozen=True)
class StepValues:
    """The schedule values of one iteration (floats, for the eager step and for logging); ``it`` indexes the device
    tables of the CUDA-graph step (:class:`dino_fast.graph_step.DeviceValuesStep`)."""

    it: int
    epoch: int
    lr: float
    wd: float
    momentum: float
    teacher_temp: float


class Schedules:
    """Per-iteration lr (scaled by the global batch / 256), weight decay and teacher momentum, and the per-epoch
    teacher temperature (given to the loss each step), computed up front as the reference does."""

    def __init__(self, cfg, steps_per_epoch: int, global_batch: int):
        o, d = cfg.optim, cfg.dino
        self.lr = cosine_scheduler(o.lr * global_batch / 256.0, o.min_lr, o.epochs, steps_per_epoch, o.warmup_epochs)
        self.wd = cosine_scheduler(o.weight_decay, o.weight_decay_end, o.epochs, steps_per_epoch)
        self.momentum = momentum_schedule(d.momentum_teacher, o.epochs, steps_per_epoch, d.momentum_teacher_end)
        self.teacher_temp = teacher_temp_schedule(d.warmup_teacher_temp, d.teacher_temp, d.warmup_teacher_temp_epochs,
                                                  o.epochs)

    def at(self, it: int, epoch: int) -> StepValues:
        return StepValues(it, epoch, float(self.lr[it]), float(self.wd[it]), float(self.momentum[it]),
                          float(self.teacher_temp[epoch]))

    def optimizer_table(self, device: torch.device) -> torch.Tensor:
        """[iterations, 2] on ``device``: lr and weight decay per iteration. float64 where the optimizer takes it
        (CPU: then AdamW and the decay round exactly as with Python floats); float32 on CUDA, whose fused AdamW
        kernel reads a float32 lr."""
        dtype = torch.float32 if torch.device(device).type == "cuda" else torch.float64
        return torch.tensor(np.stack([self.lr, self.wd], 1), dtype=dtype, device=device)

    def ema_table(self, device: torch.device) -> torch.Tensor:
        """[iterations, 2] float32 on ``device``: the EMA's m and 1 − m per iteration, 1 − m taken in float64 and
        then rounded, as the eager EMA rounds the Python float it is given (so both paths apply the same weights)."""
        return torch.tensor(np.stack([self.momentum, 1.0 - self.momentum], 1), dtype=torch.float32, device=device)
