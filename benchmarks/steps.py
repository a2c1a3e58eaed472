"""The train steps the step benchmarks time (bench_train, bench_profile), each called as ``step(crops) -> loss``.

A step = student forward + backward on all crops, teacher forward on the two globals, the loss, per-parameter
clipping, the optimizer step and the teacher EMA. Providers:

- ``ours``: ``dino_fast.engine.build_training`` + the step object ``dino_fast.step.DINOStep`` (DeepSpeed engine, bf16
  torch-autocast on GPU / fp32 on CPU, folded loss or the Triton kernel, foreach/Triton EMA, multi-tensor clipping,
  fused AdamW; metrics read one step late, as the trainer does);
- ``ours-compiled``: the same with ``model.compile=true`` (torch.compile'd backbones);
- ``ours-cudagraphs``: also ``model.compile_mode=reduce-overhead``: the compiled backbones replay as CUDA graphs;
- ``ours-graph``: ``train.cuda_graph=true``, the whole step captured once and replayed (GPU only);
- ``ours-packed``: ``model.packed_crops=true``, one student backbone pass over every crop;
- ``ours-packed-graph``: packed crops in the whole-step graph;
- ``ours-best``: compiled + packed + whole-step graph;
- ``ours-ckpt``: ``model.grad_checkpointing=true``, the student's blocks recomputed in the backward (less memory);
- ``reference``: the reference step written from DINO_SPEC in plain PyTorch as the reference does it: the eager
  2·(ncrops−1)-pair loss, fp16 autocast + GradScaler (GPU), per-parameter clipping with one host sync per parameter,
  the per-parameter EMA loop, torch AdamW with default settings (or, with ``optim.name``, the reference's SGD or
  LARS: a ResNet's row), the teacher in train mode when it has BatchNorm, as the reference's.
- ``reference-repo`` (with a checkout of facebookresearch/dino): its DINOLoss, clip_gradients,
  cancel_gradients_last_layer, ViT and head imported from that path and timed directly.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from typing import Any

import torch

from benchmarks.reference import ReferenceDINOLoss
from dino_fast.config import Config, apply_overrides, load_config
from dino_fast.models import build_student_teacher, has_batchnorm
from dino_fast.ops.reference import ema_reference_loop
from dino_fast.optim import build_optimizer, param_groups

# provider → the config overrides of OursStep (the variant matrix of the decision run, benchmarks/gpu/gpu_check.sh).
OURS_PROVIDERS: dict[str, tuple[str, ...]] = {
    "ours": (),
    "ours-compiled": ("model.compile=true",),
    "ours-cudagraphs": ("model.compile=true", "model.compile_mode=reduce-overhead"),  # compiled backbones as graphs
    "ours-graph": ("train.cuda_graph=true",),  # the whole step as one CUDA graph
    "ours-packed": ("model.packed_crops=true",),  # one student backbone pass over all crops
    "ours-packed-graph": ("model.packed_crops=true", "train.cuda_graph=true"),
    "ours-best": ("model.compile=true", "model.packed_crops=true", "train.cuda_graph=true"),
    "ours-ckpt": ("model.grad_checkpointing=true",),  # activation checkpointing: the memory rows
}


def add_step_args(p: argparse.ArgumentParser, archs: str) -> None:
    """The step's shape (archs, batch, crops, K), shared by the step benchmarks."""
    p.add_argument("--archs", default=archs)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--locals", type=int, default=10)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--out-dim", type=int, default=65536)


def apply_quick(args: argparse.Namespace, extra: list[str]) -> None:
    """--quick, the CPU sanity size: ViT-tiny of depth 2, patch 16, B=8, 2×64 + 4×32 px, K=4096."""
    args.archs, args.batch, args.locals, args.global_size, args.local_size = "vit_tiny_patch16_224", 8, 4, 64, 32
    args.out_dim = 4096
    extra += ["model.depth=2", "model.patch_size=16"]


def bench_config(arch: str, batch: int, n_local: int, global_size: int, local_size: int, out_dim: int,
                 device: torch.device, extra: list[str]) -> Config:
    return load_config(None, [
        f"model.arch={arch}", f"model.out_dim={out_dim}", f"data.batch_size_per_gpu={batch}",
        f"data.local_crops_number={n_local}", f"data.global_crop_size={global_size}",
        f"data.local_crop_size={local_size}", "optim.epochs=100", "optim.warmup_epochs=10", "logging.progress=none",
        *extra,
    ])


