"""The embedded demo dataset: small JPEGs of procedurally drawn textures, generated deterministically (no download).

Eight texture classes (horizontal, vertical and diagonal stripes, crosshatch, checkerboard, dots, grid, rings), each
drawn with random grey levels, period, phase and noise, so that a class is a structure rather than a colour or
brightness; a k-NN on the held-out split (chance 12.5%) measures whether the network learnt to see it. What a random
and a trained network score is measured in the README's demo section.
Layout: ``<root>/train/<class>/*.jpg`` and ``<root>/val/<class>/*.jpg`` (held-out split).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("hstripes", "vstripes", "diagonal", "crosshatch", "checker", "dots", "grid", "rings")
VERSION = 5


def _draw(cls: str, size: int, rng: np.random.Generator, hard: bool = False) -> Image.Image:
    """A full-frame texture of class ``cls``: random levels, period, phase and noise, so that every crop of the
    image still shows its class (DINO's local crops cover 5–40 % of it) and colour says nothing about the class.

    ``hard`` widens the nuisances (period 5–14 px, a third of the contrast, twice the noise, the pattern turned by up
    to ±15°, a brightness gradient): the same classes, harder to tell apart. It makes a second tuning set of the
    demo's kind (``benchmarks/research/recipe_check.py``, set ``textures-hard``) for when the demo set is saturated."""
    # What two crops of one image share is what self-distillation learns. So the per-image nuisances are kept
    # small (grey levels, contrast, period): vivid random colours or brightness would be an easier shared signal
    # than the texture. And no class is the mirror image of another: the horizontal flip augmentation teaches
    # flip invariance, so "diagonal" holds both directions rather than being two classes a flip confuses.
    bg = rng.uniform(50, 80) + rng.uniform(-6, 6, 3)
    fg = bg + rng.uniform(*((35, 60) if hard else (110, 140))) + rng.uniform(-6, 6, 3)
    period = rng.uniform(*((5, 14) if hard else (8, 11)))
    phase = rng.uniform(0, period, 2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    y, x = yy + phase[0], xx + phase[1]
    if hard:
        turn = np.deg2rad(rng.uniform(-15, 15))
        x, y = x * np.cos(turn) - y * np.sin(turn), x * np.sin(turn) + y * np.cos(turn)

    def band(v: np.ndarray) -> np.ndarray:
        return (v % period) < period / 2

    if cls == "hstripes":
        mask = band(y)
    elif cls == "vstripes":
        mask = band(x)
    elif cls == "diagonal":
        mask = band((x + rng.choice([-1, 1]) * y + size) / np.sqrt(2))
    elif cls == "crosshatch":
        thin = period / 4
        mask = (((x + y) / np.sqrt(2)) % period < thin) | (((x - y + size) / np.sqrt(2)) % period < thin)
    elif cls == "checker":
        mask = band(x) ^ band(y)
    elif cls == "dots":
        mask = ((x % period - period / 2) ** 2 + (y % period - period / 2) ** 2) < (period / 3.2) ** 2
    elif cls == "grid":
        mask = ((x % period) < period / 4) | ((y % period) < period / 4)
    else:  # rings around a random centre
        cy, cx = rng.uniform(0, size, 2)
        mask = band(np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) + phase[0])
    img = np.where(mask[..., None], fg, bg) + rng.normal(0, 24 if hard else 12, (size, size, 3))
    if hard:
        slope = rng.uniform(-40, 40, 2) / size
        img += (slope[0] * (yy - size / 2) + slope[1] * (xx - size / 2))[..., None]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def generate(root: str | Path, image_size: int = 64, per_class_train: int = 300, per_class_val: int = 50,
             seed: int = 0, hard: bool = False) -> None:
    """Write the dataset under ``root`` (overwriting). Deterministic for given arguments."""
    root = Path(root)
    for split, n, offset in (("train", per_class_train, 0), ("val", per_class_val, 1)):
        for ci, cls in enumerate(CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, offset, ci])
            for i in range(n):
                _draw(cls, image_size, rng, hard).save(folder / f"{cls}_{i:05d}.jpg", quality=95)


def default_root() -> Path:
    return Path(os.environ.get("DINO_FAST_DEMO_DIR", "data/demo"))


def ensure_demo_dataset(root: str | Path | None = None, image_size: int = 64, per_class_train: int = 300,
                        per_class_val: int = 50) -> tuple[Path, Path]:
    """Generate the demo dataset once (atomically: a temp folder renamed on success); return (train, val) dirs."""
    base = Path(root) if root is not None else default_root()
    final = base / f"textures-v{VERSION}-{image_size}px-{per_class_train}x{per_class_val}"
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
