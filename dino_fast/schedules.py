"""Schedules as arrays computed up front and indexed by iteration (or epoch), as the reference does."""

from __future__ import annotations

import numpy as np


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
