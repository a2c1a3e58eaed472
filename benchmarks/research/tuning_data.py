"""A tuning set of another kind than the demo textures: grey patches of real photographs.

Two texture sets (``demo``, ``textures-hard``) told recipe levers apart only for textures: the one that won there
(lr 0.016) lost on every held-out set (README "Small datasets"). ``photos`` is real, object-centric data, so a lever
must work on natural image statistics too before it is checked on the held-out sets:

- 8 photographs shipped inside scikit-image and matplotlib (astronaut, cat, coffee cup, rocket, motorcycle, Grace
  Hopper, cameraman, coins), resized to a 256 px short side and turned grey, so that colour is no shortcut (the
  held-out sets are grey too). A class is a photograph.
- An image is a square patch of 25–63% of the short side at a random place, flipped half the time, turned by up to
  ±10°, resized to 64 px, with random contrast (×0.6–1.4), brightness (±30) and sensor noise (σ 6).
- 2,400 training and 400 held-out images in the demo's layout, so a run with only ``data.path`` changed makes the
  same 300 steps. Training and held-out patches are independent draws from the same photographs.

The held-out sets (:mod:`benchmarks.research.heldout_data`) stay out of all tuning.
Usage: ``python -m benchmarks.research.tuning_data data/tuning/photos``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.research.crop_stats import _package_dir, photographs

PHOTO_CLASSES = ("astronaut", "cat", "coffee", "rocket", "motorcycle", "hopper", "cameraman", "coins")


def photo_sources() -> list[Path]:
    """The 8 photographs, in :data:`PHOTO_CLASSES` order."""
    skimage_data = _package_dir("skimage") / "data"
    return photographs() + [skimage_data / "camera.png", skimage_data / "coins.png"]


def _grey(path: Path, short_side: int = 256) -> Image.Image:
    img = Image.open(path).convert("L")
    scale = short_side / min(img.size)
    return img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)


def draw_patch(photo: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    side = rng.uniform(0.25, 0.63) * min(photo.size)
    x = rng.uniform(0, photo.width - side)
    y = rng.uniform(0, photo.height - side)
    patch = photo.crop((round(x), round(y), round(x + side), round(y + side)))
    patch = patch.rotate(rng.uniform(-10, 10), resample=Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        patch = patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(patch.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float64)
    arr = (arr - arr.mean()) * rng.uniform(0.6, 1.4) + arr.mean() + rng.uniform(-30, 30)
    arr = arr + rng.normal(0, 6, arr.shape)
    grey = np.clip(arr, 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))


def generate(root: str | Path, image_size: int = 64, train_images: int = 2400, val_images: int = 400,
             seed: int = 0) -> Path:
    """Write ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``; returns ``root``."""
    root = Path(root)
    photos = [_grey(p) for p in photo_sources()]
    for split, total, offset in (("train", train_images, 0), ("val", val_images, 1)):
        per_class = total // len(PHOTO_CLASSES)
        for ci, (cls, photo) in enumerate(zip(PHOTO_CLASSES, photos, strict=True)):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, offset, ci, 11])
            for i in range(per_class):
                draw_patch(photo, image_size, rng).save(folder / f"{cls}_{i:05d}.jpg", quality=95)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(generate(args.root, args.size, seed=args.seed))


if __name__ == "__main__":
    main()
