"""Images/s of complete DINO steps: dino_fast's step vs the reference step, same model, same GPU (or CPU).

The steps and their providers (``ours`` and its variants, ``reference``, ``reference-repo``) are in
``benchmarks/steps.py``; this file feeds them crops and times them. Modes:

- ``synthetic``: random crops already on the device (the model-bound ceiling);
- ``torch``, ``dali``, ``ffcv``: crops from that loader over generated 500×375 JPEGs (end to end, with the
  data-wait share; FFCV reads them converted once to a .beton beside them).

``--batches 64,128,256`` sweeps the batch; ``--at PROVIDER=ARCH:B,...`` restricts a provider to some points (the
decision run in ``gpu_check.sh`` compiles at one point only). Each row of the record (``benchmarks/common.py``) is
one step time, median over ``--steps`` after ``--warmup`` (compile time included, in ``extra.warmup_s``); our rows
name the reference of the same mode as their baseline (DALI and FFCV rows: the reference on the torch loader when it
ran, end to end as users compare trainers). The JSON is rewritten after every row and ends with ``fastest``: our
fastest variant per arch, batch and mode with its ratio to each reference.

MFU = (FLOPs of one step, counted by ``torch.utils.flop_counter.FlopCounterMode`` on our step: student forward +
backward over all crops, teacher forward over the globals, the head and the loss matmuls) × steps/s ÷ the device's
dense bf16 peak (H100/H200 SXM: 989 TFLOP/s). Run: ``python -m benchmarks.bench_train [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from benchmarks.common import SCHEMA, Record, error_chain, error_text, find_row, pick_device, print_table, speedup, sync
from benchmarks.steps import (
    OURS_PROVIDERS,
    OursStep,
    add_step_args,
    apply_quick,
    bench_config,
    build_step,
    step_facts,
    step_shape,
    synthetic_crops,
)
from dino_fast.config import Config

NAME = "train step"
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
REFERENCES = ("reference", "reference-repo")
LOADER_MODES = ("dali", "ffcv")  # compared end to end with the reference on the torch loader


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
             flops: float | None = None) -> tuple[dict[str, float], int | None, dict[str, Any]]:
    """Time ``provider``'s step: (timing, peak memory bytes, extra). ``flops`` of one step, when known (the compiled
    step does the same work as ours); else counted on our eager step."""
    step = build_step(provider, cfg, device, args.reference_repo)
    static = torch.cuda.memory_allocated(device) if device.type == "cuda" else None  # weights, optimizer, buffers
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
    timing = {"p20_ms": 1e3 * times[len(times) // 5], "p50_ms": 1e3 * med, "p80_ms": 1e3 * times[4 * len(times) // 5],
              "n": len(times)}
    extra = {"img_per_s": b / med, "data_wait_share": sum(waits) / sum(times), "describe": step.describe,
             "warmup_s": warmup_s, "static_bytes": static}
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if flops:
        peak_flops_s = peak_flops(device)
        extra.update(step_tflop=flops / 1e12, achieved_tflops=flops / med / 1e12,
                     mfu=(flops / med / peak_flops_s) if peak_flops_s else None)
    del step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return timing, peak, extra


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_args(p, "vit_small_patch16_224,vit_base_patch16_224")
    p.add_argument("--batches", default=None, help="batch sweep, e.g. 64,128,256 (default: --batch)")
    p.add_argument("--at", action="append", default=[], metavar="PROVIDER=ARCH:B[,ARCH:B]",
                   help="run PROVIDER only at these arch/batch points (repeatable), e.g. "
                        "ours-compiled=vit_small_patch16_224:128; the torch.compile providers (a compile per model, "
                        "the slowest rows) always run after the others")
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
    p.add_argument("--append", action="store_true",
                   help="keep the rows already in the results file (a later part of the same run)")
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


def ours(row: dict[str, Any]) -> bool:
    return row["error"] is None and row["provider"].startswith("ours")


def fastest_variants(rows: list[dict[str, Any]]) -> list[dict]:
    """Per (arch, batch, mode): our fastest variant, its img/s and its ratio to each reference measured beside it."""
    best: dict[tuple, dict] = {}
    for r in filter(ours, rows):
        key = (r["extra"]["arch"], r["extra"]["batch"], r["mode"])
        if key not in best or r["extra"]["img_per_s"] > best[key]["extra"]["img_per_s"]:
            best[key] = r
    out = []
    for (arch, batch, mode), r in best.items():
        peak = r["peak_memory_bytes"]
        row = {"arch": arch, "batch": batch, "mode": mode, "fastest": r["provider"],
               "img_per_s": r["extra"]["img_per_s"], "peak_mem_gib": None if peak is None else peak / 2**30,
               "mfu": r["extra"].get("mfu")}
        for ref in REFERENCES:
            ratio = speedup(r, rows, ref)
            if ratio:
                row[f"vs_{ref.replace('-', '_')}"] = ratio
        out.append(row)
    return out


def set_baselines(rows: list[dict[str, Any]]) -> None:
    """Our rows' baseline: the reference of the same mode, or for our DALI and FFCV rows the reference on the torch
    loader when it ran (end to end, as users compare trainers)."""
    for r in filter(ours, rows):
        torch_loader = r["mode"] in LOADER_MODES and find_row(rows, NAME, r["shape"], "reference", "torch")
        r["baseline"] = {"provider": "reference", "mode": "torch" if torch_loader else r["mode"]}


DOES_NOT_FIT = "does not fit"


def predicted_peak(rows: list[dict[str, Any]], provider: str, arch: str, batch: int, mode: str) -> int | None:
    """Peak device bytes of ``provider`` at ``batch``, from its measured row of the same arch and mode at the largest
    smaller batch: the memory held before the first step (weights, optimizer) plus the rest scaled with the batch."""
    done = [r for r in rows if (r["provider"], r["extra"].get("arch"), r["mode"]) == (provider, arch, mode)
            and r["error"] is None and r["peak_memory_bytes"] and r["extra"].get("static_bytes") is not None
            and r["extra"]["batch"] < batch]
    if not done:
        return None
    r = max(done, key=lambda r: r["extra"]["batch"])
    static = r["extra"]["static_bytes"]
    return int(static + (r["peak_memory_bytes"] - static) * batch / r["extra"]["batch"])


def measure(record: Record, provider: str, cfg: Config, mode: str, args, flops: dict) -> dict[str, Any]:
    """One row: the step of ``provider`` timed, or why not (recorded, and the run goes on). On CUDA a configuration
    whose predicted peak exceeds the free memory is recorded as "does not fit" without running it, and one that runs
    out of memory all the same as "does not fit" with the error."""
    facts = step_facts(cfg)
    arch, batch, shape, t0 = facts["arch"], facts["batch"], step_shape(facts), time.perf_counter()
    device = record.device
    need = predicted_peak(record.rows, provider, arch, batch, mode) if device.type == "cuda" else None
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    if need is not None and need > 0.95 * free:
        row = record.add(NAME, provider, mode, shape, error=f"{DOES_NOT_FIT}: needs ~{need / 2**30:.1f} GiB "
                         f"(predicted from its smaller batch), {free / 2**30:.1f} GiB free", fits=False,
                         predicted_peak_bytes=need, **facts)
        row["extra"]["row_s"] = time.perf_counter() - t0
        return row
    try:
        timing, peak, extra = run_case(provider, cfg, mode, device, args, flops.get((arch, batch, mode)))
        if extra.get("step_tflop"):
            flops.setdefault((arch, batch, mode), extra["step_tflop"] * 1e12)
        row = record.add(NAME, provider, mode, shape, timing, peak_memory_bytes=peak, headline=provider in
                         OURS_PROVIDERS, **facts, **extra)
    except Exception as exc:  # record and go on: one failing case must not lose the others
        oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc)
        error = f"{DOES_NOT_FIT}: {error_text(exc)}" if oom else error_text(exc)
        row = record.add(NAME, provider, mode, shape, error=error, error_chain=error_chain(exc),
                         **({"fits": False} if oom else {}), **facts)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["extra"]["row_s"] = time.perf_counter() - t0
    return row


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    extra = list(args.set)
    if args.quick:
        apply_quick(args, extra)
        args.steps, args.warmup = 4, 2
    batches = [int(b) for b in (args.batches or str(args.batch)).split(",")]
    record = Record("train_step", device, args.out, stem=args.name, quick=args.quick,
                    mfu_formula="FlopCounterMode FLOPs of one step (student fwd+bwd all crops, teacher fwd globals, "
                                "loss) / median step time / dense bf16 peak")
    if args.append and record.path.exists():
        previous = json.loads(record.path.read_text())
        if previous.get("schema") == SCHEMA:
            record.rows = previous["rows"]
    table, flops = [], {}
    for arch, batch, mode, provider in _cases(args, batches):
        cfg = bench_config(arch, batch, args.locals, args.global_size, args.local_size, args.out_dim, device, extra)
        r = measure(record, provider, cfg, mode, args, flops)
        _write(record)  # after every row: a run cut off at its limit keeps the finished ones
        x = r["extra"]
        print(f"{arch} B={batch} {mode} {provider}: "
              + (r["error"][:120] if r["error"] else f"{x['img_per_s']:.1f} img/s") + f" ({x['row_s']:.0f} s)",
              flush=True)
        peak = None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2**30
        table.append([arch, batch, mode, provider, *(["-"] * 5 + [r["error"][:60]] if r["error"] else [
            x["img_per_s"], r["p50_ms"], x["data_wait_share"], x.get("mfu"), peak, x["describe"][:60]])])
    path = _write(record)
    print_table(f"DINO train step on {record.environment['device']} (median of {args.steps})",
                ["arch", "B", "mode", "provider", "img/s", "ms/step", "data wait", "MFU", "peak GiB", "setup"], table)
    print_fastest(fastest_variants(record.rows))
    print(f"wrote {path}")


def _write(record: Record):
    set_baselines(record.rows)
    return record.write(fastest=fastest_variants(record.rows))


def print_fastest(fastest: list[dict]) -> None:
    print_table("fastest variant per arch and batch", ["arch", "B", "mode", "fastest", "img/s", "MFU", "peak GiB",
                                                       "/ reference", "/ reference repo"],
                [[f["arch"], f["batch"], f["mode"], f["fastest"], f["img_per_s"], f.get("mfu"), f["peak_mem_gib"],
                  f.get("vs_reference"), f.get("vs_reference_repo")] for f in fastest])


if __name__ == "__main__":
    main()
