"""DINO training with DeepSpeed: ``deepspeed dino_fast/train.py --config <yaml> [key=value ...]``.

Also runs as a single process without a launcher (``python -m dino_fast.train ...``). Device and communication
backend come from DeepSpeed's accelerator (CUDA + NCCL on GPUs, CPU + gloo/shared memory without one).

The loop, per iteration: batch → step (``dino_fast/step.py``: schedules → teacher forward (globals) → student forward
(all crops) → loss → backward → per-parameter clip → last-layer freeze → optimizer step → teacher EMA) → log the
previous step → checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
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

from dino_fast.attention import periodic_attention
from dino_fast.checkpoint import Checkpointer, CheckpointError, TrainPosition, check_resumable, state_is_finite
from dino_fast.config import Config, ConfigError, load_config, save_config, with_step_budget
from dino_fast.dist import any_rank, control_group
from dino_fast.health import CollapseDetector
from dino_fast.loss import DINOLoss
from dino_fast.models import build_student_teacher
from dino_fast.optim import param_groups
from dino_fast.progress import format_step
from dino_fast.schedules import Schedules, StepValues
from dino_fast.step import DINOStep, StepMetrics
from dino_fast.summary import summarise_run
from dino_fast.tblog import open_metrics_log
from dino_fast.teacher import TeacherEMA
from dino_fast.weights import init_from_pretrained
from pipelines.build import build_loader
from pipelines.folder import DataError
from pipelines.progress import Progress


class NonFiniteLossError(RuntimeError):
    """The loss (or the weights) became NaN/inf; training stops without checkpointing that state."""


class LoaderError(RuntimeError):
    """The data loader failed between steps; every finished step was checkpointed first."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


_DEEPSPEED_CPU_NOTICES = _DropMessages("Setting accelerator to CPU", "Setting ds_accelerator")
_TORCH_CPU_NOTICES = _DropMessages("No CUDA runtime is found")


def _quiet_cpu_startup() -> None:
    """Keep three lines a CPU run cannot act on out of the output: DeepSpeed's "Setting accelerator to CPU ... unable
    to detect it" (its logger is created on import, so the filter goes on first), torch's "No CUDA runtime is found"
    and the "built successfully" print of DeepSpeed's shared-memory op (in :func:`init_distributed`)."""
    if torch.cuda.is_available():
        return
    logging.getLogger("DeepSpeed").addFilter(_DEEPSPEED_CPU_NOTICES)  # one instance: adding it again is a no-op
    logging.getLogger("torch.utils.cpp_extension").addFilter(_TORCH_CPU_NOTICES)


def shm_op_is_built(extensions_dir: str | None = None) -> bool:
    """Whether DeepSpeed's CPU shared-memory op has been built before, under ``TORCH_EXTENSIONS_DIR`` or torch's
    default build root (one folder per Python and CUDA version there)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(extensions_dir or os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    patterns = ("deepspeed_shm_comm/deepspeed_shm_comm*.so", "*/deepspeed_shm_comm/deepspeed_shm_comm*.so")
    return any(next(root.glob(p), None) is not None for p in patterns)


def init_distributed() -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed with the accelerator's backend; (rank, world, local_rank).

    Without a launcher the env variables of a one-process group are filled in, so the same code path runs.
    """
    _quiet_cpu_startup()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    backend = get_accelerator().communication_backend_name()
    if torch.cuda.is_available():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    else:  # CPU: DeepSpeed builds (or loads) its shared-memory op and prints that it did, on every start
        if os.environ["RANK"] == "0" and not shm_op_is_built():
            print("dino_fast: building DeepSpeed's CPU communication op with g++ (once; about a minute)", flush=True)
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                deepspeed.init_distributed(dist_backend=backend, verbose=False)
        except BaseException:
            sys.stderr.write(out.getvalue())  # what the build said belongs with its error
            raise
    if int(os.environ["WORLD_SIZE"]) > 1:
        control_group()  # made now, at the same point on every rank (a collective)
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
        # DeepSpeed's throughput timer (on by default) synchronises the device at the start of every forward and the
        # end of every engine.step from its third step on: the host would wait for each step, and a CUDA graph
        # capture after step 2 would fail. Our progress line measures throughput without it.
        "timers": {"throughput": {"enabled": False}},
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
    try:
        student, teacher = build_student_teacher(cfg.model, cfg.data.global_crop_size)
    except ValueError as exc:  # an arch that is no (packable) timm ViT: the message names the key to change
        raise ConfigError(str(exc)) from None
    init_from_pretrained(cfg, student)  # model.pretrained: before DeepSpeed copies the weights into its optimizer
    teacher.to(device).eval()
    ncrops = 2 + cfg.data.local_crops_number
    dino_loss = DINOLoss(cfg.model.out_dim, ncrops, cfg.dino.student_temp, cfg.dino.center_momentum,
                         impl=cfg.dino.loss_impl, centering=cfg.dino.centering,
                         sinkhorn_iterations=cfg.dino.sinkhorn_iterations,
                         sinkhorn_queue=cfg.dino.sinkhorn_queue).to(device)
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
        if cfg.model.packed_crops:  # the student's packed pass bypasses backbone.forward: compile that one
            engine.module.packed_fn = torch.compile(engine.module.packed_fn, dynamic=False, mode=cfg.model.compile_mode)
    return engine, teacher, dino_loss, ema


