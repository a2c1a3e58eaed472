"""DINOLoss against an independent float64 computation of the spec's pair sum, and the center update."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from dino_fast.config import load_config
from dino_fast.loss import DINOLoss
from dino_fast.ops.reference import reference_dino_loss
from dino_fast.schedules import Schedules


def pair_sum_reference(student, teacher, center, t_temp, s_temp, ncrops):
    """The spec literally: Σ_iq Σ_{v≠iq} mean_b(Σ_k −q·log_softmax(s_v)) / n_terms, in float64."""
    return reference_dino_loss(student.double(), teacher.double(), center.double(), t_temp, s_temp, ncrops)[0]


@pytest.mark.parametrize("ncrops, b, k", [(2, 3, 17), (3, 5, 1007), (10, 4, 64), (12, 2, 4096)])
@pytest.mark.parametrize("t_temp", [0.04, 0.07])
def test_loss_and_gradient_match_float64_pair_sum(ncrops, b, k, t_temp):
    g = torch.Generator().manual_seed(ncrops * 1000 + k)
    student = torch.randn(ncrops * b, k, generator=g) * 3
    teacher = torch.randn(2 * b, k, generator=g) * 3
    center = torch.randn(1, k, generator=g)
    loss_fn = DINOLoss(k, ncrops, student_temp=0.1, impl="eager")
    loss_fn.center.copy_(center)
    s = student.clone().requires_grad_(True)
    loss = loss_fn(s, teacher, teacher_temp=t_temp)
    loss.backward()
    s64 = student.double().requires_grad_(True)
    ref = pair_sum_reference(s64, teacher, center, t_temp, 0.1, ncrops)
    ref.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-8)


def test_teacher_temperature_follows_the_epoch_schedule():
    k, ncrops, b = 50, 4, 3
    student, teacher = torch.randn(ncrops * b, k), torch.randn(2 * b, k)
    loss_fn = DINOLoss(k, ncrops)
    cfg = load_config(None, ["dino.warmup_teacher_temp=0.04", "dino.teacher_temp=0.07",
                             "dino.warmup_teacher_temp_epochs=3", "optim.epochs=10", "optim.warmup_epochs=0"])
    schedules = Schedules(cfg, steps_per_epoch=2, global_batch=256)  # the step's values, as the trainer makes them
    for epoch, temp in [(0, 0.04), (1, 0.055), (2, 0.07), (9, 0.07)]:
        loss_fn.center.zero_()
        got = loss_fn(student, teacher, teacher_temp=schedules.at(2 * epoch + 1, epoch).teacher_temp)
        ref = pair_sum_reference(student, teacher, torch.zeros(1, k), temp, 0.1, ncrops)
        torch.testing.assert_close(got.double(), ref, rtol=2e-6, atol=2e-6)


def test_center_update_uses_old_center_then_ema_of_teacher_mean():
    k, b = 33, 4
    teacher = torch.randn(2 * b, k)
    loss_fn = DINOLoss(k, 3)
    old = torch.randn(1, k)
    loss_fn.center.copy_(old)
    student = torch.randn(3 * b, k)
    loss = loss_fn(student, teacher, teacher_temp=0.04)
    torch.testing.assert_close(loss.double(), pair_sum_reference(student, teacher, old, 0.04, 0.1, 3),
                               rtol=2e-6, atol=2e-6)
    expected = 0.9 * old.double() + 0.1 * teacher.double().mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center.double(), expected, rtol=1e-6, atol=1e-7)


def _center_worker(rank, world, port, k, b, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    teacher = torch.arange(2 * b * k, dtype=torch.float32).view(2 * b, k) * (rank + 1) / 100
    loss_fn = DINOLoss(k, 2)
    loss_fn(torch.zeros(2 * b, k), teacher, teacher_temp=0.04)
    out[f"{rank} before"] = loss_fn.center.clone()  # the all-reduce is in flight: the center is the old one
    loss_fn.apply_center_update()  # what the step does before the next read (dinov2's apply_center_update)
    out[rank] = loss_fn.center.clone()
    torch.distributed.destroy_process_group()


def test_center_is_averaged_over_ranks():
    k, b, world = 7, 3, 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_center_worker, args=(world, port, k, b, out), nprocs=world)
    base = torch.arange(2 * b * k, dtype=torch.float64).view(2 * b, k) / 100
    all_rows = torch.cat([base * (r + 1) for r in range(world)])  # every rank's teacher rows
    expected = 0.1 * all_rows.sum(0, keepdim=True) / (2 * b * world)
    for r in range(world):
        assert torch.equal(out[f"{r} before"], torch.zeros(1, k))
        torch.testing.assert_close(out[r].double(), expected, rtol=1e-6, atol=1e-9)


def test_mismatched_shapes_are_rejected_clearly():
    loss_fn = DINOLoss(10, 4)
    with pytest.raises(ValueError, match="ncrops=4"):
        loss_fn(torch.randn(10, 10), torch.randn(4, 10), teacher_temp=0.04)
