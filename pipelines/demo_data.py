"""The embedded demo dataset: small JPEGs of procedurally drawn shapes, generated deterministically (no download).

Eight classes (circle, square, triangle, cross, ring, horizontal stripes, vertical stripes, checkerboard), each
drawn with a random colour, position, scale and rotation over a random noisy background, so that a class is a
shape rather than a colour: a network that learns shape features beats a random one on k-NN.
Layout: ``<root>/train/<class>/*.jpg`` and ``<root>/val/<class>/*.jpg`` (held-out split).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "cross", "ring", "hstripes", "vstripes", "checker")
VERSION = 1


def _draw(cls: str, size: int, rng: np.random.Generator) -> Image.Image:
    bg = rng.integers(0, 256, 3)
    noise = rng.normal(0, 18, (size, size, 3))
    img = Image.fromarray(np.clip(bg + noise, 0, 255).astype(np.uint8))
    fg = tuple(int(c) for c in (bg + rng.integers(80, 176, 3)) % 256)  # far enough from the background
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.42) * size
    cx, cy = rng.uniform(r, size - r, 2)
    box = (cx - r, cy - r, cx + r, cy + r)
    width = max(2, int(r / 3))
    if cls == "circle":
        draw.ellipse(box, fill=fg)
    elif cls == "ring":
        draw.ellipse(box, outline=fg, width=width)
    elif cls == "square":
        draw.regular_polygon((cx, cy, r), 4, rotation=float(rng.uniform(0, 90)), fill=fg)
    elif cls == "triangle":
        draw.regular_polygon((cx, cy, r), 3, rotation=float(rng.uniform(0, 120)), fill=fg)
    elif cls == "cross":
        draw.rectangle((cx - r, cy - width / 2, cx + r, cy + width / 2), fill=fg)
        draw.rectangle((cx - width / 2, cy - r, cx + width / 2, cy + r), fill=fg)
    else:
        period = int(rng.integers(6, 13))
        yy, xx = np.mgrid[0:size, 0:size]
        phase = int(rng.integers(0, period))
        if cls == "hstripes":
            mask = ((yy + phase) // (period // 2)) % 2 == 0
        elif cls == "vstripes":
            mask = ((xx + phase) // (period // 2)) % 2 == 0
        else:
            mask = (((yy + phase) // period) + ((xx + phase) // period)) % 2 == 0
        arr = np.array(img)
        arr[mask] = fg
        img = Image.fromarray(arr)
    return img


def generate(root: str | Path, image_size: int = 64, per_class_train: int = 300, per_class_val: int = 50,
             seed: int = 0) -> None:
    """Write the dataset under ``root`` (overwriting). Deterministic for given arguments."""
    root = Path(root)
    for split, n, offset in (("train", per_class_train, 0), ("val", per_class_val, 1)):
        for ci, cls in enumerate(CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, offset, ci])
            for i in range(n):
                _draw(cls, image_size, rng).save(folder / f"{cls}_{i:05d}.jpg", quality=95)


def default_root() -> Path:
    return Path(os.environ.get("DINO_FAST_DEMO_DIR", "data/demo"))


def ensure_demo_dataset(root: str | Path | None = None, image_size: int = 64, per_class_train: int = 300,
                        per_class_val: int = 50) -> tuple[Path, Path]:
    """Generate the demo dataset once (atomically: a temp folder renamed on success); return (train, val) dirs."""
    base = Path(root) if root is not None else default_root()
    final = base / f"shapes-v{VERSION}-{image_size}px-{per_class_train}x{per_class_val}"
    if not (final / ".complete").exists():
        tmp = final.with_name(final.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        generate(tmp, image_size, per_class_train, per_class_val)
        (tmp / ".complete").write_text(f"version {VERSION}\n")
        if final.exists():
            shutil.rmtree(final)
        try:
            tmp.rename(final)
        except OSError:  # another process won the race; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return final / "train", final / "val"
