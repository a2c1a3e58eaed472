"""The memory levers: activation checkpointing of the student (model.grad_checkpointing) and DeepSpeed's optimizer
offload (deepspeed.offload_optimizer) train the weights of the run without them."""

from __future__ import annotations

import pytest
import torch

from dino_fast.config import ConfigError, load_config
from dino_fast.schedules import Schedules
from dino_fast.step import DINOStep
from dino_fast.train import train

from runs import ckpt_dir, cpu_training, random_crops, student_state

STEPS, STEPS_PER_EPOCH = 3, 2
# drop-path (replayed in the recomputation), clipping that bites, the end of the last-layer freeze at step 3
EXTRA = ["model.drop_path_rate=0.2", "optim.clip_grad=0.05", "optim.lr=0.05", "optim.freeze_last_layer=1",
         "deepspeed.precision=fp32"]


class _SavedActivations:
    """Counts the bytes autograd saves for the backward pass (what activation checkpointing cuts)."""

    def __init__(self):
        self.bytes = 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.bytes += t.numel() * t.element_size()
        return t


def _train_steps(overrides: list[str]):
    cfg, engine, teacher, dino_loss, ema = cpu_training(overrides)
    schedules = Schedules(cfg, STEPS_PER_EPOCH, cfg.data.batch_size_per_gpu)
    step = DINOStep(engine, teacher, dino_loss, ema, cfg, precision="fp32")
    saved, losses = _SavedActivations(), []
    for it in range(STEPS):
        with saved.hooks:
            losses.append(step(random_crops(cfg, it), schedules.at(it, it // STEPS_PER_EPOCH)).read()["loss"])
    return losses, engine.module.state_dict(), teacher.state_dict(), saved.bytes


@pytest.mark.parametrize("packed", [False, True], ids=["per-resolution", "packed"])
def test_grad_checkpointing_trains_the_same_weights_and_saves_fewer_activations(packed, tiny_overrides):
    base = tiny_overrides + EXTRA + ["model.depth=3", f"model.packed_crops={str(packed).lower()}"]
    plain = _train_steps(base)
    ckpt = _train_steps(base + ["model.grad_checkpointing=true"])
    assert ckpt[0] == pytest.approx(plain[0], rel=1e-6, abs=1e-7)
    for a, b in ((plain[1], ckpt[1]), (plain[2], ckpt[2])):
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)
    assert any(not torch.equal(plain[1][k], plain[2][k]) for k in plain[2])  # the student moved off the teacher
    # Only each block's input is kept (and recomputed from): far less than every intermediate of 3 blocks.
    assert ckpt[3] < 0.6 * plain[3], (ckpt[3], plain[3])


def test_optimizer_offload_trains_the_weights_of_zero_without_it(tiny_overrides, tmp_path):
    """DeepSpeed's CPU offload with the trainer's torch AdamW, per-parameter clipping (0.01 clips every gradient)
    and the last-layer freeze ending mid-run (2-step epochs), against the same ZeRO stage without offload."""
    common = tiny_overrides + ["optim.max_steps=4", "optim.lr=0.05", "optim.warmup_epochs=0", "optim.clip_grad=0.01",
                               "optim.freeze_last_layer=1", "data.batch_size_per_gpu=48", "checkpoint.every_steps=0"]
    states = {}
    for name, extra in {"zero1": [], "zero1-offload": ["deepspeed.offload_optimizer=cpu"],
                        "zero2-offload": ["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=cpu"]}.items():
        run = tmp_path / name
        stage = ["deepspeed.zero_stage=1"] if "zero2" not in name else []
        train(load_config(None, common + stage + extra + [f"checkpoint.output_dir={run}"]))
        states[name] = (student_state(ckpt_dir(run, 4)), torch.load(ckpt_dir(run, 4) / "teacher.pt"))
    for name in ("zero1-offload", "zero2-offload"):
        for part, what in ((0, "student"), (1, "teacher")):
            for k, v in states["zero1"][part].items():
                torch.testing.assert_close(states[name][part][k], v, rtol=1e-6, atol=1e-7, msg=f"{name} {what} {k}")
    assert torch.load(ckpt_dir(tmp_path / "zero1", 4) / "dino_state.pt")["epoch"] == 2  # past the freeze's epoch


def test_offload_without_zero_is_a_one_line_error():
    with pytest.raises(ConfigError, match="offload_optimizer=cpu needs deepspeed.zero_stage=1 or 2"):
        load_config(None, ["deepspeed.offload_optimizer=cpu"])
    with pytest.raises(ConfigError, match="not one of none, cpu"):
        load_config(None, ["deepspeed.zero_stage=1", "deepspeed.offload_optimizer=nvme"])
