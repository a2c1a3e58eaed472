"""Throughput of the batched per-sample photometric augmentation (``pipelines.ffcv.augment``) on its device.

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

from benchmarks.common import Record, pick_device, print_table, speedup, time_fn
from pipelines.ffcv.augment import PhotometricAugment
from pipelines.spec import MultiCropSpec

NAME = "photometric augmentation"
REFERENCE, REFERENCE_MODE = "PIL", "1 core, per image"  # the torch loader's chain, as a worker runs it


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
    ref_ms = reference_per_image_ms(spec, n=2 if args.quick else 8)
    record = Record("augment", device, args.out)
    crops = f"2x224+{args.locals}x96"
    # Ours times a batch, the reference one image (the mean of n): the ratio is of images per second.
    shape, one = f"{crops} B={args.batch}", {"p20_ms": ref_ms, "p50_ms": ref_ms, "p80_ms": ref_ms}
    record.add(NAME, REFERENCE, REFERENCE_MODE, shape, one, images=1)
    ours = record.add(NAME, "ours", "batched on the device", shape, t, baseline=REFERENCE, baseline_mode=REFERENCE_MODE,
                      headline=True, images=args.batch, impl=aug.impl)
    ratio = speedup(ours, record.rows)
    path = record.write()
    print_table(f"photometric augmentation, {crops}, on {record.environment['device']}",
                ["provider", "img/s", "ms", "× one PIL core"],
                [[f"ours ({aug.impl})", args.batch / (t["p50_ms"] / 1e3), t["p50_ms"], ratio],
                 ["reference PIL, 1 core", 1e3 / ref_ms, ref_ms, 1.0]])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