class _Reporter:
    """Logs each step one step late, once its metrics reached the host, and guards every checkpoint.

    ``push`` is called right after a step was queued: it reads the previous step's metrics (that step has finished
    or is about to, while the new one runs), logs them, and keeps the new step pending. A non-finite loss found
    there is remembered in ``bad``; the trainer stops on it at the next point where all ranks agree.
    """

    def __init__(self, cfg: Config, rank: int, total_steps: int, out_dir: Path, global_batch: int,
                 steps_per_epoch: int, start_step: int = 0):
        self.progress = Progress(cfg.logging.progress if rank == 0 else "none", print_every=cfg.logging.print_every)
        self.progress.phase("train", total_steps, done=start_step, unit="steps")
        self.total_steps = total_steps
        self.metrics = open_metrics_log(cfg, out_dir) if rank == 0 else None  # metrics.jsonl (+ TensorBoard)
        self.collapse = CollapseDetector(cfg.model.out_dim, warmup_steps=cfg.optim.warmup_epochs * steps_per_epoch)
        self.global_batch = global_batch
        self.pending: tuple[dict, StepMetrics] | None = None
        self.bad: str | None = None
        self.last: dict = {}
        self.images_seen, self.t_start = 0, time.perf_counter()

    def push(self, pos: TrainPosition, epoch: int, values: StepValues, metrics: StepMetrics, t_prev: float,
             t_data: float) -> None:
        t_end = time.perf_counter()
        self.images_seen += self.global_batch
        record = {
            "step": pos.global_step, "epoch": epoch, "lr": values.lr, "wd": values.wd, "momentum": values.momentum,
            "teacher_temp": values.teacher_temp, "img_per_s": self.global_batch / (t_end - t_prev),
            "img_per_s_avg": self.images_seen / (t_end - self.t_start),
            "data_wait": (t_data - t_prev) / (t_end - t_prev), "step_time": t_end - t_prev, "time": time.time(),
        }
        self.flush()
        self.pending = (record, metrics)

    def flush(self) -> None:
        """Read and log the pending step (waits for that step's device work only)."""
        if self.pending is None:
            return
        (record, metrics), self.pending = self.pending, None
        values = metrics.read()
        for key in ("loss", "koleo"):  # the DINO loss, and the KoLeo term when it is on
            if not math.isfinite(values.get(key, 0.0)):
                what = "loss" if key == "loss" else "KoLeo term"
                self.bad = self.bad or f"{what} is {values[key]} at step {record['step']} (epoch {record['epoch']})"
                return
        self.last = {**record, **values}
        record = {"step": record["step"], "epoch": record["epoch"], **values, **record}  # the old key order
        if self.metrics is not None:
            self.metrics.write(record)
        self.progress.update(record["step"], format_step(record, self.total_steps))
        warning = self.collapse.update(record["step"], record["teacher_entropy"], record["loss"],
                                       record["teacher_batch_entropy"])
        if warning:
            self.progress.warn(warning)

    def log_knn(self, knn: dict, step: int, epoch: int, what: str, k: int) -> None:
        if self.metrics is not None:
            self.metrics.write({"step": step, "epoch": epoch, **knn, "time": time.time()})
        self.progress.info(f"{what} k-NN (teacher, k={k}): top-1 {knn['knn_top1']:.2f}% top-5 {knn['knn_top5']:.2f}%")

    def close(self) -> None:
        self.progress.close()
        if self.metrics is not None:
            self.metrics.close()