def synthetic_crops(cfg: Config, device: torch.device) -> list[torch.Tensor]:
    b, g, loc = cfg.data.batch_size_per_gpu, cfg.data.global_crop_size, cfg.data.local_crop_size
    return ([torch.randn(b, 3, g, g, device=device) for _ in range(2)]
            + [torch.randn(b, 3, loc, loc, device=device) for _ in range(cfg.data.local_crops_number)])


def step_facts(cfg: Config) -> dict[str, Any]:
    """What a row's step is: arch, batch, crops; ``images`` per step (the record's ``extra``)."""
    d = cfg.data
    return {"arch": cfg.model.arch, "batch": d.batch_size_per_gpu, "images": d.batch_size_per_gpu,
            "crops": f"2x{d.global_crop_size}+{d.local_crops_number}x{d.local_crop_size}"}


def step_shape(facts: dict[str, Any]) -> str:
    """A row's ``shape``: ``arch crops B=batch``."""
    return f"{facts['arch']} {facts['crops']} B={facts['batch']}"


class OursStep:
    """dino_fast's step object (``dino_fast.step``, as the trainer builds it) at epoch 1 of the recipe's schedules.

    Called as the trainer calls it: each call queues a step and then reads the previous step's metrics, so the host
    runs one step ahead of the device and the wall time per call is the steady-state step time.
    """

    def __init__(self, cfg: Config, device: torch.device, overrides: tuple[str, ...] = ()):
        from dino_fast.engine import build_training, init_distributed, make_step, resolve_precision
        from dino_fast.schedules import Schedules

        init_distributed()
        apply_overrides(cfg, list(overrides))
        self.precision = resolve_precision(cfg, device)
        self.cfg = cfg
        engine, teacher, dino_loss, ema = build_training(cfg, device, 1, self.precision)
        schedules = Schedules(cfg, 10, cfg.data.batch_size_per_gpu)
        self.values = schedules.at(10, 1)  # epoch 1: past the default one-epoch last-layer freeze, as the reference
        self.step = make_step(cfg, engine, teacher, dino_loss, ema, self.precision, schedules, 1)
        self._pending = None
        m = cfg.model
        self.describe = (f"DeepSpeed {self.precision}, loss={dino_loss.impl}, ema={ema.impl}"
                         + (f", torch.compile backbones ({m.compile_mode})" if m.compile else "")
                         + (", packed crops" if m.packed_crops else "")
                         + (", whole-step CUDA graph" if cfg.train.cuda_graph else ""))

    def __call__(self, crops: list[torch.Tensor]) -> float:
        metrics = self.step(crops, self.values)
        previous, self._pending = self._pending, metrics
        return (previous or metrics).read()["loss"]

    def drain(self) -> float:
        """Read the newest step's metrics (waits for it)."""
        return self._pending.read()["loss"] if self._pending is not None else float("nan")


