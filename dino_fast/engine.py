"""Everything the trainer builds before its first step: the process group, the device and precision, the loader, the
DeepSpeed engine with the student and its optimizer, the teacher, the loss, the EMA, the schedules and the step object.

:func:`build_run` returns it as one :class:`Run`; ``dino_fast/train.py`` is the loop over it. The parts are public for
the tests and the benchmarks, which build a step the same way (:func:`build_training`, :func:`make_step`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dino_fast.config import Config, ConfigError, with_step_budget
from dino_fast.dist import SlurmEnvironmentError, control_group, local_device_index, slurm_environment
from dino_fast.eval.weights import init_from_pretrained
from dino_fast.loss import DINOLoss
from dino_fast.models import backbone_family, build_student_teacher, has_batchnorm, place_on_device
from dino_fast.optim import build_optimizer
from dino_fast.schedules import Schedules
from dino_fast.step import DINOStep
from dino_fast.teacher import TeacherEMA
from pipelines.build import build_loader


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

    The rank comes from the launcher's variables (``RANK``, ...), else from SLURM's (a task started by ``srun``,
    :func:`dino_fast.dist.slurm_environment`); without either, those of a one-process group are filled in, so the
    same code path runs.
    """
    _quiet_cpu_startup()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    try:
        slurm = slurm_environment(os.environ)  # srun python -m dino_fast.train: one task per GPU, no launcher
    except SlurmEnvironmentError as exc:
        raise ConfigError(str(exc)) from None
    if slurm is not None:
        os.environ.update(slurm)
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
    if cfg.deepspeed.offload_optimizer != "none":
        # DeepSpeed's own offload: ZeRO keeps the fp32 partitions and their optimizer state in pinned host memory
        # and runs the optimizer step there. It refuses a client optimizer unless told: our torch AdamW (fused, with
        # a CPU kernel) runs the step on those host partitions, keeping the reference's param groups and the
        # trainer's per-parameter clipping, instead of DeepSpeed's CPU Adam (a compiled extension, another update
        # rule for the groups' weight decay).
        ds["zero_optimization"]["offload_optimizer"] = {"device": cfg.deepspeed.offload_optimizer, "pin_memory": True}
        ds["zero_force_ds_cpu_optimizer"] = False
    if cfg.optim.name != "adamw":
        # DeepSpeed lists the optimizers it tested ZeRO with (Adam/AdamW, ...); torch's SGD works on ZeRO's flat fp32
        # partitions as on any parameters (its update is elementwise). LARS is not (config.validate refuses it).
        ds["zero_allow_untested_optimizer"] = True
    return ds


def check_network(cfg: Config, student: torch.nn.Module) -> None:
    """Raise ConfigError (one line) for a feature the configured network does not have: the attention maps read a
    plain ViT's CLS attention over its patch tokens."""
    family = backbone_family(student.backbone)
    if cfg.eval.attention_every_epochs and family != "vit":
        kind = {"resnet": "a ResNet", "xcit": "an XCiT"}.get(family, "not a ViT")
        raise ConfigError(f"eval.attention_every_epochs needs a ViT's CLS attention over patch tokens; model.arch="
                          f"{cfg.model.arch} is {kind}: set eval.attention_every_epochs=0")


def build_training(cfg: Config, device: torch.device, world: int, precision: str):
    """Student (owned by a DeepSpeed engine with its optimizer), teacher, loss and EMA, as the trainer uses them.

    Every rank builds the models from the same seed, and the teacher is copied from the student as DeepSpeed
    broadcast it, so all ranks start identical. A teacher with BatchNorm stays in train mode, as the reference's
    (which never calls ``teacher.eval()``): it normalises with its batch statistics; any other teacher is in eval
    mode. Returns (engine, teacher, dino_loss, ema).
    """
    import deepspeed

    torch.manual_seed(cfg.seed)
    try:
        student, teacher = build_student_teacher(cfg.model, cfg.data.global_crop_size)
    except ValueError as exc:  # a network the trainer cannot build (as configured): the message names the key
        raise ConfigError(str(exc)) from None
    check_network(cfg, student)
    init_from_pretrained(cfg, student)  # model.pretrained: before DeepSpeed copies the weights into its optimizer
    student, teacher = place_on_device(student, teacher, device, world)  # SyncBatchNorm, channels_last (GPUs)
    teacher.to(device).train(has_batchnorm(teacher))
    ncrops = 2 + cfg.data.local_crops_number
    dino_loss = DINOLoss(cfg.model.out_dim, ncrops, cfg.dino.student_temp, cfg.dino.center_momentum,
                         impl=cfg.dino.loss_impl, centering=cfg.dino.centering,
                         sinkhorn_iterations=cfg.dino.sinkhorn_iterations,
                         sinkhorn_queue=cfg.dino.sinkhorn_queue, device=device)
    optimizer = build_optimizer(cfg.optim, student)  # optim.name over the reference's two param groups
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


