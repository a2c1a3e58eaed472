"""The momentum teacher: pairs teacher and student parameters by name and applies the EMA after each step."""

from __future__ import annotations

import os

import torch
from torch import nn

from dino_fast.ops import ema as ops


def select_ema_impl(requested: str = "auto", device: torch.device | str = "cpu") -> str:
    """Env ``DINO_FAST_EMA`` > ``requested`` > auto (the Triton kernel on CUDA when present, else foreach lerp)."""
    choice = os.environ.get("DINO_FAST_EMA", requested) or "auto"
    if choice == "auto":
        choice = "triton" if torch.device(device).type == "cuda" and "triton" in ops.IMPLEMENTATIONS else "foreach"
    if choice not in ops.IMPLEMENTATIONS:
        raise ValueError(f"EMA implementation '{choice}' is not available (have: {', '.join(ops.IMPLEMENTATIONS)})")
    return choice


class TeacherEMA:
    """t ← m·t + (1−m)·s for every parameter of ``teacher`` (backbone and head); buffers are not averaged.

    ``student`` is the module whose parameters the optimizer updates (``engine.module`` under DeepSpeed ZeRO 0–2,
    which keeps whole parameters on every rank).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, impl: str = "auto"):
        t_named = dict(teacher.named_parameters())
        s_named = dict(student.named_parameters())
        if t_named.keys() != s_named.keys():
            missing = sorted(set(t_named) ^ set(s_named))[:5]
            raise ValueError(f"teacher and student parameters differ (e.g. {missing}); build both from one config")
        self.names = list(t_named)
        self.teacher_params = [t_named[n] for n in self.names]
        self.student_params = [s_named[n] for n in self.names]
        for n, t, s in zip(self.names, self.teacher_params, self.student_params):
            if t.shape != s.shape:
                raise ValueError(f"teacher/student shape mismatch at {n}: {tuple(t.shape)} vs {tuple(s.shape)}")
            if hasattr(s, "ds_numel") or s.numel() == 0 and hasattr(s, "ds_id"):
                raise ValueError("the student's parameters are partitioned (ZeRO-3); use deepspeed.zero_stage ≤ 2")
        self.impl = select_ema_impl(impl, self.teacher_params[0].device)
        self._fn = ops.IMPLEMENTATIONS[self.impl]

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        self._fn(self.teacher_params, self.student_params, float(momentum))
