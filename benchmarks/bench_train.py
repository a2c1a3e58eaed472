"""Images/s of complete DINO steps: dino_fast's step vs the reference step, same model, same GPU (or CPU).

A step = student forward + backward on all crops, teacher forward on the two globals, the loss, per-parameter
clipping, the optimizer step and the teacher EMA. Modes:

- ``synthetic``: random crops already on the device (the model-bound ceiling);
- ``torch``, ``dali``, ``ffcv``: crops from that loader over generated 500×375 JPEGs (end to end, with the
  data-wait share; FFCV reads them converted once to a .beton beside them).

Providers:

- ``ours``: ``dino_fast.train.build_training`` + the step object ``dino_fast.step.DINOStep`` (DeepSpeed engine, bf16
  torch-autocast on GPU / fp32 on CPU, folded loss or the Triton kernel, foreach/Triton EMA, multi-tensor clipping,
  fused AdamW; metrics read one step late, as the trainer does);
- ``ours-compiled``: the same with ``model.compile=true`` (torch.compile'd backbones; compile time in ``warmup_s``);
- ``ours-cudagraphs``: also ``model.compile_mode=reduce-overhead``: the compiled backbones replay as CUDA graphs;
- ``ours-graph``: ``train.cuda_graph=true``, the whole step captured once and replayed (GPU only);
- ``ours-packed``: ``model.packed_crops=true``, one student backbone pass over every crop;
- ``ours-packed-graph``: packed crops in the whole-step graph;
- ``ours-best``: compiled + packed + whole-step graph;
- ``reference``: the reference step written from DINO_SPEC in plain PyTorch as the reference does it: the eager
  2·(ncrops−1)-pair loss, fp16 autocast + GradScaler (GPU), per-parameter clipping with one host sync per parameter,
  the per-parameter EMA loop, torch AdamW with default settings.
- ``reference-repo`` (with ``--reference-repo PATH``, a checkout of facebookresearch/dino): its DINOLoss,
  clip_gradients, cancel_gradients_last_layer, ViT and head imported from that path and timed directly.

``--batches 64,128,256`` sweeps the batch; ``--at PROVIDER=ARCH:B,...`` restricts a provider to some points (the
decision run in ``gpu_check.sh`` compiles at one point only). The JSON is rewritten after every row and ends with
``fastest``: our fastest variant per arch, batch and mode with its ratio to each reference.

MFU = (FLOPs of one step, counted by ``torch.utils.flop_counter.FlopCounterMode`` on our step: student forward +
backward over all crops, teacher forward over the globals, the head and the loss matmuls) × steps/s ÷ the device's
dense bf16 peak (H100/H200 SXM: 989 TFLOP/s). Run: ``python -m benchmarks.bench_train [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from typing import Any

import torch

from benchmarks.common import environment, pick_device, print_table, results_path, sync, write_json
from benchmarks.reference import ReferenceDINOLoss
from dino_fast.config import Config, apply_overrides, load_config
from dino_fast.models import build_student_teacher
from dino_fast.ops.reference import ema_reference_loop
from dino_fast.optim import param_groups

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
# provider → the config overrides of OursStep (the variant matrix of the decision run, benchmarks/gpu_check.sh).
OURS_PROVIDERS: dict[str, tuple[str, ...]] = {
    "ours": (),
    "ours-compiled": ("model.compile=true",),
    "ours-cudagraphs": ("model.compile=true", "model.compile_mode=reduce-overhead"),  # compiled backbones as graphs
    "ours-graph": ("train.cuda_graph=true",),  # the whole step as one CUDA graph
    "ours-packed": ("model.packed_crops=true",),  # one student backbone pass over all crops
    "ours-packed-graph": ("model.packed_crops=true", "train.cuda_graph=true"),
    "ours-best": ("model.compile=true", "model.packed_crops=true", "train.cuda_graph=true"),
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


def crop_stream(cfg: Config, mode: str, device: torch.device, n_images: int, workers: int):
    """Endless (crops, data-wait seconds) from synthetic tensors or a real loader."""
    if mode == "synthetic":
        crops = synthetic_crops(cfg, device)
        while True:
            yield crops, 0.0
    from benchmarks.loader_images import ensure_benchmark_images
    from pipelines.build import build_loader

    image_dir = ensure_benchmark_images(n_images)
    cfg.data.path = str(image_dir)
    cfg.data.backend = mode
    cfg.data.num_workers = workers
    if mode == "ffcv":
        from benchmarks.bench_loaders import ffcv_file

        cfg.data.ffcv_path = ffcv_file(image_dir, n_images, workers)
    loader = build_loader(cfg.data, device=device)
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            crops = [c.to(device, non_blocking=True) for c in batch.crops]
            yield crops, time.perf_counter() - t0
        epoch += 1


class OursStep:
    """dino_fast's step object (``dino_fast.step``, as the trainer builds it) at epoch 1 of the recipe's schedules.

    Called as the trainer calls it: each call queues a step and then reads the previous step's metrics, so the host
    runs one step ahead of the device and the wall time per call is the steady-state step time.
    """

    def __init__(self, cfg: Config, device: torch.device, overrides: tuple[str, ...] = ()):
        from dino_fast.step import Schedules
        from dino_fast.train import build_training, init_distributed, make_step, resolve_precision

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
        self.teacher.to(device).eval()
        self.opt = torch.optim.AdamW(param_groups(self.student), lr=1e-4)
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
            from dino_fast.train import init_distributed

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


def count_step_flops(step: OursStep, crops: list[torch.Tensor]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(crops)
    return float(counter.get_total_flops())


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def run_case(provider: str, cfg: Config, mode: str, device: torch.device, args,
             flops: float | None = None) -> dict[str, Any]:
    """Time ``provider`` (a key of OURS_PROVIDERS, or reference). ``flops`` of one step, when known (the compiled step
    does the same work as ours); else counted on our eager step."""
    if provider in OURS_PROVIDERS:
        torch._dynamo.reset()  # compile time measured alone, no cache limit carried over from other models
        step = OursStep(cfg, device, OURS_PROVIDERS[provider])
    elif provider in ("reference", "reference-repo"):
        step = ReferenceStep(cfg, device, args.reference_repo if provider == "reference-repo" else None)
    else:
        raise ValueError(f"unknown provider {provider!r} (have: {', '.join(OURS_PROVIDERS)}, reference, "
                         f"reference-repo)")
    stream = crop_stream(cfg, mode, device, args.images, args.workers)
    t_first = time.perf_counter()
    for i in range(args.warmup):
        crops, _ = next(stream)
        if provider == "ours" and i == 0 and flops is None:
            flops = count_step_flops(step, crops)
        else:
            step(crops)
    sync(device)
    warmup_s = time.perf_counter() - t_first  # includes torch.compile's compile time for the compiled
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, waits = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        crops, wait = next(stream)
        step(crops)  # ends reading the previous step's loss (ours) or this one's (reference): a step's time
        times.append(time.perf_counter() - t0)
        waits.append(wait)
    times.sort()
    med = times[len(times) // 2]
    b = cfg.data.batch_size_per_gpu
    result = {
        "provider": provider, "mode": mode, "arch": cfg.model.arch, "batch": b,
        "crops": f"2x{cfg.data.global_crop_size}+{cfg.data.local_crops_number}x{cfg.data.local_crop_size}",
        "ms_per_step": 1e3 * med, "p20_ms": 1e3 * times[len(times) // 5], "p80_ms": 1e3 * times[4 * len(times) // 5],
        "img_per_s": b / med, "data_wait_share": sum(waits) / sum(times), "describe": step.describe,
        "warmup_s": warmup_s,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    if flops:
        peak = peak_flops(device)
        result.update(step_tflop=flops / 1e12, achieved_tflops=flops / med / 1e12,
                      mfu=(flops / med / peak) if peak else None)
    del step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_args(p, "vit_small_patch16_224,vit_base_patch16_224")
    p.add_argument("--batches", default=None, help="batch sweep, e.g. 64,128,256 (default: --batch)")
    p.add_argument("--at", action="append", default=[], metavar="PROVIDER=ARCH:B[,ARCH:B]",
                   help="run PROVIDER only at these arch/batch points (repeatable), e.g. "
                        "ours-compiled=vit_small_patch16_224:128; the torch.compile providers (~1 min per compile) "
                        "always run after the others")
    p.add_argument("--modes", default="synthetic", help="synthetic,torch[,dali,ffcv]")
    p.add_argument("--providers", default="ours,reference",
                   help=f"any of {','.join(OURS_PROVIDERS)},reference,reference-repo")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--images", type=int, default=2000, help="generated JPEGs for the loader modes")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--reference-repo", default=None,
                   help="checkout of facebookresearch/dino: provider reference-repo times its own ViT, loss and loop")
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="CPU sanity run: ViT-tiny depth 2, 64/32 px, 4 steps")
    p.add_argument("--out", default=None)
    p.add_argument("--name", default="train", help="results file stem: <name>_<device>.json")
    p.add_argument("--set", nargs="*", default=[], help="extra dino_fast config overrides")
    args = p.parse_args(argv)
    if "reference-repo" in args.providers.split(",") and not args.reference_repo:
        p.error("provider reference-repo needs --reference-repo PATH (a checkout of facebookresearch/dino)")
    return args


def _cases(args: argparse.Namespace, batches: list[int]) -> list[tuple[str, int, str, str]]:
    """(arch, batch, mode, provider) in run order: as listed, restricted by --at, compiling providers last."""
    only: dict[str, set[str]] = {}
    for spec in args.at:
        provider, _, points = spec.partition("=")
        only.setdefault(provider, set()).update(points.split(","))
    cases = [(arch, batch, mode, provider) for arch in args.archs.split(",") for batch in batches
             for mode in args.modes.split(",") for provider in args.providers.split(",")
             if provider not in only or f"{arch}:{batch}" in only[provider]]
    return sorted(cases, key=lambda c: "model.compile=true" in OURS_PROVIDERS.get(c[3], ()))  # stable


def fastest_variants(results: list[dict]) -> list[dict]:
    """Per (arch, batch, mode): our fastest variant, its img/s and its ratio to each reference measured beside it."""
    best: dict[tuple, dict] = {}
    for r in results:
        if "error" in r or not str(r.get("provider", "")).startswith("ours"):
            continue
        key = (r["arch"], r["batch"], r["mode"])
        if key not in best or r["img_per_s"] > best[key]["img_per_s"]:
            best[key] = r
    out = []
    for (arch, batch, mode), r in best.items():
        row = {"arch": arch, "batch": batch, "mode": mode, "fastest": r["provider"], "img_per_s": r["img_per_s"],
               "peak_mem_gib": r.get("peak_mem_gib"), "mfu": r.get("mfu")}
        for ref in ("reference", "reference-repo"):
            ips = next((x["img_per_s"] for x in results if "error" not in x and x.get("provider") == ref
                        and (x["arch"], x["batch"], x["mode"]) == (arch, batch, mode)), None)
            if ips:
                row[f"vs_{ref.replace('-', '_')}"] = r["img_per_s"] / ips
        out.append(row)
    return out


def _speedups(results: list[dict]) -> None:
    """Each of our rows / the reference rows of the same arch, batch and mode (and / the reference on the torch
    loader for our DALI and FFCV rows: end to end, as users compare trainers)."""
    def ref_ips(r: dict, provider: str, mode: str) -> float | None:
        return next((x["img_per_s"] for x in results if "error" not in x and x.get("provider") == provider
                     and x["arch"] == r["arch"] and x["batch"] == r["batch"] and x["mode"] == mode), None)

    for r in results:
        if "error" in r or not str(r.get("provider", "")).startswith("ours"):
            continue
        for provider, key in (("reference", "speedup_vs_reference"), ("reference-repo", "speedup_vs_reference_repo")):
            ips = ref_ips(r, provider, r["mode"])
            if ips:
                r[key] = r["img_per_s"] / ips
        torch_ips = ref_ips(r, "reference", "torch") if r["mode"] in ("dali", "ffcv") else None
        if torch_ips:
            r["speedup_vs_reference_torch_loader"] = r["img_per_s"] / torch_ips


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    extra = list(args.set)
    if args.quick:
        apply_quick(args, extra)
        args.steps, args.warmup = 4, 2
    batches = [int(b) for b in (args.batches or str(args.batch)).split(",")]
    rows, results, flops = [], [], {}
    for arch, batch, mode, provider in _cases(args, batches):
        cfg = bench_config(arch, batch, args.locals, args.global_size, args.local_size, args.out_dim, device, extra)
        t0 = time.perf_counter()
        try:
            r = run_case(provider, cfg, mode, device, args, flops.get((arch, batch, mode)))
            if r.get("step_tflop"):
                flops.setdefault((arch, batch, mode), r["step_tflop"] * 1e12)
        except Exception as exc:  # record and go on: one failing case must not lose the others
            r = {"provider": provider, "mode": mode, "arch": arch, "batch": batch,
                 "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        r["row_s"] = time.perf_counter() - t0
        results.append(r)
        _write(results, args, device)  # after every row: a run cut off at its limit keeps the finished ones
        print(f"{arch} B={batch} {mode} {provider}: "
              + (r["error"][:120] if "error" in r else f"{r['img_per_s']:.1f} img/s") + f" ({r['row_s']:.0f} s)",
              flush=True)
        rows.append([arch, batch, mode, provider, *(["-"] * 5 + [r["error"][:60]] if "error" in r else [
            r["img_per_s"], r["ms_per_step"], r["data_wait_share"], r.get("mfu"), r["peak_mem_gib"],
            r["describe"][:60]])])
    path = _write(results, args, device)
    fastest = fastest_variants(results)
    print_table(f"DINO train step on {environment(device)['device']} (median of {args.steps})",
                ["arch", "B", "mode", "provider", "img/s", "ms/step", "data wait", "MFU", "peak GiB", "setup"], rows)
    print_fastest(fastest)
    print(f"wrote {path}")


def _write(results: list[dict], args: argparse.Namespace, device: torch.device):
    _speedups(results)
    payload = {"benchmark": "train_step", "env": environment(device), "quick": args.quick, "results": results,
               "fastest": fastest_variants(results),
               "mfu_formula": "FlopCounterMode FLOPs of one step (student fwd+bwd all crops, teacher fwd globals, "
                              "loss) / median step time / dense bf16 peak"}
    return write_json(payload, results_path(args.name, device, args.out))


def print_fastest(fastest: list[dict]) -> None:
    print_table("fastest variant per arch and batch", ["arch", "B", "mode", "fastest", "img/s", "MFU", "peak GiB",
                                                       "/ reference", "/ reference repo"],
                [[f["arch"], f["batch"], f["mode"], f["fastest"], f["img_per_s"], f.get("mfu"), f["peak_mem_gib"],
                  f.get("vs_reference"), f.get("vs_reference_repo")] for f in fastest])


if __name__ == "__main__":
    main()
