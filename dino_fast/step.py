"""One DINO iteration as an object: the trainer and every benchmark call ``step(crops, values)``.

:class:`DINOStep` owns the engine (student + AdamW), the teacher, the loss, the EMA, the precision context and the
schedule values, and runs: teacher forward (globals) → student forward (all crops) → loss → backward → per-parameter
clip → last-layer freeze → optimizer step → teacher EMA. Nothing in it waits on the device: the loss and the health
values come back as one device tensor whose copy to pinned host memory is queued without blocking
(:class:`StepMetrics`); the trainer reads it one step later, while the next step runs. A non-finite loss is therefore
seen one step late, after its update: the trainer reads the newest step's metrics before every checkpoint, so no
checkpoint holds a step whose loss was not finite.

Schedule values reach the step in one of two ways (:class:`StepValues` carries both): as Python floats written into
the optimizer's param groups (the default, the reference's way), or, with ``device_values=True``, read from a table of
every iteration's lr / weight decay / momentum held on the device, so a captured CUDA graph can replay any iteration
(``dino_fast/graph_step.py``). Both give the same weights (tests/test_step.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch.profiler import record_function

from dino_fast.health import teacher_health
from dino_fast.koleo import koleo_loss
from dino_fast.optim import cancel_last_layer_grads, clip_gradients
from dino_fast.schedules import cosine_scheduler, momentum_schedule, teacher_temp_schedule

METRIC_NAMES = ("loss", "teacher_entropy", "teacher_batch_entropy", "teacher_student_kl", "center_norm")
KOLEO_METRIC = "koleo"  # logged after METRIC_NAMES when dino.koleo_weight > 0


@dataclass(frozen=True)
class StepValues:
    """The schedule values of one iteration (floats, for the float path and for logging); ``it`` indexes the
    device table of the device-values path."""

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

    def table(self, device: torch.device) -> torch.Tensor:
        """[iterations, 3] on ``device``: lr, weight decay, momentum per iteration. float64 where the optimizer takes
        it (CPU: then AdamW and the decay round exactly as with Python floats); float32 on CUDA, whose fused AdamW
        kernel reads a float32 lr."""
        dtype = torch.float32 if torch.device(device).type == "cuda" else torch.float64
        return torch.tensor(np.stack([self.lr, self.wd, self.momentum], 1), dtype=dtype, device=device)


class StepMetrics:
    """One step's loss and health values on their way to the host: ``read()`` waits for that step only.

    On CUDA the values are copied into a pinned host buffer without blocking and an event marks the copy's end; on
    CPU the device tensor already is a host tensor.
    """

    def __init__(self, values: torch.Tensor, host: torch.Tensor | None = None, names: tuple[str, ...] = METRIC_NAMES):
        self._event = None
        self.names = names
        if values.device.type == "cuda":
            host.copy_(values.detach(), non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            values = host
        self._values = values

    def read(self) -> dict[str, float]:
        if self._event is not None:
            self._event.synchronize()
        return dict(zip(self.names, self._values.tolist()))


class DINOStep:
    """One DINO iteration on crops already on the device; ``step(crops, values)`` returns :class:`StepMetrics`.

    Args:
        engine, teacher, dino_loss, ema: as built by ``dino_fast.train.build_training``.
        cfg: the run config (optim.clip_grad, optim.freeze_last_layer, model.compile).
        precision: "bf16" (the teacher runs under bf16 autocast, as DeepSpeed runs the student) or "fp32".
        schedules: the run's :class:`Schedules` (needed with ``device_values``).
        device_values: read lr, weight decay and momentum from a device table (the CUDA-graph path; ZeRO-0 only):
            the optimizer's lr is a device tensor, the decoupled weight decay is applied by the step
            (p ← p·(1 − lr·wd), what AdamW does first) and the EMA takes its momentum from the device.
    """

    def __init__(self, engine, teacher: torch.nn.Module, dino_loss, ema, cfg, *, precision: str,
                 schedules: Schedules | None = None, device_values: bool = False):
        self.engine, self.teacher, self.dino_loss, self.ema, self.cfg = engine, teacher, dino_loss, ema, cfg
        self.device = dino_loss.center.device
        self.teacher_ctx = ((lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if precision == "bf16"
                            else contextlib.nullcontext)
        self.device_values = device_values
        self.koleo_weight = cfg.dino.koleo_weight
        self.metric_names = METRIC_NAMES + ((KOLEO_METRIC,) if self.koleo_weight else ())
        self._host = ([torch.empty(len(self.metric_names), pin_memory=True) for _ in range(3)]
                      if self.device.type == "cuda" else None)
        self._calls = 0
        if device_values:
            self._init_device_values(schedules)

    def _init_device_values(self, schedules: Schedules | None) -> None:
        if schedules is None:
            raise ValueError("device_values needs the run's Schedules")
        groups = self.engine.optimizer.param_groups
        if self.cfg.deepspeed.zero_stage != 0 or not isinstance(self.engine.optimizer, torch.optim.Optimizer):
            raise ValueError("device-tensor schedule values need deepspeed.zero_stage=0 (the optimizer must update "
                             "the module's own parameters)")
        self._table = schedules.table(self.device)
        self._now = self._table[0].clone()  # lr, wd, momentum of the current iteration (static for a CUDA graph)
        self._lr = self._now[0:1].view(())  # views: one copy into _now updates all three
        self._decayed = list(groups[0]["params"])
        self._bind()
        self._teacher_params, self._student_params = self.ema.teacher_params, self.ema.student_params

    def _bind(self) -> None:
        """The optimizer reads lr from ``_lr`` and decays nothing itself (the step does); again after a checkpoint
        load replaced the param groups' values."""
        groups = self.engine.optimizer.param_groups
        if groups[0]["lr"] is not self._lr or groups[0]["weight_decay"] != 0.0:
            for g in groups:
                g["lr"] = self._lr
            groups[0]["weight_decay"] = 0.0

    # ---- the parts of one iteration
    def set_values(self, values: StepValues) -> None:
        """Schedules → optimizer (and the device table's row when device values are used; no host sync)."""
        if self.device_values:
            self._bind()
            self._now.copy_(self._table[values.it], non_blocking=True)
            return
        for i, group in enumerate(self.engine.optimizer.param_groups):
            group["lr"] = values.lr
            if i == 0:  # the regularised group only
                group["weight_decay"] = values.wd

    def forward_losses(self, crops: list[torch.Tensor], values: StepValues) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher and student forward and the loss terms; returns (total loss, metrics vector [len(METRIC_NAMES)]).

        The one place for the loss terms: a term on the student's own features (e.g. KoLeo on its backbone CLS
        tokens) is added to ``total`` here.
        """
        with record_function("dino:teacher_forward"), torch.no_grad(), self.teacher_ctx():
            teacher_out = self.teacher(crops[:2])
            # Its targets when they are Sinkhorn-Knopp's, made with the teacher's output as dinov2 does (None with
            # the reference centering: the loss centers and sharpens itself).
            targets = self.dino_loss.sinkhorn_targets(teacher_out, values.teacher_temp)
        with record_function("dino:student_forward"):
            if self.koleo_weight:  # DINOv2: KoLeo on each global crop's backbone CLS features
                features, student_out = self.engine(crops, return_backbone=True)
                koleo = sum(koleo_loss(f) for f in features[: 2 * crops[0].shape[0]].chunk(2))
            else:
                student_out = self.engine(crops)
        with record_function("dino:health"):  # before the loss, which updates the center: same center as the loss
            health = teacher_health(teacher_out, self.dino_loss.center, values.teacher_temp, targets)
        with record_function("dino:loss"):
            dino = self.dino_loss(student_out, teacher_out, teacher_temp=values.teacher_temp, targets=targets)
            total = dino + self.koleo_weight * koleo if self.koleo_weight else dino
            # "loss" is the DINO loss (comparable with ln K and the reference); the KoLeo term is logged apart.
            health["loss"] = dino.detach().float()
            health["teacher_student_kl"] = health["loss"] - health["teacher_entropy"]  # each pair: CE = H + KL
            extra = [koleo.detach().float()] if self.koleo_weight else []
            metrics = torch.stack([health[name] for name in METRIC_NAMES] + extra)
        return total, metrics

    def backward_update(self, loss: torch.Tensor, values: StepValues) -> None:
        """Backward → per-parameter clip → last-layer freeze → (decoupled decay) → AdamW → teacher EMA."""
        with record_function("dino:backward"):
            self.engine.backward(loss)
        with record_function("dino:clip"):
            if self.cfg.optim.clip_grad > 0:
                clip_gradients(self.engine.module, self.cfg.optim.clip_grad)
            if values.epoch < self.cfg.optim.freeze_last_layer:
                cancel_last_layer_grads(self.engine.module)
        with record_function("dino:optimizer_step"):
            if self.device_values:
                self._decay()
            self.engine.step()
        with record_function("dino:teacher_ema"):
            if self.device_values:
                self._ema_from_device()
            else:
                self.ema.update(values.momentum)

    @torch.no_grad()
    def _decay(self) -> None:
        """AdamW's decoupled weight decay p ← p·(1 − lr·wd) with both values read on the device; parameters
        without a gradient this step are skipped, as AdamW skips them."""
        params = [p for p in self._decayed if p.grad is not None]
        if params:
            torch._foreach_mul_(params, 1.0 - self._now[0] * self._now[1])

    @torch.no_grad()
    def _ema_from_device(self) -> None:
        """t ← t + (1 − m)·(s − t) with m read on the device (the float path's foreach lerp, a tensor weight)."""
        students = [s.detach() if s.dtype == t.dtype else s.detach().to(t.dtype)
                    for t, s in zip(self._teacher_params, self._student_params)]
        torch._foreach_lerp_(self._teacher_params, students, 1.0 - self._now[2])

    def _metrics(self, metrics: torch.Tensor) -> StepMetrics:
        host = self._host[self._calls % len(self._host)] if self._host is not None else None
        self._calls += 1
        return StepMetrics(metrics, host, self.metric_names)

    def __call__(self, crops: list[torch.Tensor], values: StepValues) -> StepMetrics:
        if self.cfg.model.compile:  # a new iteration: CUDA-graph outputs of the last one may be overwritten now
            torch.compiler.cudagraph_mark_step_begin()
        self.set_values(values)
        loss, metrics = self.forward_losses(crops, values)
        self.backward_update(loss, values)
        return self._metrics(metrics)


@torch.no_grad()
def state_is_finite(*modules: torch.nn.Module, extra: tuple[torch.Tensor, ...] = ()) -> bool:
    """Whether every floating parameter and buffer of ``modules`` (and ``extra``) is finite: one max-abs per tensor in
    one multi-tensor kernel and one host sync (for use before a checkpoint, not per step)."""
    tensors = [t.detach() for m in modules for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
    tensors += [t.detach() for t in extra]
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return True
    # The max-norm: NaN and inf propagate, large finite weights do not overflow (as a sum of squares could).
    norms = torch.stack([n.float() for n in torch._foreach_norm(tensors, float("inf"))])
    return bool(torch.isfinite(norms).all())
