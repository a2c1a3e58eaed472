"""The step object (dino_fast/step.py) against the train step it replaced, its device-values path, and the trainer's
non-finite stop with metrics read one step late."""

from __future__ import annotations

import math

import pytest
import torch

from dino_fast.checkpoint import state_is_finite
from dino_fast.config import load_config
from dino_fast.engine import build_training, init_distributed
from dino_fast.graph_step import DeviceValuesStep
from dino_fast.health import health_metrics
from dino_fast.optim import cancel_last_layer_grads, clip_gradients
from dino_fast.schedules import Schedules
from dino_fast.step import METRIC_NAMES, DINOStep

import faults
from runs import ckpt_dir, cpu_training, random_crops, run_main, student_state


def reference_train_step(engine, teacher, dino_loss, ema, crops, *, epoch, lr, wd, momentum, teacher_temp,
                         cfg) -> dict[str, float]:
    """The trainer's step before the step object (dino_fast/train.py's ``train_step``, fp32, kept here as the
    independent reference): schedules into the param groups, forward, loss, one host sync, backward, clip, freeze,
    AdamW, EMA."""
    for i, group in enumerate(engine.optimizer.param_groups):
        group["lr"] = lr
        if i == 0:
            group["weight_decay"] = wd
    with torch.no_grad():
        teacher_out = teacher(crops[:2])
    student_out = engine(crops)
    center = dino_loss.center.clone()
    loss = dino_loss(student_out, teacher_out, teacher_temp=teacher_temp)
    health = health_metrics(None, teacher_out, center, teacher_temp, dino_loss.student_temp, dino_loss.ncrops,
                            loss=loss)
    out = dict(zip(["loss", *health], torch.stack([loss.detach().float(), *health.values()]).tolist()))
    if not math.isfinite(out["loss"]):
        raise RuntimeError(f"loss {out['loss']}")
    engine.backward(loss)
    if cfg.optim.clip_grad > 0:
        clip_gradients(engine.module, cfg.optim.clip_grad)
    if epoch < cfg.optim.freeze_last_layer:
        cancel_last_layer_grads(engine.module)
    engine.step()
    ema.update(momentum)
    return out


# Three steps across the end of the one-epoch last-layer freeze (steps_per_epoch 2), with drop-path, clipping that
# bites and a warm-up lr: every branch of the step runs.
STEPS_PER_EPOCH, ITERS = 2, (0, 1, 2)
EXTRA = ["model.drop_path_rate=0.1", "optim.clip_grad=0.05", "optim.lr=0.05", "optim.freeze_last_layer=1",
         "dino.warmup_teacher_temp=0.02", "dino.warmup_teacher_temp_epochs=2"]


def _final_state(engine, teacher, dino_loss) -> tuple[dict, dict, torch.Tensor]:
    return ({k: v.clone() for k, v in engine.module.state_dict().items()},
            {k: v.clone() for k, v in teacher.state_dict().items()}, dino_loss.center.clone())


def _assert_same(a, b, what: str) -> None:
    for part_a, part_b, name in zip(a[:2], b[:2], ("student", "teacher")):
        assert part_a.keys() == part_b.keys()
        for k in part_a:
            torch.testing.assert_close(part_b[k], part_a[k], rtol=1e-6, atol=1e-7, msg=f"{what}: {name} {k}")
    torch.testing.assert_close(b[2], a[2], rtol=1e-6, atol=1e-7, msg=f"{what}: center")


