"""Crop statistics of a multi-crop augmentation, per crop kind, on real photographs (tests and the GPU check).

Per crop kind (G1, G2, locals): gray share, solarised share, sharpness (mean |Laplacian| of the luminance),
brightness (mean luminance), contrast (its standard deviation) and saturation (mean max − min over channels), from
normalised crops. The photographs are the ones scikit-image and matplotlib ship (no download), stored as JPEGs at
longest side 256, each used ``copies`` times so a loader epoch holds many images (each copy gets its own crops).

Tolerances come from the reference itself (``benchmarks.reference.DataAugmentationDINO``, run with two seeds): a
backend may differ from the first seed's value by ``K`` times the larger of the seed-to-seed difference and the
standard error of such a difference.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.reference import DataAugmentationDINO
from pipelines.folder import list_images
from pipelines.spec import IMAGENET_MEAN, IMAGENET_STD, LUMA, MultiCropSpec

STATS = ("gray", "solarised", "sharpness", "brightness", "contrast", "saturation")
K = 4.0  # tolerance in noise units (~54 comparisons per run: a 4-sigma band keeps chance failures below 1%)
Stats = dict[str, dict[str, np.ndarray]]  # kind → statistic → one value per crop


@contextlib.contextmanager
def one_torch_thread():
    """Small per-crop torch ops on a busy small machine: intra-op threads spend more time spinning than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{name} is not installed: pip install scikit-image matplotlib (make setup does)")
    return Path(list(spec.submodule_search_locations)[0])


def photographs() -> list[Path]:
    """Six colour photographs shipped inside scikit-image and matplotlib."""
    skimage_data = _package_dir("skimage") / "data"
    mpl_data = _package_dir("matplotlib") / "mpl-data" / "sample_data"
    return [skimage_data / f for f in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg",
                                       "motorcycle_left.png")] + [mpl_data / "grace_hopper.jpg"]


def photo_folder(root: Path, copies: int, longest_side: int = 256) -> Path:
    """``root/c<i>/<k>.jpg``: each photograph (one class each) as a q95 JPEG, ``copies`` times."""
    for i, path in enumerate(photographs()):
        img = Image.open(path).convert("RGB")
        img.thumbnail((longest_side, longest_side), Image.LANCZOS)
        first = root / f"c{i}" / "00.jpg"
        first.parent.mkdir(parents=True, exist_ok=True)
        img.save(first, quality=95)
        for k in range(1, copies):
            shutil.copyfile(first, first.with_name(f"{k:02d}.jpg"))
    return root


def crop_stats(crops: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-crop statistics of normalised crops ``[n, 3, S, S]`` (values back in [0, 1])."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = crops.float().cpu() * std + mean
    lum = LUMA[0] * x[:, 0] + LUMA[1] * x[:, 1] + LUMA[2] * x[:, 2]
    lap = 4 * lum[:, 1:-1, 1:-1] - lum[:, :-2, 1:-1] - lum[:, 2:, 1:-1] - lum[:, 1:-1, :-2] - lum[:, 1:-1, 2:]
    chroma = x.amax(1) - x.amin(1)
    return {"gray": (chroma.amax((1, 2)) < 1.5 / 255).double().numpy(),
            # solarize leaves no value ≥ 128/255 (uint8 pipelines even ≤ 127/255; FFCV's float pipeline keeps
            # values just under 128/255 that rounding would take to 127, so the bound is 128/255, not 0.5)
            "solarised": (x.amax((1, 2, 3)) < 128 / 255).double().numpy(),
            "sharpness": lap.abs().mean((1, 2)).double().numpy(),
            "brightness": lum.mean((1, 2)).double().numpy(),
            "contrast": lum.flatten(1).std(1).double().numpy(),
            "saturation": chroma.mean((1, 2)).double().numpy()}


def by_kind(batches: list[list[torch.Tensor]]) -> Stats:
    """Statistics of batches (each a list of crops ``[B, 3, S, S]`` in order G1, G2, L1..LN) per crop kind."""
    kinds = {"G1": [b[0] for b in batches], "G2": [b[1] for b in batches],
             "locals": [c for b in batches for c in b[2:]]}
    with one_torch_thread():
        return {kind: crop_stats(torch.cat([c.cpu() for c in crops])) for kind, crops in kinds.items()}


def reference_stats(folder: Path, spec: MultiCropSpec, seed: int, epochs: int) -> Stats:
    """The reference transform over every image of ``folder``, ``epochs`` times, seeded with ``seed``."""
    random.seed(seed)
    torch.manual_seed(seed)
    transform = DataAugmentationDINO(spec.global_scale, spec.local_scale, spec.n_local, spec.global_size,
                                     spec.local_size, spec.blur_sigma)
    files = list_images(folder).files
    batches = []
    with one_torch_thread():
        for _ in range(epochs):
            for path in files:
                with Image.open(path) as img:
                    batches.append([c[None] for c in transform(img.convert("RGB"))])
    return by_kind(batches)


def loader_stats(loader, epochs: int) -> Stats:
    """A loader's crops over ``epochs`` epochs."""
    batches = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        batches += [[c.clone() for c in batch.crops] for batch in loader]
    return by_kind(batches)


def tolerance(ref_a: np.ndarray, ref_b: np.ndarray) -> float:
    """K × the seed-to-seed noise of a mean: the two seeds' difference, or its standard error if larger."""
    se_diff = math.sqrt(ref_a.var(ddof=1) / len(ref_a) + ref_b.var(ddof=1) / len(ref_b))
    return K * max(abs(ref_a.mean() - ref_b.mean()), se_diff)


def compare(ours: Stats, ref_a: Stats, ref_b: Stats, name: str) -> tuple[list[str], list[str]]:
    """(report lines, the lines of statistics outside their tolerance) of ``ours`` against the reference."""
    report, failures = [], []
    for kind in ref_a:
        for s in STATS:
            want, got = ref_a[kind][s].mean(), ours[kind][s].mean()
            tol = tolerance(ref_a[kind][s], ref_b[kind][s])
            report.append(f"{kind:6s} {s:10s} reference {want:.4f} {name} {got:.4f} (tolerance ±{tol:.4f})")
            if abs(got - want) > tol:
                failures.append(report[-1])
    return report, failures
