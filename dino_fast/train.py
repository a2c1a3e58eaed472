"""DINO training with DeepSpeed: ``deepspeed dino_fast/train.py --config <yaml> [key=value ...]``.

Also runs as a single process without a launcher (``python -m dino_fast.train ...``). Device and communication
backend come from DeepSpeed's accelerator (CUDA + NCCL on GPUs, CPU + gloo/shared memory without one).

The loop, per iteration: schedules → teacher forward (globals) → student forward (all crops) → loss → backward
→ per-parameter clip → last-layer freeze → optimizer step → teacher EMA → log → checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the deepspeed launcher: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from torch.profiler import record_function

from dino_fast.attention import periodic_attention
from dino_fast.checkpoint import Checkpointer, CheckpointError, TrainPosition, check_resumable
from dino_fast.config import Config, ConfigError, load_config, save_config
from dino_fast.dist import any_rank
from dino_fast.health import CollapseDetector, health_metrics
from dino_fast.koleo import koleo_loss
from dino_fast.loss import DINOLoss
from dino_fast.models import build_student_teacher
from dino_fast.optim import cancel_last_layer_grads, clip_gradients, param_groups
from dino_fast.progress import Progress
from dino_fast.schedules import cosine_scheduler, momentum_schedule
from dino_fast.summary import summarise_run
from dino_fast.tblog import open_metrics_log
from dino_fast.teacher import TeacherEMA
from dino_fast.weights import init_from_pretrained
from pipelines.build import build_loader
from pipelines.folder import DataError


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; training stops before the step so the last checkpoint stays good."""


