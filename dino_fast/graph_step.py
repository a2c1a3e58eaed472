"""The whole DINO step as one CUDA graph (``train.cuda_graph=true``): captured once, replayed every iteration.

Crops have static shapes, so teacher forward, student forward, loss, health metrics, backward, per-parameter
clipping, the last-layer freeze, the fused AdamW step (``capturable=True``, lr a device tensor), the decoupled weight
decay, the teacher EMA and the centre update are recorded once and then launched as one graph: the host's cost per
step drops from one launch per op to a few copies and one replay.

Two owners, sharing the maths of :class:`dino_fast.step.DINOStep`:

- :class:`DeviceValuesStep` is the body the graph records. A replay cannot see new Python floats, so lr, weight decay
  and the EMA momentum come from device tables of every iteration's values (:meth:`Schedules.optimizer_table`,
  :meth:`Schedules.ema_table`), one row copied into a static tensor before each replay; AdamW reads lr from it, the
  decoupled weight decay p ← p·(1 − lr·wd) is applied by the step (AdamW's own decay is set to 0) and the EMA reads
  its momentum from it. Nothing in it reads a device value on the host (tests/test_no_host_sync.py).
- :class:`CudaGraphStep` captures that body and replays it.

What is captured where:

- one GPU, ZeRO-0 (the default): the whole step as above;
- networks with BatchNorm (ResNets, XCiT, ``model.use_bn_in_head``) and optimizers other than AdamW: refused with a
  one-line error. BatchNorm updates its running statistics in place each forward and SyncBatchNorm all-reduces
  from the host's bookkeeping; SGD and LARS add their weight decay to the gradient (coupled), which the
  device-values body below does not implement (it applies AdamW's decoupled decay);
- ZeRO 1/2 or several ranks: refused with a one-line error. DeepSpeed's gradient buckets (ZeRO) and its all-reduce
  hooks drive host-side bookkeeping per step, which a replay would skip. The largest region that can be captured
  there is each compiled backbone's forward and backward: ``model.compile=true model.compile_mode=reduce-overhead``.

The graph is captured again (one eager step first, as a capture warm-up) when what it bakes in changes: the teacher
temperature (a Python float given to ``DINOLoss``; once per epoch during its warm-up), the last-layer freeze (once)
and the crop shapes. Every other value changes through device memory. With one rank (the only case captured) the loss
applies the centre update at once, so the update is part of the graph and none is left in flight between replays.
"""

from __future__ import annotations

import torch

from dino_fast.config import ConfigError
from dino_fast.models import has_batchnorm
from dino_fast.schedules import Schedules, StepValues
from dino_fast.step import DINOStep, StepMetrics

FIX = "set train.cuda_graph=false (model.compile=true model.compile_mode=reduce-overhead graphs the backbones only)"


def check_graphable_step(teacher: torch.nn.Module, optimizer) -> None:
    """Raise ConfigError (one line) for a network or optimizer the device-values body does not implement."""
    if has_batchnorm(teacher):
        raise ConfigError("train.cuda_graph=true does not capture BatchNorm (this network has some: a ResNet, XCiT or "
                          "model.use_bn_in_head=true; its running statistics update in place, SyncBatchNorm "
                          f"all-reduces per layer); {FIX}")
    if not isinstance(optimizer, torch.optim.AdamW):
        raise ConfigError(f"train.cuda_graph=true implements AdamW's decoupled weight decay on the device, not "
                          f"{type(optimizer).__name__}'s coupled one; set optim.name=adamw or train.cuda_graph=false")


def check_graphable(device: torch.device, world: int, zero_stage: int) -> None:
    """Raise ConfigError (one line, what to set) where the whole-step graph cannot run."""
    if device.type != "cuda":
        raise ConfigError(f"train.cuda_graph=true needs a CUDA GPU (this run is on {device.type}); set "
                          f"train.cuda_graph=false")
    if world > 1:
        raise ConfigError(f"train.cuda_graph=true runs on one GPU (this run has {world} ranks, whose gradient "
                          f"all-reduce DeepSpeed drives from the host); {FIX}")
    if zero_stage != 0:
        raise ConfigError(f"train.cuda_graph=true needs deepspeed.zero_stage=0 (ZeRO-{zero_stage} keeps gradients "
                          f"in host-managed buckets); {FIX}")


