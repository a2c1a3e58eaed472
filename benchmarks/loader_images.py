"""Benchmark images for the loader benchmark: ImageNet-like JPEGs (500×375 by default, quality 90), generated once
(in parallel: one process per core).

A loader's cost depends on the JPEG it decodes (size, entropy) and the crops it makes, not on what the picture
shows. These images have ImageNet's typical geometry and a natural-image bit rate (~70 kB each; ImageNet's
average is ~110 kB): a smooth two-colour gradient, a few dozen filled shapes, a mild blur that takes the edges'
aliasing away, and texture noise. Layout ``<root>/<class>/<i>.jpg`` (10 classes), so loaders see real labels.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

VERSION = 2  # 2: each image drawn from its own seed (parallel generation)
N_CLASSES = 10


def natural_image(rng: np.random.Generator, width: int = 500, height: int = 375) -> Image.Image:
    """One image: gradient background, random ellipses/rectangles/polygons, texture noise, slight blur."""
    c0, c1 = rng.integers(0, 256, (2, 3))
    t = np.linspace(0.0, 1.0, width)[None, :, None] * rng.uniform(0.3, 1.0)
    t = t + np.linspace(0.0, 1.0, height)[:, None, None] * rng.uniform(0.0, 0.7)
    base = c0 + (c1 - c0) * np.clip(t, 0, 1)
    img = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(15, 40))):
        x0, y0 = rng.uniform(-50, width), rng.uniform(-50, height)
        w, h = rng.uniform(10, 200, 2)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=fill)
        elif kind == 1:
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=fill)
        else:
            pts = [(float(x0 + rng.uniform(0, w)), float(y0 + rng.uniform(0, h))) for _ in range(5)]
            draw.polygon(pts, fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 1.5))))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _write_one(args: tuple[Path, int, int, int, int]) -> None:
    folder, seed, i, width, height = args
    img = natural_image(np.random.default_rng([seed, i]), width, height)
    img.save(folder / f"class{i % N_CLASSES:02d}" / f"{i:06d}.jpg", quality=90)


def ensure_benchmark_images(n_images: int, root: str | Path | None = None, seed: int = 0, width: int = 500,
                            height: int = 375) -> Path:
    """Generate ``n_images`` JPEGs of ``width``×``height`` once under ``root`` (default ``$DINO_FAST_BENCH_DIR`` or
    ``data/bench_images``); reuses a complete earlier set. Returns the folder to point a loader at."""
    base = Path(root or os.environ.get("DINO_FAST_BENCH_DIR", "data/bench_images"))
    size = "" if (width, height) == (500, 375) else f"-{width}x{height}"
    final = base / f"natural-v{VERSION}-{n_images}{size}"
    if (final / ".complete").exists():
        return final
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for c in range(min(N_CLASSES, n_images)):
        (tmp / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    jobs = [(tmp, seed, i, width, height) for i in range(n_images)]
    with ProcessPoolExecutor(max_workers=min(os.cpu_count() or 1, 16)) as pool:
        list(pool.map(_write_one, jobs, chunksize=16))
    (tmp / ".complete").write_text(f"version {VERSION}\n")
    shutil.rmtree(final, ignore_errors=True)
    try:
        tmp.rename(final)
    except OSError:  # another process finished the same set first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return final
