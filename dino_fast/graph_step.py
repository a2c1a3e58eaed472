"""The whole DINO step as one CUDA graph (``train.cuda_graph=true``): captured once, replayed every iteration.

Crops have static shapes, so teacher forward, student forward, loss, health metrics, backward, per-parameter
clipping, the last-layer freeze, the fused AdamW step (``capturable=True``, lr a device tensor), the decoupled weight
decay, the teacher EMA and the centre update are recorded once and then launched as one graph: the host's cost per
step drops from one launch per op to a few copies and one replay. lr, weight decay and momentum are read from the
step's device table (:class:`dino_fast.step.DINOStep` with ``device_values``), so replays follow the schedules.

What is captured where:

- one GPU, ZeRO-0 (the default): the whole step as above;
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
from dino_fast.step import DINOStep, Schedules, StepMetrics, StepValues

FIX = "set train.cuda_graph=false (model.compile=true model.compile_mode=reduce-overhead graphs the backbones only)"


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


class CudaGraphStep(DINOStep):
    """:class:`DINOStep` whose iteration is captured once as a CUDA graph and replayed (see the module docstring).

    The first call for a new (teacher temperature, freeze, crop shapes) key runs eagerly on a side stream (a real
    step, which also warms up cuBLAS, Triton and the optimizer state), the second captures and replays.
    """

    def __init__(self, engine, teacher: torch.nn.Module, dino_loss, ema, cfg, *, precision: str,
                 schedules: Schedules, world: int = 1):
        check_graphable(dino_loss.center.device, world, cfg.deepspeed.zero_stage)
        for group in engine.optimizer.param_groups:
            group["capturable"] = True  # AdamW's step counters live on the device and are read there
        super().__init__(engine, teacher, dino_loss, ema, cfg, precision=precision, schedules=schedules,
                         device_values=True)
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
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
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
        self.set_values(values)  # this iteration's row of the device table, outside the graph
        self._graph.replay()
        return self._metrics(self._static_metrics)