def make_step(cfg: Config, engine, teacher, dino_loss, ema, precision: str, schedules: Schedules, world: int):
    """The step object the config asks for: :class:`DINOStep`, or the whole-step CUDA graph (train.cuda_graph)."""
    if cfg.train.cuda_graph:
        from dino_fast.graph_step import CudaGraphStep

        return CudaGraphStep(engine, teacher, dino_loss, ema, cfg, precision=precision, schedules=schedules,
                             world=world)
    return DINOStep(engine, teacher, dino_loss, ema, cfg, precision=precision)


def _startup_line(cfg, world, device, acc, precision, dino_loss, ema, steps_per_epoch, global_batch) -> str:
    """What runs where (the paths chosen once at start-up); the trainer adds the output folder and any resume."""
    return (
        f"dino_fast: {world} rank(s) on {device.type} ({acc.communication_backend_name()}), precision {precision}, "
        f"ZeRO-{cfg.deepspeed.zero_stage}, {cfg.model.arch}, {cfg.optim.name}, loss={dino_loss.impl}, ema={ema.impl}, "
        f"data={cfg.data.backend}, "
        f"{f'compiled backbones ({cfg.model.compile_mode}), ' if cfg.model.compile else ''}"
        f"{'packed crops, ' if cfg.model.packed_crops else ''}"
        f"{'whole-step CUDA graph, ' if cfg.train.cuda_graph else ''}"
        f"{steps_per_epoch} steps/epoch × {cfg.optim.epochs} epochs, global batch {global_batch}"
    )


@dataclass
class Run:
    """What one training run is made of (see the module docstring); ``cfg`` is the config with the step budget
    resolved for this data (``optim.total_steps`` → ``optim.epochs``)."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    precision: str
    loader: object  # a pipelines.loader.MultiCropLoader
    steps_per_epoch: int
    total_steps: int
    global_batch: int
    engine: object  # the DeepSpeed engine: the student (engine.module) and its optimizer
    teacher: torch.nn.Module
    dino_loss: DINOLoss
    ema: TeacherEMA
    schedules: Schedules
    step: DINOStep
    describe: str  # the start-up line


def build_run(cfg: Config, *, before_loader=None) -> Run:
    """Process group → device → loader → models, engine, loss, EMA → schedules → step, seeded as the reference is.
    ``before_loader(cfg)`` runs after the process group is up and before the loader is built (a check that must
    fail before anything is built, e.g. the k-NN's held-out split)."""
    rank, world, local_rank = init_distributed()  # (imports DeepSpeed: first, see _quiet_cpu_startup)
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    device = torch.device("cpu")
    if acc.device_name() != "cpu":
        try:
            device = torch.device(acc.device_name(local_device_index(local_rank, acc.device_count())))
        except SlurmEnvironmentError as exc:
            raise ConfigError(str(exc)) from None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    precision = resolve_precision(cfg, device)
    if before_loader is not None:
        before_loader(cfg)
    loader = build_loader(cfg.data, rank=rank, world_size=world, seed=cfg.seed, device=device)
    steps_per_epoch = loader.steps_per_epoch
    cfg = with_step_budget(cfg, steps_per_epoch)  # optim.total_steps → optim.epochs for this data
    all_steps = cfg.optim.epochs * steps_per_epoch
    engine, teacher, dino_loss, ema = build_training(cfg, device, world, precision)
    torch.manual_seed(cfg.seed + rank)  # same init everywhere, per-rank drop-path noise from here on
    np.random.seed(cfg.seed + rank)
    global_batch = cfg.data.batch_size_per_gpu * world
    schedules = Schedules(cfg, steps_per_epoch, global_batch)
    step = make_step(cfg, engine, teacher, dino_loss, ema, precision, schedules, world)
    describe = _startup_line(cfg, world, device, acc, precision, dino_loss, ema, steps_per_epoch, global_batch)
    return Run(cfg, rank, world, device, precision, loader, steps_per_epoch, min(all_steps, cfg.optim.max_steps or
               all_steps), global_batch, engine, teacher, dino_loss, ema, schedules, step, describe)