def _non_finite_error(bad: str | None, ckpt: Checkpointer) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"{bad or 'the loss or the weights became non-finite on another rank'}; stopped without checkpointing it. "
        f"Last good checkpoint: {ckpt.latest() or 'none'}. Lower optim.lr, raise optim.warmup_epochs or check the data."
    )


def _loader_error(failure: BaseException | None, ckpt: Checkpointer, step: int) -> Exception:
    kept = f"every finished step is in checkpoint {ckpt.latest() or 'none'}"
    if isinstance(failure, DataError):  # the data's fault, said by the loader: exit code 2
        return DataError(f"{failure} ({kept}; fix the data and rerun to resume)")
    where = f"{type(failure).__name__}: {failure}" if failure else "on another rank"
    return LoaderError(f"the data loader failed before step {step} ({where}); {kept}. Rerun the same command to "
                       f"resume; if the kernel's OOM killer ended a worker (see dmesg), lower data.num_workers first")


def _check_knn_split(cfg: Config) -> None:
    from pipelines.build import resolve_data_path

    try:
        resolve_data_path(cfg.data, "val")
    except DataError as exc:
        raise DataError(f"{exc}. The k-NN evaluation (eval.knn_at_start, eval.knn_at_end, eval.knn_every_epochs) "
                        "needs those labelled held-out images: add them, or turn it off with eval.knn_at_start=false "
                        "eval.knn_at_end=false eval.knn_every_epochs=0") from None