class LoaderError(RuntimeError):
    """The data loader failed between steps; every finished step was checkpointed first."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed with the accelerator's backend; (rank, world, local_rank).

    Without a launcher the env variables of a one-process group are filled in, so the same code path runs.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def resolve_precision(cfg: Config, device: torch.device) -> str:
    p = cfg.deepspeed.precision
    if p == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return p


def deepspeed_config(cfg: Config, world_size: int, precision: str) -> dict:
    """The DeepSpeed JSON config derived from ours. bf16 = DeepSpeed's torch autocast: parameters, gradients and
    optimizer stay fp32 (like the reference's fp16 autocast), matmuls run in bf16. No DeepSpeed gradient clipping:
    the reference per-parameter clipping is done by the trainer between backward and step."""
    b = cfg.data.batch_size_per_gpu
    ds = {
        "train_micro_batch_size_per_gpu": b,
        "gradient_accumulation_steps": 1,
        "train_batch_size": b * world_size,
        "steps_per_print": cfg.deepspeed.steps_per_print,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return ds


def build_training(cfg: Config, device: torch.device, world: int, precision: str):
    """Student (owned by a DeepSpeed engine with its AdamW), teacher, loss and EMA, as the trainer uses them.

    Every rank builds the models from the same seed, and the teacher is copied from the student as DeepSpeed
    broadcast it, so all ranks start identical. Returns (engine, teacher, dino_loss, ema).
    """
    import deepspeed

    torch.manual_seed(cfg.seed)
    student, teacher = build_student_teacher(cfg.model, cfg.data.global_crop_size)
    init_from_pretrained(cfg, student)  # model.pretrained: before DeepSpeed copies the weights into its optimizer
    teacher.to(device).eval()
    ncrops = 2 + cfg.data.local_crops_number
    dino_loss = DINOLoss(cfg.model.out_dim, ncrops, cfg.dino.warmup_teacher_temp, cfg.dino.teacher_temp,
                         cfg.dino.warmup_teacher_temp_epochs, cfg.optim.epochs, cfg.dino.student_temp,
                         cfg.dino.center_momentum, impl=cfg.dino.loss_impl, centering=cfg.dino.centering,
                         sinkhorn_iterations=cfg.dino.sinkhorn_iterations).to(device)
    optimizer = torch.optim.AdamW(param_groups(student), lr=0.0, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                  fused=True)  # one multi-tensor kernel per group (torch has it for CPU and CUDA)
    engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer,
                                           config=deepspeed_config(cfg, world, precision))
    # With one rank and no ZeRO, DeepSpeed would still all-reduce every gradient bucket (a copy per bucket on
    # CPU); skip it. Under ZeRO 1/2 that hook is also where gradients move into ZeRO's buffers, so it stays.
    engine.enable_backward_allreduce = world > 1 or cfg.deepspeed.zero_stage > 0
    teacher.load_state_dict(engine.module.state_dict())
    ema = TeacherEMA(teacher, engine.module, impl=cfg.dino.ema_impl)
    if cfg.model.compile:
        # In place (nn.Module.compile): parameter names, checkpoints, the EMA and export are unchanged. Static
        # shapes: one graph per crop resolution (and per k-NN batch shape), no symbolic sizes in the kernels.
        # mode=reduce-overhead replays each graph (forward and backward, per resolution) as a CUDA graph: the ~1,300
        # kernel launches of a ViT-S/16 step's backbones cost one launch each graph instead.
        engine.module.backbone.compile(dynamic=False, mode=cfg.model.compile_mode)
        teacher.backbone.compile(dynamic=False, mode=cfg.model.compile_mode)
    return engine, teacher, dino_loss, ema


def train(cfg: Config) -> dict:
    """Run training as configured; returns the last step's metrics."""
    from deepspeed.accelerator import get_accelerator

    rank, world, local_rank = init_distributed()
    acc = get_accelerator()
    device = torch.device(acc.device_name(local_rank) if acc.device_name() != "cpu" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    precision = resolve_precision(cfg, device)
    out_dir = Path(cfg.checkpoint.output_dir)

    # ---- data
    loader = build_loader(cfg.data, rank=rank, world_size=world, seed=cfg.seed, device=device)
    steps_per_epoch = loader.steps_per_epoch
    total_steps = cfg.optim.epochs * steps_per_epoch
    if cfg.optim.max_steps:
        total_steps = min(total_steps, cfg.optim.max_steps)

    # ---- models, loss, optimizer, engine
    engine, teacher, dino_loss, ema = build_training(cfg, device, world, precision)
    torch.manual_seed(cfg.seed + rank)  # same init everywhere, per-rank drop-path noise from here on
    np.random.seed(cfg.seed + rank)

    # ---- schedules (per iteration; lr scaled by the global batch)
    global_batch = cfg.data.batch_size_per_gpu * world
    lr_s = cosine_scheduler(cfg.optim.lr * global_batch / 256.0, cfg.optim.min_lr, cfg.optim.epochs, steps_per_epoch,
                            cfg.optim.warmup_epochs)
    wd_s = cosine_scheduler(cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.optim.epochs, steps_per_epoch)
    mom_s = momentum_schedule(cfg.dino.momentum_teacher, cfg.optim.epochs, steps_per_epoch)

    # ---- resume
    ckpt = Checkpointer(out_dir, cfg.checkpoint.keep_last)
    pos = TrainPosition(0, 0, 0)
    resume_from = ckpt.resolve(cfg.checkpoint.resume)
    if resume_from is not None:
        check_resumable(resume_from, cfg, world, steps_per_epoch)
        pos = Checkpointer.load(resume_from, engine, teacher, dino_loss)
        if pos.step_in_epoch >= steps_per_epoch:  # the dataset shrank since: that epoch is done
            pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0
    saved_step = pos.global_step  # the newest step a checkpoint holds (0: none yet, nothing to keep)

    progress = Progress(cfg.logging.progress if rank == 0 else "none", total_steps, cfg.logging.print_every)
    metrics = open_metrics_log(cfg, out_dir) if rank == 0 else None  # metrics.jsonl (+ TensorBoard)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        progress.info(
            f"dino_fast: {world} rank(s) on {device.type} ({acc.communication_backend_name()}), precision {precision}, "
            f"ZeRO-{cfg.deepspeed.zero_stage}, loss={dino_loss.impl}, ema={ema.impl}, data={cfg.data.backend}, "
            f"{f'compiled backbones ({cfg.model.compile_mode}), ' if cfg.model.compile else ''}"
            f"{steps_per_epoch} steps/epoch × {cfg.optim.epochs} epochs, global batch {global_batch}, "
            f"output {out_dir.resolve()}"
            + (f", resumed from {resume_from}" if resume_from else "")
        )

    def save() -> None:
        nonlocal saved_step
        ckpt.save(engine, teacher, dino_loss, pos, cfg, steps_per_epoch)
        saved_step = pos.global_step

    collapse = CollapseDetector(cfg.model.out_dim, warmup_steps=cfg.optim.warmup_epochs * steps_per_epoch)
    stop = {"signal": None}

    def request_stop(signum, _frame):  # finish the current step, checkpoint, exit; a second Ctrl-C quits at once
        if signum == signal.SIGINT and stop["signal"] == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if stop["signal"] is None:  # the first one names the stop (a launcher may follow Ctrl-C with SIGTERM)
            stop["signal"] = signum

    old_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    teacher_ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else (
        contextlib.nullcontext)
    last: dict = {}
    images_seen, t_start = 0, time.perf_counter()
    batches = None
    try:
        if cfg.eval.knn_at_start and pos.global_step == 0:
            knn = periodic_knn(cfg, teacher, device, rank, world)
            if metrics is not None:
                metrics.write({"step": 0, "epoch": 0, **knn, "time": time.time()})
            progress.info(f"initial k-NN (teacher, k={cfg.eval.knn_k}): top-1 {knn['knn_top1']:.2f}% "
                          f"top-5 {knn['knn_top5']:.2f}%")
        stopping = False
        while pos.global_step < total_steps and not stopping:
            epoch = pos.epoch
            loader.set_epoch(epoch, pos.step_in_epoch)
            engine.train()
            batches = iter(loader)
            steps_before = pos.global_step
            t_prev = time.perf_counter()
            while True:
                # ---- next batch, then all ranks agree whether to go on: a signal or a failed loader on any rank
                # stops every rank here, between steps, where the state is whole and can be checkpointed.
                try:
                    batch, failure = next(batches), None
                except StopIteration:
                    break
                except Exception as exc:  # a worker died or raised (e.g. the OOM killer); the last step is whole
                    batch, failure = None, exc
                # A worker that died with a stop signal (SLURM and launchers signal the whole process tree) is
                # part of that stop, not a failure.
                stopping, failed = any_rank(stop["signal"] is not None, failure is not None and stop["signal"] is None)
                if stopping or failed:
                    if pos.global_step > saved_step:
                        save()
                    if failed:
                        kept = f"every finished step is in checkpoint {ckpt.latest() or 'none'}"
                        if isinstance(failure, DataError):  # the data's fault, said by the loader: exit code 2
                            raise DataError(f"{failure} ({kept}; fix the data and rerun to resume)") from None
                        where = f"{type(failure).__name__}: {failure}" if failure else "on another rank"
                        raise LoaderError(
                            f"the data loader failed before step {pos.global_step + 1} ({where}); {kept}. Rerun the "
                            f"same command to resume; if the kernel's OOM killer ended a worker (see dmesg), lower "
                            f"data.num_workers first"
                        ) from None
                    break
                t_data = time.perf_counter()
                it = epoch * steps_per_epoch + pos.step_in_epoch
                crops = [c.to(device, non_blocking=True) for c in batch.crops]
                try:
                    step_metrics = train_step(engine, teacher, dino_loss, ema, crops, epoch=epoch, lr=lr_s[it],
                                              wd=wd_s[it], momentum=mom_s[it], cfg=cfg, teacher_ctx=teacher_ctx)
                except NonFiniteLossError as exc:
                    raise NonFiniteLossError(
                        f"loss is {exc} at step {pos.global_step + 1} (epoch {epoch}); stopped before the "
                        f"update. Last good checkpoint: {ckpt.latest() or 'none'}. Lower optim.lr, raise "
                        f"optim.warmup_epochs or check the data."
                    ) from None
                # ---- log
                pos.step_in_epoch += 1
                pos.global_step += 1
                if pos.step_in_epoch == steps_per_epoch:
                    pos.epoch, pos.step_in_epoch = epoch + 1, 0
                t_end = time.perf_counter()
                images_seen += global_batch
                last = {
                    "step": pos.global_step, "epoch": epoch, **step_metrics, "lr": float(lr_s[it]),
                    "wd": float(wd_s[it]), "momentum": float(mom_s[it]),
                    "teacher_temp": float(dino_loss.teacher_temp_schedule[epoch]),
                    "img_per_s": global_batch / (t_end - t_prev),
                    "img_per_s_avg": images_seen / (t_end - t_start), "data_wait": (t_data - t_prev) / (t_end - t_prev),
                    "step_time": t_end - t_prev, "time": time.time(),
                }
                if metrics is not None:
                    metrics.write(last)
                progress.update(last)
                warning = collapse.update(pos.global_step, last["teacher_entropy"], last["loss"],
                                          last["teacher_batch_entropy"])
                if warning:
                    progress.warn(warning)
                if stop["signal"] is not None and rank == 0:
                    progress.info(f"signal {stop['signal']}: stopping after step {pos.global_step} with a checkpoint"
                                  + (" (Ctrl-C again quits at once, without it)" if stop["signal"] == signal.SIGINT
                                     else ""))
                # ---- periodic k-NN on the held-out split, then checkpoint
                end_of_epoch = pos.step_in_epoch == 0
                if end_of_epoch and cfg.eval.knn_every_epochs and (epoch + 1) % cfg.eval.knn_every_epochs == 0:
                    knn = periodic_knn(cfg, teacher, device, rank, world)
                    if metrics is not None:
                        metrics.write({"step": pos.global_step, "epoch": epoch, **knn, "time": time.time()})
                    progress.info(f"epoch {epoch} k-NN (teacher, k={cfg.eval.knn_k}): top-1 {knn['knn_top1']:.2f}%"
                                  f" top-5 {knn['knn_top5']:.2f}%")
                every_attn = cfg.eval.attention_every_epochs
                if end_of_epoch and every_attn and (epoch + 1) % every_attn == 0 and rank == 0:
                    png = periodic_attention(cfg, teacher, out_dir, pos.global_step, device, metrics)
                    progress.info(f"epoch {epoch} attention maps: {png}")
                done = pos.global_step >= total_steps
                every = cfg.checkpoint.every_steps
                if end_of_epoch or done or (every and pos.global_step % every == 0):
                    save()
                if done:
                    break
                t_prev = time.perf_counter()
            if pos.global_step == steps_before and not stopping:  # would spin forever on the same position
                raise DataError(f"the {cfg.data.backend} loader yielded no batch for epoch {epoch} from step "
                                f"{pos.step_in_epoch} of {steps_per_epoch}; check data.path and the loader")
    finally:
        if batches is not None and hasattr(batches, "close"):
            batches.close()  # shuts the loader's workers down now, not when an exception's traceback is freed
        progress.close()
        if metrics is not None:
            metrics.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    if rank == 0:
        how = f"stopped by signal {stop['signal']}" if stop["signal"] is not None else "done"
        progress.info(f"{how}: {pos.global_step} steps; checkpoint {ckpt.latest()}; "
                      f"metrics {out_dir / cfg.logging.metrics_file}; output {out_dir.resolve()}")
        if cfg.logging.summary:
            for line in summarise_run(out_dir / cfg.logging.metrics_file, cfg.model.out_dim):
                progress.info(line)
    return last


def periodic_knn(cfg: Config, teacher: torch.nn.Module, device: torch.device, rank: int, world: int) -> dict:
    """Weighted k-NN accuracy of the teacher backbone on the held-out split (every rank takes part)."""
    from dino_fast.knn import evaluate_knn
    from pipelines.build import resolve_data_path

    size = cfg.data.global_crop_size
    results = evaluate_knn(
        teacher.backbone, resolve_data_path(cfg.data, "train"), resolve_data_path(cfg.data, "val"),
        k_list=(cfg.eval.knn_k,), temperature=cfg.eval.knn_temperature, resize=round(size * 256 / 224), crop=size,
        batch_size=2 * cfg.data.batch_size_per_gpu, num_workers=cfg.data.num_workers, device=device,
        train_subset=cfg.eval.knn_train_subset, val_subset=cfg.eval.knn_val_subset, rank=rank, world_size=world,
        progress=False)
    top1, top5 = results[cfg.eval.knn_k]
    return {"knn_top1": top1, "knn_top5": top5}


def train_step(engine, teacher: torch.nn.Module, dino_loss: DINOLoss, ema: TeacherEMA, crops: list[torch.Tensor], *,
               epoch: int, lr: float, wd: float, momentum: float, cfg: Config,
               teacher_ctx=contextlib.nullcontext) -> dict[str, float]:
    """One DINO iteration on crops already on the device; returns the loss and the health metrics as floats.

    Raises NonFiniteLossError (message: the loss value) before any update when the loss is not finite.
    """
    if cfg.model.compile:  # a new iteration: CUDA-graph outputs of the last one may be overwritten from here on
        torch.compiler.cudagraph_mark_step_begin()
    # Each phase is a named profiler range (benchmarks/bench_profile.py splits the step's time by them); outside a
    # profiler a range costs about a microsecond.
    # ---- schedules
    for i, group in enumerate(engine.optimizer.param_groups):
        group["lr"] = lr
        if i == 0:  # the regularised group only
            group["weight_decay"] = wd
    # ---- forward: teacher on the globals, student on every crop
    with record_function("dino:teacher_forward"), torch.no_grad(), teacher_ctx():
        teacher_out = teacher(crops[:2])
    koleo_weight = cfg.dino.koleo_weight
    with record_function("dino:student_forward"):
        student_out = engine(crops, return_backbone=True) if koleo_weight else engine(crops)
        if koleo_weight:  # DINOv2: KoLeo on each global crop's CLS features, added to the DINO loss
            features, student_out = student_out
            koleo = sum(koleo_loss(f) for f in features[: 2 * crops[0].shape[0]].chunk(2))
    with record_function("dino:loss"):
        center = dino_loss.center.clone()  # the center this loss uses (forward updates it)
        targets = dino_loss.sinkhorn_targets(teacher_out, epoch)
        dino = dino_loss(student_out, teacher_out, epoch, targets=targets)
        loss = dino + koleo_weight * koleo if koleo_weight else dino
    with record_function("dino:health_sync"):
        health = health_metrics(None, teacher_out, center, float(dino_loss.teacher_temp_schedule[epoch]),
                                dino_loss.student_temp, dino_loss.ncrops, loss=dino, targets=targets)
        if koleo_weight:
            health["koleo"] = koleo.detach().float()
        # "loss" is the DINO loss (comparable with ln K and the reference); the KoLeo term is logged on its own.
        values = torch.stack([dino.detach().float(), *health.values()]).tolist()  # the step's one host sync
    out = dict(zip(["loss", *health], values))
    for key in ("loss", "koleo"):
        if not math.isfinite(out.get(key, 0.0)):
            raise NonFiniteLossError(str(out[key]) + ("" if key == "loss" else f" ({key})"))
    # ---- backward, clip, freeze, step
    with record_function("dino:backward"):
        engine.backward(loss)
    with record_function("dino:clip"):
        if cfg.optim.clip_grad > 0:
            clip_gradients(engine.module, cfg.optim.clip_grad)
        if epoch < cfg.optim.freeze_last_layer:
            cancel_last_layer_grads(engine.module)
    with record_function("dino:optimizer_step"):
        engine.step()
    # ---- teacher EMA
    with record_function("dino:teacher_ema"):
        ema.update(momentum)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dino_fast.train", description="Train a DINO ViT. Overrides are dotted key=value, e.g. optim.lr=1e-3.")
    parser.add_argument("--config", default=None, help="YAML recipe (dino_fast/configs/*.yaml); overrides only")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg)
        if torch.distributed.is_initialized():  # a clean exit for NCCL/gloo (the process ends here anyway)
            torch.distributed.destroy_process_group()
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(3)
    except LoaderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(4)
    except KeyboardInterrupt:
        print("interrupted (second Ctrl-C): quit without a checkpoint of the current step; the newest checkpoint "
              "is untouched", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
