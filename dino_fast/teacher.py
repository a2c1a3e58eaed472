"""The momentum teacher: pairs teacher and student parameters by name and applies the EMA after each step."""

from __future__ import annotations

import torch
from torch import nn

from dino_fast.ops import select
from dino_fast.ops.ema import FlatEMA


class TeacherEMA:
    """t ← m·t + (1−m)·s for every parameter of ``teacher`` (backbone and head); buffers are not averaged.

    ``student`` is the module whose parameters the optimizer updates (``engine.module`` under DeepSpeed ZeRO 0–2,
    which keeps whole parameters on every rank). ``impl``: "auto" | "foreach" | "reference" | "triton"; the
    environment variable ``DINO_FAST_EMA`` overrides it, auto is the Triton kernel on CUDA, else foreach.

    With "triton" it owns the fused path's :class:`dino_fast.ops.ema.FlatEMA` (``flat``), laid out at the first
    update: from then on the teacher's parameters are views into its flat fp32 buffer. Student parameters in another
    memory format than the contiguous one (a ResNet's channels_last convolution weights on a GPU) are left out of
    it and averaged with the foreach lerp, in their own layout.

    Buffers (BatchNorm's running statistics) are never averaged: a teacher with BatchNorm keeps its own, from its
    own forwards, as the reference's does.
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
        self.impl = select.ema_impl(impl, self.teacher_params[0].device)
        self.flat: FlatEMA | None = None
        self._strided: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])  # the pairs the flat path leaves out

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        if self.impl != "triton":
            select.EMA[self.impl].update(self.teacher_params, self.student_params, float(momentum))
            return
        self._flat().update(momentum)
        if self._strided[0]:
            select.EMA["foreach"].update(*self._strided, float(momentum))

    @torch.no_grad()
    def update_on_device(self, weights: torch.Tensor) -> None:
        """:meth:`update` with the momentum on the device: ``weights`` = [m, 1 − m] float32 (the CUDA-graph step's
        values). Nothing is read back to the host: the Triton path's kernels read m from that memory, the others take
        tensor factors; each gives its float path's result bit for bit."""
        if self.impl != "triton":
            select.EMA[self.impl].update_on_device(self.teacher_params, self.student_params, weights)
            return
        self._flat().update_on_device(weights)
        if self._strided[0]:
            select.EMA["foreach"].update_on_device(*self._strided, weights)

    def _flat(self) -> FlatEMA:
        if self.flat is None:  # at the first update, after DeepSpeed has laid out the student's buffers
            pairs = list(zip(self.teacher_params, self.student_params))
            flat = [(t, s) for t, s in pairs if s.is_contiguous()]
            strided = [(t, s) for t, s in pairs if not s.is_contiguous()]
            self._strided = ([t for t, _ in strided], [s for _, s in strided])
            self.flat = FlatEMA([t for t, _ in flat], [s for _, s in flat])
        return self.flat