def test_step_object_follows_the_old_train_step(tiny_overrides):
    overrides = tiny_overrides + EXTRA
    cfg, engine, teacher, dino_loss, ema = cpu_training(overrides)
    start = {k: v.clone() for k, v in teacher.state_dict().items()}
    schedules = Schedules(cfg, STEPS_PER_EPOCH, cfg.data.batch_size_per_gpu)
    ref_metrics = []
    for it in ITERS:
        v = schedules.at(it, it // STEPS_PER_EPOCH)
        ref_metrics.append(reference_train_step(engine, teacher, dino_loss, ema, random_crops(cfg, it), epoch=v.epoch,
                                                lr=v.lr, wd=v.wd, momentum=v.momentum,
                                                teacher_temp=v.teacher_temp, cfg=cfg))
    reference = _final_state(engine, teacher, dino_loss)

    cfg, engine, teacher, dino_loss, ema = cpu_training(overrides)
    step = DINOStep(engine, teacher, dino_loss, ema, cfg, precision="fp32")
    metrics = [step(random_crops(cfg, it), schedules.at(it, it // STEPS_PER_EPOCH)) for it in ITERS]
    _assert_same(reference, _final_state(engine, teacher, dino_loss), "step object")
    for ref, got in zip(ref_metrics, metrics):
        values = got.read()
        assert list(values) == list(METRIC_NAMES)
        for k in METRIC_NAMES:
            assert values[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-7), k
    # The weights moved, and the last layer stayed frozen in epoch 0 only (steps 1-2), then trained.
    assert any(not torch.equal(start[k], reference[1][k]) for k in start)
    assert dino_loss.center.abs().sum() > 0


@pytest.mark.parametrize("ema_impl", ["foreach", "triton"])
def test_device_value_schedules_give_the_weights_of_float_schedules(ema_impl, tiny_overrides):
    """The CUDA graph's body: lr / weight decay / momentum read from device tables (lr a tensor in capturable AdamW,
    the decoupled decay applied by the step, the EMA's momentum read by the lerp or the Triton kernels) trains the same
    weights as floats in the param groups."""
    overrides = tiny_overrides + EXTRA + [f"dino.ema_impl={ema_impl}"]
    states = {}
    for device_values in (False, True):
        cfg, engine, teacher, dino_loss, ema = cpu_training(overrides)
        schedules = Schedules(cfg, STEPS_PER_EPOCH, cfg.data.batch_size_per_gpu)
        step = (DeviceValuesStep(engine, teacher, dino_loss, ema, cfg, precision="fp32", schedules=schedules)
                if device_values else DINOStep(engine, teacher, dino_loss, ema, cfg, precision="fp32"))
        for it in ITERS:
            if device_values and it == 1:  # what a resume does: the param groups' lr / weight decay are replaced
                saved = engine.optimizer.state_dict()
                saved["param_groups"][0].update(lr=0.5, weight_decay=0.3)
                engine.optimizer.load_state_dict(saved)
            step(random_crops(cfg, it), schedules.at(it, it // STEPS_PER_EPOCH))
        states[device_values] = _final_state(engine, teacher, dino_loss)
        if device_values:
            assert isinstance(engine.optimizer.param_groups[0]["lr"], torch.Tensor)
            assert engine.optimizer.param_groups[0]["weight_decay"] == 0.0
    _assert_same(states[False], states[True], "device values")


def test_device_values_are_refused_under_zero(tiny_overrides):
    cfg, engine, teacher, dino_loss, ema = cpu_training(tiny_overrides + ["deepspeed.zero_stage=1"])
    schedules = Schedules(cfg, 2, 8)
    with pytest.raises(ValueError, match="zero_stage=0"):
        DeviceValuesStep(engine, teacher, dino_loss, ema, cfg, precision="fp32", schedules=schedules)


def test_state_is_finite_sees_nan_and_inf_but_not_large_weights():
    net = torch.nn.Linear(4, 4)
    assert state_is_finite(net)
    with torch.no_grad():
        net.weight.fill_(3e38)  # its sum of squares would overflow fp32; the weights are finite
    assert state_is_finite(net)
    assert not state_is_finite(net, extra=(torch.tensor([1.0, float("inf")]),))
    with torch.no_grad():
        net.bias[2] = float("nan")
    assert not state_is_finite(net)


@pytest.mark.parametrize("every", [1, 0], ids=["checkpoint-every-step", "no-checkpoint-after-it"])
def test_a_late_nan_stops_with_code_3_and_every_checkpoint_is_finite(every, tiny_overrides, tmp_path, capsys,
                                                                     monkeypatch):
    """Step 3's crops are NaN (a fault injected into the loader, tests/faults.py) on a real run: its loss and,
    through its update, every weight go NaN. The trainer reads step 3's metrics one step late, or before the
    checkpoint right after it, and stops with exit code 3 naming step 3; no checkpoint holds the NaN state."""
    run = tmp_path / "run"
    faults.inject(monkeypatch, "nan@3")
    code, err = run_main(tiny_overrides + [f"checkpoint.output_dir={run}", "optim.max_steps=8",
                                           f"checkpoint.every_steps={every}"], capsys)
    assert code == 3, err
    assert "loss is nan at step 3 (epoch 0)" in err and "stopped without checkpointing it" in err
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert kept == (["step_00000001", "step_00000002"] if every else [])
    assert f"Last good checkpoint: {run / 'checkpoints' / kept[-1] if kept else 'none'}" in err
    for name in kept:
        ckpt = run / "checkpoints" / name
        teacher = torch.load(ckpt / "teacher.pt")
        tensors = [*teacher.values(), *student_state(ckpt).values(), torch.load(ckpt / "dino_state.pt")["center"]]
        assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()), name
    steps = [line for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert ['"step":1,' in steps[0], '"step":2,' in steps[1], len(steps)] == [True, True, 2]  # step 3 not logged
    assert ckpt_dir(run, 3).exists() is False


@pytest.mark.parametrize("overrides, message", [
    (["deepspeed.zero_stage=1"], "train.cuda_graph=true needs deepspeed.zero_stage=0"),
    (["model.compile=true", "model.compile_mode=reduce-overhead"], "use model.compile_mode=default with it"),
])
def test_cuda_graph_config_conflicts_are_refused(overrides, message):
    from dino_fast.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, ["train.cuda_graph=true", *overrides])
    load_config(None, overrides)  # each setting alone is fine


def test_cuda_graph_on_cpu_is_a_one_line_error(tiny_overrides, capsys):
    code, err = run_main(tiny_overrides + ["train.cuda_graph=true"], capsys)
    assert code == 2 and err.strip().count("\n") == 0
    assert "train.cuda_graph=true needs a CUDA GPU (this run is on cpu); set train.cuda_graph=false" in err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs in benchmarks/gpu/gpu_check.sh)")
def test_cuda_graph_step_follows_the_eager_step(tiny_overrides):
    """On a GPU: 5 steps of the whole-step graph (an eager warm-up step, a capture, replays, a recapture when the
    last-layer freeze ends) train the weights of the eager step object; fp32 and no drop-path, so no draw differs."""
    from dino_fast.graph_step import CudaGraphStep

    overrides = tiny_overrides + EXTRA + ["model.drop_path_rate=0", "deepspeed.precision=fp32"]
    device = torch.device("cuda")
    states = {}
    for graphed in (False, True):
        init_distributed()
        cfg = load_config(None, overrides)
        engine, teacher, dino_loss, ema = build_training(cfg, device, 1, "fp32")
        schedules = Schedules(cfg, 3, cfg.data.batch_size_per_gpu)
        step = (CudaGraphStep(engine, teacher, dino_loss, ema, cfg, precision="fp32", schedules=schedules)
                if graphed else DINOStep(engine, teacher, dino_loss, ema, cfg, precision="fp32"))
        metrics = [step([c.to(device) for c in random_crops(cfg, it)], schedules.at(it, it // 3)) for it in range(5)]
        states[graphed] = (_final_state(engine, teacher, dino_loss), [m.read()["loss"] for m in metrics])
        if graphed:
            assert step.captures == 2  # epoch 0 (frozen last layer, τt warm-up), then epoch 1
    for k, v in states[False][0][0].items():
        torch.testing.assert_close(states[True][0][0][k], v, rtol=1e-4, atol=1e-6, msg=k)
    for k, v in states[False][0][1].items():
        torch.testing.assert_close(states[True][0][1][k], v, rtol=1e-4, atol=1e-6, msg=k)
    assert states[True][1] == pytest.approx(states[False][1], rel=1e-4)
