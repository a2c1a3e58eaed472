"""DALI's GPU graph (nvJPEG ``mixed`` decode, every op on the GPU) where DALI is installed: build, batch contract,
crop statistics against the reference and the CPU graph, then timed runs over ``hw_decoder_load`` × threads.

Where DALI is not installed (the lent GPU machine: DALI is ~1 GB and cannot travel) it prints
``dali-gpu: not installed (...)``, records that, and exits 0. Images: real photographs
(``benchmarks.research.crop_stats``) for the contract and the statistics, the loader benchmark's generated
500×375 JPEGs for the timing.
Run: ``python -m benchmarks.gpu.dali_gpu_check [--runs 50] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import environment, results_path, write_json

LOADS = (0.0, 0.65, 0.99)
THREADS = (4, 8, 14)


def check_contract(loader, spec) -> dict[str, Any]:
    """Shapes, dtype, device, finiteness; crops of an earlier batch stay valid after later runs (zero-copy)."""
    loader.set_epoch(0)
    it = iter(loader)
    first = next(it)
    kept = [c.clone() for c in first.crops]
    for _ in range(2):
        next(it)
    torch.cuda.synchronize()
    sizes = [spec.global_size] * 2 + [spec.local_size] * spec.n_local
    ok = all(c.is_cuda and c.dtype == torch.float32 and tuple(c.shape[1:]) == (3, s, s)
             and bool(torch.isfinite(c).all()) for c, s in zip(first.crops, sizes))
    unchanged = all(torch.equal(a, b) for a, b in zip(kept, first.crops))
    return {"contract_ok": ok and len(first.crops) == spec.n_crops, "zero_copy_outputs_stable": unchanged}


def check_statistics(work: Path) -> dict[str, Any]:
    """The GPU graph's and the CPU graph's crop statistics against two seeds of the reference (as the test)."""
    from benchmarks.research.crop_stats import compare, loader_stats, photo_folder, reference_stats
    from pipelines.dali import DaliMultiCropLoader
    from pipelines.folder import list_images
    from pipelines.spec import MultiCropSpec

    spec, epochs = MultiCropSpec(global_size=112, local_size=48, n_local=4), 6
    photos = list_images(photo_folder(work / "photos", copies=24))
    ref = reference_stats(Path(photos.root), spec, 0, epochs), reference_stats(Path(photos.root), spec, 1, epochs)
    out: dict[str, Any] = {}
    for name, device in (("dali-gpu", torch.device("cuda")), ("dali-cpu", torch.device("cpu"))):
        stats = loader_stats(DaliMultiCropLoader(photos, spec, 48, 8, 0, 1, 1, device), epochs)
        report, failures = compare(stats, *ref, name)
        print("\n".join(report), flush=True)
        out[name] = {"report": report, "outside_tolerance": failures}
    return out


def time_grid(runs: int, batch: int) -> list[dict[str, Any]]:
    """img/s of ``runs`` pipeline runs (after 5 untimed) for each hw_decoder_load × thread count."""
    from benchmarks.loader_images import ensure_benchmark_images
    from pipelines.dali import DaliMultiCropLoader
    from pipelines.folder import list_images
    from pipelines.spec import MultiCropSpec

    images = list_images(ensure_benchmark_images(max(1024, batch * 8)))
    spec = MultiCropSpec(n_local=10)
    rows = []
    for load in LOADS:
        for threads in THREADS:
            loader = DaliMultiCropLoader(images, spec, batch, threads, 0, 1, 0, torch.device("cuda"),
                                         hw_decoder_load=load)
            n, epoch, timed, t0 = 0, 0, 0, 0.0
            while timed < runs:
                loader.set_epoch(epoch)
                for _ in loader:
                    n += 1
                    if n == 5:
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                    elif n > 5:
                        timed += 1
                        if timed == runs:
                            break
                epoch += 1
            torch.cuda.synchronize()
            speed = runs * batch / (time.perf_counter() - t0)
            rows.append({"hw_decoder_load": load, "threads": threads, "img_per_s": speed, "runs": runs})
            print(f"dali-gpu 2x224+10x96 batch {batch}: hw_decoder_load {load}, {threads} threads: {speed:.0f} img/s",
                  flush=True)
            del loader
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=50, help="timed pipeline runs per setting")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    payload: dict[str, Any] = {"benchmark": "dali_gpu", "env": environment(device)}
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as exc:
        print(f"dali-gpu: not installed ({exc}); skipped", flush=True)
        payload["status"] = f"not installed: {exc}"
    else:
        if device.type != "cuda":
            print("dali-gpu: no CUDA device; skipped", flush=True)
            payload["status"] = "no CUDA device"
        else:
            from pipelines.dali import DaliMultiCropLoader
            from pipelines.folder import list_images
            from pipelines.spec import MultiCropSpec

            with tempfile.TemporaryDirectory() as tmp:
                from benchmarks.research.crop_stats import photo_folder

                spec = MultiCropSpec(n_local=10)
                photos = list_images(photo_folder(Path(tmp) / "contract", copies=16))
                payload["contract"] = check_contract(DaliMultiCropLoader(photos, spec, 32, 8, 0, 1, 0, device), spec)
                print(f"dali-gpu contract: {payload['contract']}", flush=True)
                payload["statistics"] = check_statistics(Path(tmp))
            payload["timing"] = time_grid(args.runs, args.batch)
            payload["status"] = "ok"
    print(f"wrote {write_json(payload, results_path('dali_gpu', device, args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