class ReferenceStep:
    """The reference step in plain PyTorch (see the module docstring)."""

    def __init__(self, cfg: Config, device: torch.device, repo: str | None = None):
        self.device, self.cfg = device, cfg
        ncrops = 2 + cfg.data.local_crops_number
        if repo:
            self._from_repo(repo, cfg, device, ncrops)
        else:
            torch.manual_seed(0)
            self.student, self.teacher = build_student_teacher(cfg.model, cfg.data.global_crop_size)
            self.loss = ReferenceDINOLoss(cfg.model.out_dim, ncrops, device=device)
            self.loss_fn = lambda s, t: self.loss(s, t, 0.04)
            self.clip = _reference_clip
            # Epoch 1, as OursStep: past the default one-epoch freeze, both steps update the last layer.
            self.cancel = lambda model: _reference_cancel_last_layer(model, 1, cfg.optim.freeze_last_layer)
            precision = "fp16 autocast + GradScaler" if device.type == "cuda" else "fp32"
            self.describe = f"eager pair loop, {precision}, per-param clip/EMA loops"
        self.student.to(device).train()
        self.teacher.to(device).train(has_batchnorm(self.teacher))  # the reference never calls teacher.eval()
        # optim.name as main_dino.py --optimizer: torch's AdamW (default settings), SGD (momentum 0.9) or its LARS
        if cfg.optim.name == "adamw":
            self.opt = torch.optim.AdamW(param_groups(self.student), lr=1e-4)
        else:
            self.opt = build_optimizer(cfg.optim, self.student)
            for group in self.opt.param_groups:
                group["lr"] = 1e-4
        self.amp = device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        names = [n for n, _ in self.student.named_parameters()]
        t_named = dict(self.teacher.named_parameters())
        self.pairs = ([t_named[n] for n in names], [p for _, p in self.student.named_parameters()])

    def _from_repo(self, repo: str, cfg: Config, device: torch.device, ncrops: int) -> None:
        sys.path.insert(0, repo)
        import main_dino  # noqa: F401  (the reference's DINOLoss lives there)
        import utils
        import vision_transformer as vits

        if not torch.distributed.is_initialized():  # the reference's center update all-reduces
            from dino_fast.engine import init_distributed

            init_distributed()
        arch = cfg.model.arch.split("_patch")[0]  # vit_small_patch16_224 → vit_small
        m = cfg.model
        patch = m.patch_size or int(cfg.model.arch.split("_patch")[1].split("_")[0])

        def make(**kw):
            net = vits.__dict__[arch](patch_size=patch, img_size=[cfg.data.global_crop_size], **kw)
            if m.depth:  # the repo's vit_* fix 12 blocks: keep the first model.depth (e.g. --quick's 2), as ours
                net.blocks = net.blocks[:m.depth]
            return net

        def head(embed_dim, norm_last_layer):
            return vits.DINOHead(embed_dim, m.out_dim, norm_last_layer=norm_last_layer, nlayers=m.head_nlayers,
                                 hidden_dim=m.head_hidden_dim, bottleneck_dim=m.head_bottleneck_dim)

        s_bb = make(drop_path_rate=m.drop_path_rate)
        t_bb = make()
        self.student = utils.MultiCropWrapper(s_bb, head(s_bb.embed_dim, m.norm_last_layer))
        self.teacher = utils.MultiCropWrapper(t_bb, head(t_bb.embed_dim, True))
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        d = cfg.dino
        self.loss = main_dino.DINOLoss(m.out_dim, ncrops, d.warmup_teacher_temp, d.teacher_temp,
                                       d.warmup_teacher_temp_epochs, cfg.optim.epochs, d.student_temp,
                                       d.center_momentum).to(device)
        self.loss_fn = lambda s, t: self.loss(s, t, 1)  # epoch 1, as OursStep
        self.clip = utils.clip_gradients
        self.cancel = lambda model: utils.cancel_gradients_last_layer(1, model, cfg.optim.freeze_last_layer)
        self.describe = f"imported from {repo}"

    def __call__(self, crops: list[torch.Tensor]) -> float:
        ctx = torch.autocast("cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext()
        with ctx:
            teacher_out = self.teacher(crops[:2])
            student_out = self.student(crops)
            loss = self.loss_fn(student_out, teacher_out)
        if not math.isfinite(loss.item()):
            raise RuntimeError("reference step: loss is not finite")
        self.opt.zero_grad()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
            self.clip(self.student, 3.0)
            self.cancel(self.student)
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.clip(self.student, 3.0)
            self.cancel(self.student)
            self.opt.step()
        ema_reference_loop(*self.pairs, 0.996)
        return loss.item()


def _reference_clip(model: torch.nn.Module, clip: float) -> None:
    for p in model.parameters():
        if p.grad is not None:
            norm = p.grad.data.norm(2)
            coef = clip / (norm + 1e-6)
            if coef < 1:  # a host sync per parameter, as the reference
                p.grad.data.mul_(coef)


def _reference_cancel_last_layer(model: torch.nn.Module, epoch: int, freeze_last_layer: int) -> None:
    """The reference's cancel_gradients_last_layer: only during the first ``freeze_last_layer`` epochs."""
    if epoch >= freeze_last_layer:
        return
    for n, p in model.named_parameters():
        if "last_layer" in n:
            p.grad = None


def build_step(provider: str, cfg: Config, device: torch.device, reference_repo: str | None = None):
    """The step of ``provider`` (a key of OURS_PROVIDERS, ``reference`` or ``reference-repo``)."""
    if provider in OURS_PROVIDERS:
        torch._dynamo.reset()  # compile time measured alone, no cache limit carried over from other models
        return OursStep(cfg, device, OURS_PROVIDERS[provider])
    if provider == "reference" or (provider == "reference-repo" and reference_repo):
        return ReferenceStep(cfg, device, reference_repo if provider == "reference-repo" else None)
    raise ValueError(f"unknown provider {provider!r} (have: {', '.join(OURS_PROVIDERS)}, reference, reference-repo "
                     "with a checkout of facebookresearch/dino)")
