"""Throughput of the batched per-sample photometric augmentation (``pipelines.gpu_augment``) on its device.

Input: uint8 crops as the FFCV decode op hands them over (``[B, 2, 224, 224, 3]`` + ``[B, N, 96, 96, 3]``, already
on the device, so this is the augmentation alone); output: the normalised float crops of the batch contract.
Baseline: the reference's per-image PIL chain (``pipelines.torch_loader.augment_crop``, resized crop included) on
one CPU core, the work the torch loader does per image. Run: ``python -m benchmarks.bench_augment [--quick]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from benchmarks.common import environment, pick_device, print_table, results_path, time_fn, write_json
from pipelines.gpu_augment import PhotometricAugment
from pipelines.spec import MultiCropSpec


def reference_per_image_ms(spec: MultiCropSpec, n: int = 8) -> float:
    """The torch loader's per-image work for all crops: ``augment_crop`` (its resized crop included, which the
    batched path does not do: the FFCV op cuts the crops), at the spec's probabilities, on one core."""
    from pipelines.torch_loader import augment_crop, sample_generator

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8))
    t0 = time.perf_counter()
    for i in range(n):
        gen = sample_generator(0, 0, i)
        for c in spec.crops():
            augment_crop(img, c, spec, gen)
    return (time.perf_counter() - t0) * 1e3 / n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--locals", type=int, default=10)
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    if args.quick:
        args.batch, args.locals = 8, 4
    spec = MultiCropSpec(n_local=args.locals)
    aug = PhotometricAugment(spec, device, seed=0)
    g = torch.randint(0, 256, (args.batch, 2, 224, 224, 3), dtype=torch.uint8, device=device)
    loc = torch.randint(0, 256, (args.batch, args.locals, 96, 96, 3), dtype=torch.uint8, device=device)
    if device.type == "cpu":
        g, loc = g.contiguous(), loc.contiguous()
    t = time_fn(lambda: aug(g, loc, 0, 0), device, warmup=2, iters=3 if args.quick else 10)
    ours = args.batch / (t["median_ms"] / 1e3)
    ref_ms = reference_per_image_ms(spec, n=2 if args.quick else 8)
    rows = [["ours (" + aug.impl + ")", ours, t["median_ms"], ours * ref_ms / 1e3],
            ["reference PIL, 1 core", 1e3 / ref_ms, ref_ms, 1.0]]
    payload = {"benchmark": "augment", "env": environment(device), "batch": args.batch,
               "crops": f"2x224+{args.locals}x96", "timing": t, "img_per_s": ours,
               "reference_ms_per_img_one_core": ref_ms, "speedup_vs_one_reference_core": ours * ref_ms / 1e3}
    path = write_json(payload, results_path("augment", device, args.out))
    print_table(f"photometric augmentation, 2x224+{args.locals}x96, on {payload['env']['device']}",
                ["provider", "img/s", "ms", "× one PIL core"], rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
