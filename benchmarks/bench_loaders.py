"""Multi-crop loader benchmark: images/s (one image = all its crops) of every data backend on the same images.

Providers, all built by ``pipelines.build.build_loader`` from a ``DataConfig`` on the same cores and batch size:
  * ``torch`` the reference augmentation on PIL in DataLoader workers (the baseline);
  * ``dali``  the DALI graph (``device=cuda``: nvJPEG "mixed" decode and GPU augmentation; else DALI's CPU ops);
  * ``ffcv``  the folder converted once to a .beton by ``pipelines.convert.convert_folder``, then FFCV's loader;
    one provider ``ffcv@R`` per stored resolution R (longest side) of ``--ffcv-resolutions``.
A provider that cannot be imported or built is recorded as ``unavailable: <reason>`` instead of stopping the run.

Configs: 2×224 + 8×96 (DINO default) and 2×224 + 10×96 (the paper's best). Each round runs one epoch of every
provider in turn (so a noisy neighbour hurts all of them alike): the first ``--warmup`` batches are untimed, the
rest give img/s; the table shows the median over rounds, the spread (min–max), the ratio to the torch baseline,
and CPU-ms per image (this process's and its workers' CPU time over the epoch: the cost on a machine without idle
cores). Batches are moved to ``--device`` as the trainer does. Images: ImageNet-like JPEGs (``loader_images.py``,
``--image-size``, default 500×375), generated once into ``$DINO_FAST_BENCH_DIR`` (default ``data/bench_images``).
Rows of the record (``benchmarks/common.py``): one per backend and config, p20/p50/p80 = the time of a batch at the
rounds' img/s (p50 at their median img/s), baseline torch.

Run from the repo root: ``python -m benchmarks.bench_loaders --quick`` (CPU sanity; most of its time is FFCV's
one-off conversion and JIT) or e.g.
``python -m benchmarks.bench_loaders --device cuda --images 4096 --workers 16 --batch-size 64``.
Writes ``benchmarks/results/loaders_<device-slug>.json`` (or into ``$OUT``).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import Record, error_text, pick_device, print_table, speedup, summarize
from benchmarks.loader_images import ensure_benchmark_images
from dino_fast.config import DataConfig
from pipelines.folder import DataError, list_images

CONFIGS = ("2x224+8x96", "2x224+10x96")  # the defaults; any 2xG+NxL is taken (e.g. 2x32+2x16 for a rehearsal)
_CONFIG = re.compile(r"2x(\d+)\+(\d+)x(\d+)")


def crop_config(config: str) -> dict[str, int]:
    """``2x224+10x96`` → the DataConfig fields of those crops."""
    g, n, loc = (int(v) for v in _CONFIG.fullmatch(config).groups())
    return {"global_crop_size": g, "local_crops_number": n, "local_crop_size": loc}
NAME = "loader"  # the record's rows: shape = crops and batch, mode = the workers; p50 = a batch at the median img/s
BACKENDS = ("torch", "dali", "ffcv")


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its reaped children (DataLoader workers end with their epoch)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def ffcv_file(image_dir: Path, n_images: int, workers: int, resolution: int = 512) -> str:
    """The benchmark folder as a .beton next to it, longest side at most ``resolution`` (converted once)."""
    from pipelines.convert import convert_folder

    dst = image_dir.with_name(f"{image_dir.name}-{resolution}.beton")
    if not dst.exists():
        print(f"converting {n_images} images to {dst} ...", flush=True)
        convert_folder(image_dir, dst, max_resolution=resolution, jpeg_quality=90, workers=workers, progress=False)
    return str(dst)


def build(provider: str, cfg: DataConfig, images, device: torch.device, image_dir: Path):
    """The loader of ``provider`` (a backend, or ``ffcv@R``), or the reason it cannot be built (a string)."""
    from pipelines.build import build_loader

    backend, _, resolution = provider.partition("@")
    try:
        if backend == "ffcv":
            path = ffcv_file(image_dir, len(images.files), cfg.num_workers, int(resolution or 512))
            cfg = replace(cfg, ffcv_path=path)
        return build_loader(replace(cfg, backend=backend), device=device, images=images)
    except Exception as exc:  # an uninstalled or unfinished backend must not stop the other measurements
        return f"unavailable: {error_text(exc, 2000)}"


def time_epoch(loader, epoch: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(img/s after the first ``warmup`` batches, CPU-ms per image over the whole epoch) for one epoch."""
    loader.set_epoch(epoch)
    cpu0, n, n_timed, t0 = cpu_seconds(), 0, 0, time.perf_counter()
    for i, batch in enumerate(loader):
        crops = [c.to(device, non_blocking=True) for c in batch.crops]  # what the trainer does with a batch
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rows = crops[0].shape[0]
        n += rows
        if i == warmup - 1:
            t0 = time.perf_counter()
        elif i >= warmup:
            n_timed += rows
    seconds = time.perf_counter() - t0
    return n_timed / seconds, (cpu_seconds() - cpu0) * 1e3 / n


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The CLI, with the defaults --quick changes resolved and the sizes parsed; exits 2 on a bad value."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sanity run: 256 images, 2 rounds")
    p.add_argument("--images", type=int, default=0, help="benchmark images (default 2048, --quick 256)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="loader workers / threads")
    p.add_argument("--batch-size", type=int, default=0, help="images per batch (default 64, --quick 32)")
    p.add_argument("--rounds", type=int, default=0, help="timed epochs per provider (default 5, --quick 2)")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches at the start of every epoch")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of torch,dali,ffcv")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated crop sets 2xG+NxL (default: "
                   f"{','.join(CONFIGS)})")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--image-size", default="500x375", help="benchmark JPEGs' WIDTHxHEIGHT (ImageNet-like: 500x375)")
    p.add_argument("--ffcv-resolutions", default="512",
                   help="comma-separated longest sides the ffcv provider stores its .beton at (one provider each)")
    p.add_argument("--out", default=None, help="result file (default benchmarks/results/loaders_<device>.json)")
    args = p.parse_args(argv)
    args.images = args.images or (256 if args.quick else 2048)
    args.batch_size = args.batch_size or (32 if args.quick else 64)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [b for b in args.backends if b not in BACKENDS] + [c for c in args.configs if not _CONFIG.fullmatch(c)]
    if bad:
        _usage(f"unknown backend or config {', '.join(bad)} (backends: {', '.join(BACKENDS)}; configs: 2xG+NxL, "
               f"e.g. {', '.join(CONFIGS)})")
    if "torch" not in args.backends:
        _usage("--backends must include torch, the baseline the others are compared with")
    try:
        args.width, args.height = (int(v) for v in args.image_size.lower().split("x"))
        args.resolutions = [int(r) for r in args.ffcv_resolutions.split(",") if r.strip()]
    except ValueError:
        _usage(f"--image-size {args.image_size!r} must be WIDTHxHEIGHT and --ffcv-resolutions "
               f"{args.ffcv_resolutions!r} integers, e.g. --image-size 512x384 --ffcv-resolutions 256,384,512")
    if args.images // args.batch_size <= args.warmup:
        _usage(f"{args.images} images give no timed batch at batch size {args.batch_size} after "
               f"{args.warmup} warm-up batches: raise --images")
    return args


