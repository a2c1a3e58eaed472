"""Which implementation of an op runs: the one place that chooses, for every op with a fused path.

Each op has a table of implementations by name: the DINO loss (``eager``: :mod:`dino_fast.ops.reference`,
``triton``: :mod:`dino_fast.ops.dino_loss`) and the teacher EMA (``foreach`` and ``reference``: plain torch,
``triton``: :class:`dino_fast.ops.ema.FlatEMA`, which :class:`dino_fast.teacher.TeacherEMA` holds). The rule is the same
for both (:func:`select_impl`): the environment variable > the config > auto, and auto is the Triton kernel on CUDA.
The active path is printed once at start-up (the trainer's first line).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import torch

from dino_fast.ops import dino_loss as triton_loss
from dino_fast.ops import reference


class LossImpl(NamedTuple):
    """One implementation of the DINO loss: with the centered teacher softmax, and on given targets."""

    dino_loss: Callable  # (student [ncrops·B, K], teacher [2·B, K], center [1, K], τt, τs, ncrops) → (loss, colsum)
    from_targets: Callable  # (student [ncrops·B, K], targets [2·B, K], τs, ncrops) → loss


class EMAImpl(NamedTuple):
    """One plain-torch implementation of the teacher EMA, with the momentum as a float and as device memory."""

    update: Callable  # (teacher_params, student_params, momentum: float)
    update_on_device: Callable  # (teacher_params, student_params, weights: [m, 1 − m] float32 on the device)


LOSS: dict[str, LossImpl] = {"eager": LossImpl(reference.dino_loss_eager, reference.dino_loss_from_targets_eager)}
EMA: dict[str, EMAImpl | None] = {
    "foreach": EMAImpl(reference.ema_foreach, reference.ema_foreach_on_device),
    "reference": EMAImpl(reference.ema_reference_loop, reference.ema_reference_loop_on_device),
}
if triton_loss.triton is not None:  # a hard dependency; without it the plain-torch paths still run
    LOSS["triton"] = LossImpl(triton_loss.dino_loss_triton, triton_loss.dino_loss_from_targets_triton)
    EMA["triton"] = None  # stateful (flat buffers laid out once): dino_fast.teacher.TeacherEMA holds a FlatEMA


def select_impl(what: str, implementations: dict, requested: str = "auto", device: torch.device | str = "cpu", *,
                env: str, fallback: str) -> str:
    """The environment variable ``env`` > ``requested`` > auto: the Triton kernel on CUDA when it is registered in
    ``implementations``, else ``fallback``. Raises ValueError naming what is available.

    Args:
        what: the op's name in the error message ("loss", "EMA").
        implementations: the op's table (:data:`LOSS`, :data:`EMA`).
        requested: the config's choice ("auto" or a name).
        device: where the op's tensors live.
    """
    choice = os.environ.get(env, requested) or "auto"
    if choice == "auto":
        choice = "triton" if torch.device(device).type == "cuda" and "triton" in implementations else fallback
    if choice not in implementations:
        raise ValueError(f"{what} implementation '{choice}' is not available (have: {', '.join(implementations)})")
    return choice


def loss_impl(requested: str, device: torch.device | str) -> tuple[str, LossImpl]:
    """The DINO loss's implementation (``dino.loss_impl``; env ``DINO_FAST_LOSS``): its name and functions."""
    name = select_impl("loss", LOSS, requested, device, env="DINO_FAST_LOSS", fallback="eager")
    return name, LOSS[name]


def ema_impl(requested: str, device: torch.device | str) -> str:
    """The teacher EMA's implementation name (``dino.ema_impl``; env ``DINO_FAST_EMA``)."""
    return select_impl("EMA", EMA, requested, device, env="DINO_FAST_EMA", fallback="foreach")