class DeviceValuesStep(DINOStep):
    """:class:`DINOStep` with lr, weight decay and EMA momentum read on the device (the body the CUDA graph records).

    Args:
        schedules: the run's :class:`Schedules`; its tables go to the device once.

    AdamW's groups are marked ``capturable``: its step counters then live on the device and are read there, as a
    capture needs.
    """

    def __init__(self, engine, teacher: torch.nn.Module, dino_loss, ema, cfg, *, precision: str,
                 schedules: Schedules):
        super().__init__(engine, teacher, dino_loss, ema, cfg, precision=precision)
        if cfg.deepspeed.zero_stage != 0 or not isinstance(engine.optimizer, torch.optim.Optimizer):
            raise ValueError("device-tensor schedule values need deepspeed.zero_stage=0 (the optimizer must update "
                             "the module's own parameters)")
        check_graphable_step(teacher, engine.optimizer)
        for group in engine.optimizer.param_groups:
            group["capturable"] = True
        self._optimizer_table = schedules.optimizer_table(self.device)
        self._ema_table = schedules.ema_table(self.device)
        self._now = self._optimizer_table[0].clone()  # lr, wd of the current iteration (static for a CUDA graph)
        self._lr = self._now[0:1].view(())  # a view: one copy into _now updates it
        self._ema_now = self._ema_table[0].clone()  # m, 1 − m
        self._decayed = list(engine.optimizer.param_groups[0]["params"])
        self._bind()

    def _bind(self) -> None:
        """The optimizer reads lr from ``_lr`` and decays nothing itself (the step does); again after a checkpoint
        load replaced the param groups' values."""
        groups = self.engine.optimizer.param_groups
        if groups[0]["lr"] is not self._lr or groups[0]["weight_decay"] != 0.0:
            for g in groups:
                g["lr"] = self._lr
            groups[0]["weight_decay"] = 0.0

    def set_values(self, values: StepValues) -> None:
        """This iteration's rows of the device tables into the static values (device copies, no host sync)."""
        self._bind()
        self._now.copy_(self._optimizer_table[values.it], non_blocking=True)
        self._ema_now.copy_(self._ema_table[values.it], non_blocking=True)

    @torch.no_grad()
    def optimizer_step(self) -> None:
        """AdamW's decoupled weight decay p ← p·(1 − lr·wd) with both values read on the device, then AdamW (lr from
        the device, its own decay 0). Parameters without a gradient this step are skipped, as AdamW skips them."""
        params = [p for p in self._decayed if p.grad is not None]
        if params:
            torch._foreach_mul_(params, 1.0 - self._now[0] * self._now[1])
        self.engine.step()

    def teacher_ema(self, values: StepValues) -> None:
        self.ema.update_on_device(self._ema_now)


class CudaGraphStep(DeviceValuesStep):
    """:class:`DeviceValuesStep` captured once as a CUDA graph and replayed (see the module docstring).

    The first call for a new (teacher temperature, freeze, crop shapes) key runs eagerly on a side stream (a real
    step, which also warms up cuBLAS, Triton and the optimizer state), the second captures and replays.
    """

    def __init__(self, engine, teacher: torch.nn.Module, dino_loss, ema, cfg, *, precision: str,
                 schedules: Schedules, world: int = 1):
        check_graphable_step(teacher, engine.optimizer)  # first: what no device would change
        check_graphable(dino_loss.center.device, world, cfg.deepspeed.zero_stage)
        super().__init__(engine, teacher, dino_loss, ema, cfg, precision=precision, schedules=schedules)
        self._key = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_crops: list[torch.Tensor] = []
        self._static_metrics: torch.Tensor | None = None
        self._pool = torch.cuda.graph_pool_handle()
        self._side = torch.cuda.Stream()
        self.captures = 0

    def _eager_on_side_stream(self, crops: list[torch.Tensor], values: StepValues) -> torch.Tensor:
        self._side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side):
            self.set_values(values)
            loss, metrics = self.forward_losses(crops, values)
            self.backward_update(loss, values)
        torch.cuda.current_stream().wait_stream(self._side)
        return metrics

    def _capture(self, crops: list[torch.Tensor], values: StepValues) -> None:
        self._graph = None
        self._static_crops = [c.clone() for c in crops]
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's threads may allocate on the device while the capture runs; with the default
        # ("global") mode that would invalidate the capture. A sync in this thread still fails it, as it must.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            loss, metrics = self.forward_losses(self._static_crops, values)
            self.backward_update(loss, values)
        self._graph, self._static_metrics = graph, metrics
        self.captures += 1

    def __call__(self, crops: list[torch.Tensor], values: StepValues) -> StepMetrics:
        key = (values.teacher_temp, values.epoch < self.cfg.optim.freeze_last_layer, tuple(c.shape for c in crops))
        if key != self._key:  # a new graph is needed: one eager step now (a real step), the capture next time
            self._key, self._graph = key, None
            return self._metrics(self._eager_on_side_stream(crops, values))
        if self._graph is None:
            self.set_values(values)
            self._capture(crops, values)  # records only: the replay below runs this iteration
        for static, c in zip(self._static_crops, crops):
            if static.data_ptr() != c.data_ptr():
                static.copy_(c, non_blocking=True)
        self.set_values(values)  # this iteration's rows of the device tables, outside the graph
        self._graph.replay()
        return self._metrics(self._static_metrics)