def _usage(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_rounds(loaders: dict, rounds: int, warmup: int, device: torch.device, config: str) -> tuple[dict, dict]:
    """Round 0 warms up caches, JIT and worker start-up (not recorded); then ``rounds`` epochs of every provider in
    turn. Returns the img/s and the CPU-ms per image of each round, per provider; a provider that breaks mid-epoch
    is replaced by its reason in ``loaders``."""
    speeds: dict[str, list[float]] = {b: [] for b in loaders}
    cpu_ms: dict[str, list[float]] = {b: [] for b in loaders}
    for r in range(rounds + 1):
        for b, loader in loaders.items():
            if isinstance(loader, str):
                continue
            try:
                speed, cost = time_epoch(loader, r, warmup, device)
            except Exception as exc:  # a backend that breaks mid-epoch is reported, the others still run
                loaders[b] = f"failed: {error_text(exc, 2000)}"
                print(f"{config}: {b} {loaders[b]}", flush=True)
                continue
            if r > 0:
                speeds[b].append(speed)
                cpu_ms[b].append(cost)
        print(f"{config} round {r}: " + ", ".join(f"{b} {v[-1]:.1f} img/s" for b, v in speeds.items() if v),
              flush=True)
    return speeds, cpu_ms


def add_rows(record: Record, config: str, batch_size: int, workers: int, loaders: dict, speeds: dict,
             cpu_ms: dict) -> None:
    """One row per provider: per-batch times of the rounds (p50 from the median img/s), against torch."""
    for b, loader in loaders.items():
        args = (NAME, b, f"{workers} workers", f"{config} B={batch_size}")
        baseline = None if b == "torch" else "torch"
        if isinstance(loader, str):
            record.add(*args, baseline=baseline, error=loader, images=batch_size)
            continue
        med = statistics.median(speeds[b])
        timing = {**summarize([1e3 * batch_size / v for v in speeds[b]]), "p50_ms": 1e3 * batch_size / med}
        record.add(*args, timing, baseline=baseline, headline=b != "torch", images=batch_size, img_per_s=med,
                   img_per_s_min=min(speeds[b]), img_per_s_max=max(speeds[b]), rounds=speeds[b],
                   cpu_ms_per_img=statistics.median(cpu_ms[b]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    image_dir = ensure_benchmark_images(args.images, width=args.width, height=args.height)
    images = list_images(image_dir)
    print(f"{args.images} images in {image_dir}, batch {args.batch_size}, {args.workers} workers, device {device}, "
          f"{args.rounds} rounds", flush=True)
    providers = [p for b in args.backends for p in ([f"ffcv@{r}" for r in args.resolutions] if b == "ffcv" else [b])]
    record = Record("loaders", device, args.out, cpu_count=os.cpu_count(), settings={
        "images": args.images, "batch_size": args.batch_size, "workers": args.workers, "rounds": args.rounds,
        "warmup_batches": args.warmup, "image_size": f"{args.width}x{args.height} JPEG q90",
        "ffcv_resolutions": args.resolutions})
    for config in args.configs:
        cfg = DataConfig(path=str(image_dir), batch_size_per_gpu=args.batch_size, num_workers=args.workers,
                         **crop_config(config))
        loaders = {b: build(b, cfg, images, device, image_dir) for b in providers}
        speeds, cpu_ms = run_rounds(loaders, args.rounds, args.warmup, device, config)
        add_rows(record, config, args.batch_size, args.workers, loaders, speeds, cpu_ms)
        del loaders

    rows = [[r["shape"].split(" ")[0], r["provider"], r["error"] or "ok"] + ([
        r["extra"]["img_per_s"], f"{r['extra']['img_per_s_min']:.1f}–{r['extra']['img_per_s_max']:.1f}",
        speedup(r, record.rows, "torch"), r["extra"]["cpu_ms_per_img"]] if r["error"] is None else [None] * 4)
        for r in record.rows]
    print_table(f"multi-crop loaders on {device} ({args.workers} workers, batch {args.batch_size})",
                ["config", "backend", "status", "img/s (median)", "min–max", "× torch", "CPU-ms/img"], rows)
    print(f"wrote {record.write()}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
