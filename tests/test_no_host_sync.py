"""The step never waits for the device: proven on CPU with a guard that turns every host read of a device value and
every synchronisation into an error (tests/host_sync.py).

Covered: the eager step object and the body the whole-step CUDA graph captures (the device-values path with capturable
optimizer groups), for the reference recipe, the demo recipe (Sinkhorn-Knopp targets, KoLeo) and a Sinkhorn-Knopp
queue, in fp32 and bf16, with packed crops, over 6 real steps: past DeepSpeed's throughput-timer start, across the end
of the last-layer freeze and through the teacher-temperature warm-up. The metrics are read one step late, outside the
guarded step, as the trainer reads them.
"""

from __future__ import annotations

import pytest
import torch

from dino_fast.engine import init_distributed
from dino_fast.graph_step import DeviceValuesStep
from dino_fast.schedules import Schedules
from dino_fast.step import DINOStep

from host_sync import HostSyncError, no_host_sync
from runs import cpu_training, random_crops

DEMO = "dino_fast/configs/demo.yaml"
STEPS, STEPS_PER_EPOCH = 6, 2
# drop-path, clipping that bites, a one-epoch last-layer freeze and a two-epoch τt warm-up: every branch of the step
EXTRA = ["model.drop_path_rate=0.1", "optim.clip_grad=0.05", "optim.lr=0.05", "optim.freeze_last_layer=1",
         "dino.warmup_teacher_temp=0.02", "dino.warmup_teacher_temp_epochs=2", "optim.epochs=3", "optim.total_steps=0"]
RECIPES = {
    "reference": (None, []),
    "demo": (DEMO, []),  # Sinkhorn-Knopp targets and KoLeo, the demo's momentum and temperatures
    "sinkhorn-queue": (None, ["dino.centering=sinkhorn_knopp", "dino.sinkhorn_queue=20"]),
    "packed": (None, ["model.packed_crops=true"]),
}


def _run_guarded(recipe: str, precision: str, path: str, tiny_overrides: list[str]) -> list[float]:
    config, extra = RECIPES[recipe]
    cfg, engine, teacher, dino_loss, ema = cpu_training(tiny_overrides + EXTRA + extra +
                                                        [f"deepspeed.precision={precision}"], config, precision)
    schedules = Schedules(cfg, STEPS_PER_EPOCH, cfg.data.batch_size_per_gpu)
    if path == "eager":
        step = DINOStep(engine, teacher, dino_loss, ema, cfg, precision=precision)
    else:  # what train.cuda_graph=true records once and replays: values read on the device, capturable AdamW
        step = DeviceValuesStep(engine, teacher, dino_loss, ema, cfg, precision=precision, schedules=schedules)
    losses, pending = [], None
    for it in range(STEPS):
        crops = random_crops(cfg, it)
        with no_host_sync():
            metrics = step(crops, schedules.at(it, it // STEPS_PER_EPOCH))
        if pending is not None:  # one step late, outside the step: allowed
            losses.append(pending.read()["loss"])
        pending = metrics
    losses.append(pending.read()["loss"])
    return losses


@pytest.mark.parametrize("path", ["eager", "graph-body"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_the_step_never_waits_for_the_device(recipe, precision, path, tiny_overrides):
    losses = _run_guarded(recipe, precision, path, tiny_overrides)
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    assert len(set(losses)) > 1  # real steps: the loss moves


def test_the_guard_catches_each_kind_of_host_read():
    """Each way the host can wait for the device raises inside the guard (and works again after it)."""
    t = torch.ones(3)
    reads = {
        "item": lambda: t.sum().item(),
        "float()": lambda: float(t[0]),
        "bool()": lambda: bool(t[0] > 0),
        "int()": lambda: int(t[0]),
        "equal": lambda: torch.equal(t, t),
        "nonzero": lambda: t.nonzero(),
        "boolean mask": lambda: t[t > 0],
        "tolist": lambda: t.tolist(),
        "cpu": lambda: t.cpu(),
        "numpy": lambda: t.numpy(),
        "to cpu": lambda: t.to("cpu"),
        "repeat_interleave by a tensor": lambda: t.repeat_interleave(torch.tensor([1, 2, 1])),
        "torch.cuda.synchronize": lambda: torch.cuda.synchronize(),
        "DeepSpeed synchronize": lambda: __import__("deepspeed.accelerator").accelerator.get_accelerator()
        .synchronize(),
    }
    for what, read in reads.items():
        with pytest.raises(HostSyncError), no_host_sync():
            read()
            pytest.fail(f"{what} passed the guard")
    with no_host_sync():  # device work that reads nothing back is fine
        (t * 2).add_(1).to(torch.float64)
        t[torch.tensor([2, 0])].clone()[torch.tensor([1])] = 3.0  # integer indices gather/scatter on the device
        torch._foreach_lerp_([t.clone()], [t], [torch.tensor(0.5)])
    assert t.tolist() == [1.0, 1.0, 1.0] and float(t[0]) == 1.0  # restored


def test_ranks_agree_on_the_host_even_when_the_default_group_is_nccl(monkeypatch):
    """On GPUs the default group is NCCL, whose all-reduce is queued on the device and read back with a sync; the
    stop agreement (dino_fast.dist.any_rank) then runs in a gloo group of its own, on the host."""
    import torch.distributed as tdist

    from dino_fast import dist

    init_distributed()
    assert dist.control_group() is tdist.group.WORLD  # CPU: the default group is gloo already
    monkeypatch.setattr(dist, "_control_group", None)
    monkeypatch.setattr(tdist, "get_backend", lambda *a, **k: "nccl")
    group = dist.control_group()
    assert group is not tdist.group.WORLD
    monkeypatch.undo()
    assert tdist.get_backend(group) == "gloo" and tdist.get_world_size(group) == tdist.get_world_size()


@pytest.mark.parametrize("stage", [1, 2])
def test_under_zero_the_one_host_read_per_step_is_deepspeeds_gradient_norm_check(stage, tiny_overrides):
    """What remains host-driven under ZeRO 1/2 (docs/host-driven.md), pinned: DeepSpeed's optimizer step checks the
    gradient norm for inf/NaN with one ``bool(...)`` per step; nothing of ours reads the device. (Its
    ``.to(current_device)`` of each norm is a copy on CPU only: on a GPU the norm is on the device already.)"""
    cfg, engine, teacher, dino_loss, ema = cpu_training(tiny_overrides + EXTRA + [f"deepspeed.zero_stage={stage}"])
    schedules = Schedules(cfg, STEPS_PER_EPOCH, cfg.data.batch_size_per_gpu)
    step = DINOStep(engine, teacher, dino_loss, ema, cfg, precision="fp32")
    found: list[str] = []
    for it in range(STEPS):
        crops = random_crops(cfg, it)
        with no_host_sync(found):
            step(crops, schedules.at(it, it // STEPS_PER_EPOCH))
    reads = [f for f in found if "Tensor.to(cpu)" not in f or "deepspeed/runtime/zero" not in f]
    assert len(reads) == STEPS and all("is_invalid_grad_norm" in f for f in reads), reads
