"""One DINO iteration as an object: the trainer and every benchmark call ``step(crops, values)``.

:class:`DINOStep` owns the engine (student + AdamW), the teacher, the loss, the EMA, the precision context and the
schedule values, and runs: teacher forward (globals) → student forward (all crops) → loss → backward → per-parameter
clip → last-layer freeze → optimizer step → teacher EMA. Nothing in it waits for the device (tests/test_no_host_sync.py
proves it on CPU): the loss and the health values come back as one device tensor whose copy to pinned host memory is
queued without blocking (:class:`StepMetrics`); the trainer reads it one step later, while the next step runs. A
non-finite loss is therefore seen one step late, after its update: the trainer reads the newest step's metrics before
every checkpoint, so no checkpoint holds a step whose loss was not finite.

Schedule values reach this step as Python floats written into the optimizer's param groups (the reference's way).
The CUDA-graph step (``dino_fast/graph_step.py``) overrides the three places where they enter (``set_values``,
``optimizer_step``, ``teacher_ema``) to read them from device tables instead; everything else is shared.
"""

from __future__ import annotations

import contextlib

import torch
from torch.profiler import record_function

from dino_fast.health import teacher_health
from dino_fast.loss import koleo_loss
from dino_fast.optim import cancel_last_layer_grads, clip_gradients
from dino_fast.schedules import StepValues

METRIC_NAMES = ("loss", "teacher_entropy", "teacher_batch_entropy", "teacher_student_kl", "center_norm")
KOLEO_METRIC = "koleo"  # logged after METRIC_NAMES when dino.koleo_weight > 0


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
        engine, teacher, dino_loss, ema: as built by ``dino_fast.engine.build_training``.
        cfg: the run config (optim.clip_grad, optim.freeze_last_layer, model.compile, dino.koleo_weight).
        precision: "bf16" (the teacher runs under bf16 autocast, as DeepSpeed runs the student) or "fp32".
    """

    def __init__(self, engine, teacher: torch.nn.Module, dino_loss, ema, cfg, *, precision: str):
        self.engine, self.teacher, self.dino_loss, self.ema, self.cfg = engine, teacher, dino_loss, ema, cfg
        self.device = dino_loss.center.device
        self.teacher_ctx = ((lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if precision == "bf16"
                            else contextlib.nullcontext)
        self.koleo_weight = cfg.dino.koleo_weight
        self.metric_names = METRIC_NAMES + ((KOLEO_METRIC,) if self.koleo_weight else ())
        self._host = ([torch.empty(len(self.metric_names), pin_memory=True) for _ in range(3)]
                      if self.device.type == "cuda" else None)
        self._calls = 0

    # ---- where the schedule values enter (the CUDA-graph step reads them on the device instead)
    def set_values(self, values: StepValues) -> None:
        """Schedules → the optimizer's param groups: lr for every group, weight decay for the regularised one."""
        for i, group in enumerate(self.engine.optimizer.param_groups):
            group["lr"] = values.lr
            if i == 0:  # the regularised group only
                group["weight_decay"] = values.wd

    def optimizer_step(self) -> None:
        self.engine.step()

    def teacher_ema(self, values: StepValues) -> None:
        self.ema.update(values.momentum)

    # ---- the parts of one iteration
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
            self.dino_loss.apply_center_update()  # the last step's, all-reduced while this step's forwards ran
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
        """Backward → per-parameter clip → last-layer freeze → optimizer step → teacher EMA."""
        with record_function("dino:backward"):
            self.engine.backward(loss)
        with record_function("dino:clip"):
            if self.cfg.optim.clip_grad > 0:
                clip_gradients(self.engine.module, self.cfg.optim.clip_grad)
            if values.epoch < self.cfg.optim.freeze_last_layer:
                cancel_last_layer_grads(self.engine.module)
        with record_function("dino:optimizer_step"):
            self.optimizer_step()
        with record_function("dino:teacher_ema"):
            self.teacher_ema(values)

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