def train(cfg: Config) -> dict:
    """Run training as configured; returns the last logged step's metrics.

    The loop, as dinov2's do_train: batch → all ranks agree to go on → step (queued on the device) → log the previous
    step (its metrics have reached the host by now) → k-NN → checkpoint (after reading the newest step's metrics).
    """
    run = _Run(cfg)
    old_handlers = {s: signal.signal(s, _stop_handler(run.stop)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if cfg.eval.knn_at_start and run.pos.global_step == 0:
            run.report.log_knn(periodic_knn(cfg, run.teacher, run.device, run.rank, run.world), 0, 0, "initial",
                               cfg.eval.knn_k)
        while run.pos.global_step < run.total_steps and not run.stopping:
            run.epoch()
        run.report.flush()
    finally:
        run.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    run.goodbye()
    return run.report.last


class _Run:
    """One training run: what :func:`train` builds before the first step, and the parts of its loop."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rank, self.world, local_rank = init_distributed()  # (imports DeepSpeed: first, see _quiet_cpu_startup)
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        device = torch.device(acc.device_name(local_rank) if acc.device_name() != "cpu" else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.device, precision = device, resolve_precision(cfg, device)
        self.out_dir = out_dir = Path(cfg.checkpoint.output_dir)

        # ---- data, models, schedules, the step
        if cfg.eval.knn_at_start or cfg.eval.knn_at_end or cfg.eval.knn_every_epochs:
            _check_knn_split(cfg)  # now, not after the training that the k-NN at the end was to measure
        self.loader = build_loader(cfg.data, rank=self.rank, world_size=self.world, seed=cfg.seed, device=device)
        self.steps_per_epoch = steps_per_epoch = self.loader.steps_per_epoch
        self.cfg = cfg = with_step_budget(cfg, steps_per_epoch)  # optim.total_steps → optim.epochs for this data
        all_steps = cfg.optim.epochs * steps_per_epoch
        self.total_steps = min(all_steps, cfg.optim.max_steps or all_steps)
        engine, teacher, dino_loss, ema = build_training(cfg, device, self.world, precision)
        self.engine, self.teacher, self.dino_loss = engine, teacher, dino_loss
        torch.manual_seed(cfg.seed + self.rank)  # same init everywhere, per-rank drop-path noise from here on
        np.random.seed(cfg.seed + self.rank)
        global_batch = cfg.data.batch_size_per_gpu * self.world
        self.schedules = Schedules(cfg, steps_per_epoch, global_batch)
        self.step = make_step(cfg, engine, teacher, dino_loss, ema, precision, self.schedules, self.world)

        # ---- resume
        self.ckpt = Checkpointer(out_dir, cfg.checkpoint.keep_last)
        self.pos = TrainPosition(0, 0, 0)
        resume_from = self.ckpt.resolve(cfg.checkpoint.resume)
        if resume_from is not None:
            check_resumable(resume_from, cfg, self.world, steps_per_epoch)
            self.pos = Checkpointer.load(resume_from, engine, teacher, dino_loss)
            if self.pos.step_in_epoch >= steps_per_epoch:  # the dataset shrank since: that epoch is done
                self.pos.epoch, self.pos.step_in_epoch = self.pos.epoch + 1, 0
        self.saved_step = self.pos.global_step  # the newest step a checkpoint holds (0: none yet, nothing to keep)

        self.report = _Reporter(cfg, self.rank, self.total_steps, out_dir, global_batch, steps_per_epoch,
                                self.pos.global_step)
        if self.rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out_dir / "config.yaml")
            self.report.progress.info(_startup_line(cfg, self.world, device, acc, precision, dino_loss, ema,
                                                    steps_per_epoch, global_batch, out_dir, resume_from))
        self.stop: dict = {"signal": None}
        self.stopping = False
        self.batches = None

    def save(self) -> None:
        """Checkpoint, never a non-finite state: the newest step's metrics and the weights are checked first."""
        self.report.flush()
        finite = state_is_finite(self.engine.module, self.teacher, extra=(self.dino_loss.center,))
        if self.report.bad is None and not finite:
            self.report.bad = f"the weights after step {self.pos.global_step} are not finite (its loss was)"
        if any_rank(self.report.bad is not None)[0]:
            raise _non_finite_error(self.report.bad, self.ckpt)
        self.ckpt.save(self.engine, self.teacher, self.dino_loss, self.pos, self.cfg, self.steps_per_epoch)
        self.saved_step = self.pos.global_step

    def epoch(self) -> None:
        """Steps from the current position to the end of its epoch, a stop, or the last step."""
        pos, epoch = self.pos, self.pos.epoch
        self.loader.set_epoch(epoch, pos.step_in_epoch)
        self.engine.train()
        self.batches = iter(self.loader)
        steps_before, t_prev = pos.global_step, time.perf_counter()
        for batch in self._agreed_batches():
            t_data = time.perf_counter()
            # ---- the step: queued on the device, nothing here waits for it
            crops = [c.to(self.device, non_blocking=True) for c in batch.crops]
            values = self.schedules.at(epoch * self.steps_per_epoch + pos.step_in_epoch, epoch)
            step_metrics = self.step(crops, values)
            pos.step_in_epoch += 1
            pos.global_step += 1
            if pos.step_in_epoch == self.steps_per_epoch:
                pos.epoch, pos.step_in_epoch = epoch + 1, 0
            # ---- log the previous step (read now, while this one runs)
            self.report.push(pos, epoch, values, step_metrics, t_prev, t_data)
            if self.stop["signal"] is not None and self.rank == 0:
                self.report.progress.info(
                    f"signal {self.stop['signal']}: stopping after step {pos.global_step} with a checkpoint"
                    + (" (Ctrl-C again quits at once, without it)" if self.stop["signal"] == signal.SIGINT else ""))
            # ---- periodic k-NN and attention maps, then checkpoint
            if self._after_step(epoch):
                break
            t_prev = time.perf_counter()
        if pos.global_step == steps_before and not self.stopping:  # would spin forever on the same position
            raise DataError(f"the {self.cfg.data.backend} loader yielded no batch for epoch {epoch} from step "
                            f"{pos.step_in_epoch} of {self.steps_per_epoch}; check data.path and the loader")

    def _agreed_batches(self):
        """This epoch's batches, each once all ranks agreed to go on: a signal, a failed loader or a non-finite step
        on any rank stops every rank here, between steps, where the state is whole (and checkpointed)."""
        while True:
            try:
                batch, failure = next(self.batches), None
            except StopIteration:
                return
            except Exception as exc:  # a worker died or raised (e.g. the OOM killer); the last step is whole
                batch, failure = None, exc
            # A worker that died with a stop signal (SLURM and launchers signal the whole process tree) is part of
            # that stop, not a failure.
            signalled = self.stop["signal"] is not None
            self.stopping, failed, bad = any_rank(signalled, failure is not None and not signalled,
                                                  self.report.bad is not None)
            if bad:
                raise _non_finite_error(self.report.bad, self.ckpt)
            if self.stopping or failed:
                if self.pos.global_step > self.saved_step:
                    self.save()
                if failed:
                    raise _loader_error(failure, self.ckpt, self.pos.global_step + 1) from None
                return
            yield batch

    def _after_step(self, epoch: int) -> bool:
        """k-NN and attention maps at the epochs asked for, then a checkpoint when due; True after the last step."""
        cfg, pos = self.cfg, self.pos
        end_of_epoch = pos.step_in_epoch == 0
        done = pos.global_step >= self.total_steps
        knn_due = ((end_of_epoch and cfg.eval.knn_every_epochs and (epoch + 1) % cfg.eval.knn_every_epochs == 0)
                   or (done and cfg.eval.knn_at_end))
        if knn_due:
            self.report.flush()
        if knn_due and self.report.bad is None:  # (a non-finite step stops at the checkpoint below)
            self.report.log_knn(periodic_knn(cfg, self.teacher, self.device, self.rank, self.world), pos.global_step,
                                epoch, f"epoch {epoch}", cfg.eval.knn_k)
        every_attn = cfg.eval.attention_every_epochs
        if end_of_epoch and every_attn and (epoch + 1) % every_attn == 0 and self.rank == 0:
            png = periodic_attention(cfg, self.teacher, self.out_dir, pos.global_step, self.device,
                                     self.report.metrics)
            self.report.progress.info(f"epoch {epoch} attention maps: {png}")
        every = cfg.checkpoint.every_steps
        # epoch ends are checkpoints too, unless epochs are shorter than every_steps: then the every_steps cadence
        # is enough (resume is exact mid-epoch), and a small data set's 2-step epochs do not each pay for a save
        epoch_save = end_of_epoch and (not every or self.steps_per_epoch >= every)
        if epoch_save or done or (every and pos.global_step % every == 0):
            self.save()
        return done

    def close(self) -> None:
        if self.batches is not None and hasattr(self.batches, "close"):
            self.batches.close()  # shuts the loader's workers down now, not when an exception's traceback is freed
        self.loader.close()  # workers kept between epochs (the torch backend's) are not needed past the last step
        self.report.close()

    def goodbye(self) -> None:
        """Rank 0: where everything went, then the run's summary (k-NN before → after, loss against ln K)."""
        if self.rank != 0:
            return
        cfg, sig = self.cfg, self.stop["signal"]
        how = f"stopped by signal {sig}" if sig is not None else "done"
        metrics = self.out_dir / cfg.logging.metrics_file
        self.report.progress.info(f"{how}: {self.pos.global_step} steps; checkpoint {self.ckpt.latest()}; "
                                  f"metrics {metrics}; output {self.out_dir.resolve()}")
        if cfg.logging.summary:
            for line in summarise_run(metrics, cfg.model.out_dim):
                self.report.progress.info(line)


def _stop_handler(stop: dict):
    def request_stop(signum, _frame):  # finish the current step, checkpoint, exit; a second Ctrl-C quits at once
        if signum == signal.SIGINT and stop["signal"] == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if stop["signal"] is None:  # the first one names the stop (a launcher may follow Ctrl-C with SIGTERM)
            stop["signal"] = signum

    return request_stop


def _startup_line(cfg, world, device, acc, precision, dino_loss, ema, steps_per_epoch, global_batch, out_dir,
                  resume_from) -> str:
    return (
        f"dino_fast: {world} rank(s) on {device.type} ({acc.communication_backend_name()}), precision {precision}, "
        f"ZeRO-{cfg.deepspeed.zero_stage}, loss={dino_loss.impl}, ema={ema.impl}, data={cfg.data.backend}, "
        f"{f'compiled backbones ({cfg.model.compile_mode}), ' if cfg.model.compile else ''}"
        f"{'packed crops, ' if cfg.model.packed_crops else ''}"
        f"{'whole-step CUDA graph, ' if cfg.train.cuda_graph else ''}"
        f"{steps_per_epoch} steps/epoch × {cfg.optim.epochs} epochs, global batch {global_batch}, "
        f"output {out_dir.resolve()}"
        + (f", resumed from {resume_from}" if resume_from else "")
    )


def make_step(cfg: Config, engine, teacher, dino_loss, ema, precision: str, schedules: Schedules, world: int):
    """The step object the config asks for: :class:`DINOStep`, or the whole-step CUDA graph (train.cuda_graph)."""
    if cfg.train.cuda_graph:
        from dino_fast.graph_step import CudaGraphStep

        return CudaGraphStep(engine, teacher, dino_loss, ema, cfg, precision=precision, schedules=schedules,
                             world=world)
    return DINOStep(engine, teacher, dino_loss, ema, cfg, precision=precision)


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
