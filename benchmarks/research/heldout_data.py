"""Held-out datasets for the small-data recipe: procedurally unlike the demo textures, never used for tuning.

The demo recipe (``dino_fast/configs/demo.yaml``) is tuned on the demo textures (``pipelines/demo_data.py``) only.
These sets check that it learns on data it was not tuned on, in the demo's format (64 px JPEGs, 2,400 training and
400 held-out images, so a run with only ``data.path`` changed makes the same 300 steps):

- ``glyphs``: 10 capital letters rendered from the system's TrueType fonts (DejaVu Sans/Serif/Mono in their
  weights and slants, else Pillow's built-in font), random size, stroke width, rotation (±25°), shear, position,
  dark ink on light paper (random grey levels), a few distractor strokes and sensor noise. A class is a letter.
- ``shapes``: 8 filled shapes (disc, square, triangle, star, plus, ring, hexagon, arrow) of random size, rotation,
  position and grey level on a cluttered background (a two-level grey gradient, 6–14 small random blobs and
  lines, noise). A class is an object's outline among clutter.
- ``glyphs-colour``, ``shapes-colour``: the same with random RGB colours per image (ink and paper in either order,
  a two-colour gradient): an image's colours are then the easiest thing two crops share, a shortcut that the
  photometric augmentation only partly removes.
- ``sketches`` (added 2026-12-05, after the recipe of that day was chosen; no lever has been tried on it): 8
  outline drawings made of parts (house, tree, car, fish, cup, umbrella, flower, ladder) in wobbly hand-drawn strokes
  of random width, random size, rotation (±20°), aspect and position, dark ink on ruled paper (random line spacing
  and tilt) with noise. A class is an arrangement of parts, not a filled silhouette or a letter.
- ``digits``: scikit-learn's bundled handwritten digits (1,797 real 8×8 scans, 10 classes; needs scikit-learn),
  upscaled bicubically to 64 px, split 80/20 at random (1,437 train, 360 held out): a real dataset of another size.

Usage: ``python -m benchmarks.research.heldout_data glyphs data/heldout/glyphs`` writes ``train/<class>/*.jpg`` and
``val/<class>/*.jpg`` there (deterministic for a given seed).
"""

from __future__ import annotations

import argparse
import glob
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LETTERS = ("A", "C", "E", "F", "H", "K", "L", "S", "X", "Z")
KINDS = ("glyphs", "shapes", "glyphs-colour", "shapes-colour", "digits", "sketches")
SHAPES = ("disc", "square", "triangle", "star", "plus", "ring", "hexagon", "arrow")
SKETCHES = ("house", "tree", "car", "fish", "cup", "umbrella", "flower", "ladder")


def _fonts() -> list[str]:
    return sorted(glob.glob("/usr/share/fonts/truetype/dejavu/DejaVu*.ttf"))


def _colour_pair(rng: np.random.Generator, colour: bool = True) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Ink and paper colours at least ~90 grey levels apart in brightness, in either order; without ``colour``
    dark grey ink on light grey paper."""
    if not colour:
        ink, paper = int(rng.integers(0, 100)), int(rng.integers(170, 256))
        return (ink,) * 3, (paper,) * 3
    while True:
        a, b = rng.integers(0, 256, (2, 3))
        if abs(a.mean() - b.mean()) > 90:
            return tuple(int(v) for v in a), tuple(int(v) for v in b)


def _noise(img: Image.Image, rng: np.random.Generator, sigma: float) -> Image.Image:
    arr = np.asarray(img, dtype=np.float64) + rng.normal(0, sigma, (img.height, img.width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def draw_glyph(letter: str, size: int, rng: np.random.Generator, fonts: list[str], colour: bool = False) -> Image.Image:
    ink, paper = _colour_pair(rng, colour)
    big = 3 * size  # draw large, transform, then downsample (antialiased edges)
    canvas = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(canvas)
    px = int(big * rng.uniform(0.45, 0.7))
    font = ImageFont.truetype(str(rng.choice(fonts)), px) if fonts else ImageFont.load_default(px)
    d.text((big / 2, big / 2), letter, fill=255, font=font, anchor="mm", stroke_width=int(rng.integers(0, 5)),
           stroke_fill=255)
    shear = rng.uniform(-0.3, 0.3)
    canvas = canvas.transform(canvas.size, Image.Transform.AFFINE,
                              (1, shear, -shear * big / 2, 0, 1, 0), resample=Image.Resampling.BILINEAR)
    canvas = canvas.rotate(rng.uniform(-25, 25), resample=Image.Resampling.BILINEAR,
                           translate=tuple(rng.uniform(-0.12, 0.12, 2) * big))
    d = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(0, 3))):  # distractor strokes
        x0, y0, x1, y1 = rng.uniform(0, big, 4)
        d.line((x0, y0, x1, y1), fill=255, width=int(rng.integers(2, 6)))
    mask = canvas.resize((size, size), Image.Resampling.LANCZOS)
    img = Image.composite(Image.new("RGB", (size, size), ink), Image.new("RGB", (size, size), paper), mask)
    return _noise(img, rng, 8)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring(n: int, radii: list[float], phase: float = 0.0) -> list[tuple[float, float]]:
        pts = []
        for i in range(n * len(radii)):
            t = angle + phase + 2 * math.pi * i / (n * len(radii))
            rr = r * radii[i % len(radii)]
            pts.append((cx + rr * math.cos(t), cy + rr * math.sin(t)))
        return pts

    if shape == "square":
        return ring(4, [1.0], math.pi / 4)
    if shape == "triangle":
        return ring(3, [1.0], -math.pi / 2)
    if shape == "star":
        return ring(5, [1.0, 0.42], -math.pi / 2)
    if shape == "hexagon":
        return ring(6, [1.0])
    unit = {  # outlines in a unit box, rotated below
        "plus": [(-.3, -1), (.3, -1), (.3, -.3), (1, -.3), (1, .3), (.3, .3), (.3, 1), (-.3, 1), (-.3, .3),
                 (-1, .3), (-1, -.3), (-.3, -.3)],
        "arrow": [(-1, -.25), (.2, -.25), (.2, -.7), (1, 0), (.2, .7), (.2, .25), (-1, .25)],
    }[shape]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in unit]


def _grey_or_colour(rng: np.random.Generator, n: int, colour: bool, low: int = 0, high: int = 256) -> np.ndarray:
    return rng.integers(low, high, (n, 3)) if colour else np.repeat(rng.integers(low, high, (n, 1)), 3, axis=1)


def draw_shape(shape: str, size: int, rng: np.random.Generator, colour: bool = False) -> Image.Image:
    big = 3 * size
    c0, c1 = _grey_or_colour(rng, 2, colour, 40, 216)
    t = np.linspace(0, 1, big)[None, :, None] * rng.uniform(-1, 1) + np.linspace(0, 1, big)[:, None, None] * \
        rng.uniform(-1, 1)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    img = Image.fromarray((c0 + (c1 - c0) * t).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 15))):  # clutter: small blobs and lines
        x, y = rng.uniform(0, big, 2)
        w = rng.uniform(4, 16)
        fill = tuple(int(v) for v in _grey_or_colour(rng, 1, colour)[0])
        if rng.random() < 0.5:
            d.ellipse((x, y, x + w, y + rng.uniform(4, 16)), fill=fill)
        else:
            d.line((x, y, x + rng.uniform(-30, 30), y + rng.uniform(-30, 30)), fill=fill, width=int(rng.integers(2, 5)))
    ink = tuple(int(v) for v in _grey_or_colour(rng, 1, colour)[0])
    if not colour:  # stand out from the background's mean grey by ≥ 70 levels
        mean = float((c0[0] + c1[0]) / 2)
        ink = (int(mean + 80 if mean < 128 else mean - 80),) * 3
    r = big * rng.uniform(0.2, 0.34)
    cx, cy = rng.uniform(r * 0.9, big - r * 0.9, 2)
    angle = rng.uniform(0, 2 * math.pi)
    if shape == "disc":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=ink)
    elif shape == "ring":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=ink, width=int(r * rng.uniform(0.25, 0.4)))
    else:
        d.polygon(_polygon(shape, cx, cy, r, angle), fill=ink)
    return _noise(img.resize((size, size), Image.Resampling.LANCZOS), rng, 8)


def _arc(cx: float, cy: float, rx: float, ry: float, a0: float = 0.0, a1: float = 360.0, n: int = 24):
    return [(cx + rx * math.cos(math.radians(a)), cy + ry * math.sin(math.radians(a)))
            for a in np.linspace(a0, a1, n)]


def _sketch_parts(name: str) -> list[list[tuple[float, float]]]:
    """The object's strokes in a unit box (x, y in [-1, 1], y down)."""
    if name == "house":
        return [[(-0.7, 0.9), (-0.7, -0.1), (0.7, -0.1), (0.7, 0.9), (-0.7, 0.9)],
                [(-0.85, -0.05), (0, -0.85), (0.85, -0.05)], [(-0.15, 0.9), (-0.15, 0.35), (0.2, 0.35), (0.2, 0.9)]]
    if name == "tree":
        return [[(-0.12, 0.95), (-0.12, 0.2)], [(0.12, 0.95), (0.12, 0.2)], _arc(0, -0.25, 0.75, 0.55, 100, 440, 30)]
    if name == "car":
        return [[(-0.95, 0.35), (-0.95, 0.0), (-0.45, -0.05), (-0.25, -0.45), (0.35, -0.45), (0.55, -0.05), (0.95, 0.0),
                 (0.95, 0.35), (-0.95, 0.35)], _arc(-0.5, 0.45, 0.2, 0.2), _arc(0.5, 0.45, 0.2, 0.2)]
    if name == "fish":
        return [_arc(-0.15, 0, 0.65, 0.38, 20, 340, 28), [(0.45, -0.15), (0.95, -0.5), (0.95, 0.5), (0.45, 0.15)],
                _arc(-0.5, -0.08, 0.06, 0.06, 0, 360, 8)]
    if name == "cup":
        return [[(-0.6, -0.6), (-0.45, 0.8), (0.45, 0.8), (0.6, -0.6), (-0.6, -0.6)],
                _arc(0.62, 0.05, 0.3, 0.3, -80, 80, 14)]
    if name == "umbrella":
        return [_arc(0, -0.1, 0.9, 0.7, 180, 360, 24) + [(-0.9, -0.1)], [(0, -0.1), (0, 0.75)],
                _arc(-0.15, 0.75, 0.15, 0.15, 0, 180, 10)]
    if name == "flower":
        centres = np.linspace(0, 2 * math.pi, 6)[:-1]
        petals = [_arc(0.45 * math.cos(a), -0.35 + 0.45 * math.sin(a), 0.22, 0.22) for a in centres]
        return [_arc(0, -0.35, 0.18, 0.18), *petals, [(0, 0.1), (0.05, 0.95)], _arc(0.25, 0.55, 0.22, 0.1, 0, 360, 12)]
    if name == "ladder":
        return [[(-0.4, -0.95), (-0.4, 0.95)], [(0.4, -0.95), (0.4, 0.95)],
                *[[(-0.4, y), (0.4, y)] for y in np.linspace(-0.7, 0.7, 5)]]
    raise ValueError(name)


def draw_sketch(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One of :data:`SKETCHES` in wobbly strokes on ruled paper."""
    big = 3 * size
    canvas = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(canvas)
    scale = big * rng.uniform(0.2, 0.3)
    sx, sy = scale * rng.uniform(0.8, 1.2), scale * rng.uniform(0.8, 1.2)
    width = int(rng.integers(3, 9))
    for stroke in _sketch_parts(name):
        pts = np.asarray(stroke, dtype=np.float64)
        # resample densely, then wobble: a hand-drawn line, not a ruler's
        seg = np.linspace(0, 1, 6)[:-1]
        dense = np.concatenate([a + (b - a) * seg[:, None] for a, b in zip(pts[:-1], pts[1:])] + [pts[-1:]])
        wobble = np.cumsum(rng.normal(0, 0.012, dense.shape), axis=0)
        dense = dense + wobble - wobble.mean(0) + rng.normal(0, 0.03, 2)
        xy = [(big / 2 + x * sx, big / 2 + y * sy) for x, y in dense]
        d.line(xy, fill=255, width=width, joint="curve")
    canvas = canvas.rotate(rng.uniform(-20, 20), resample=Image.Resampling.BILINEAR,
                           translate=tuple(rng.uniform(-0.08, 0.08, 2) * big))
    mask = canvas.resize((size, size), Image.Resampling.LANCZOS)
    paper = Image.new("L", (big, big), 0)
    pd = ImageDraw.Draw(paper)
    gap, tilt, offset = rng.uniform(0.08, 0.2) * big, rng.uniform(-0.15, 0.15), rng.uniform(0, big)
    for k in range(-3, int(big / gap) + 4):  # ruled lines across the page
        y = (offset + k * gap) % (big + 2 * gap) - gap
        pd.line((0, y, big, y + tilt * big), fill=255, width=2)
    lines = np.asarray(paper.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float64) / 255
    ink, light = int(rng.integers(0, 90)), int(rng.integers(180, 256))
    ruled = light - lines * rng.uniform(30, 80)
    ink_mask = np.asarray(mask, dtype=np.float64) / 255
    grey = ruled * (1 - ink_mask) + ink * ink_mask
    return _noise(Image.fromarray(grey.astype(np.uint8)).convert("RGB"), rng, 8)


def _write_digits(root: Path, image_size: int, seed: int) -> None:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("the 'digits' set needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    n_train = int(0.8 * len(order))
    for rank, i in enumerate(order):
        split = "train" if rank < n_train else "val"
        folder = root / split / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).convert("RGB")
        img.resize((image_size, image_size), Image.Resampling.BICUBIC).save(folder / f"{i:05d}.jpg", quality=95)


def generate(kind: str, root: str | Path, image_size: int = 64, train_images: int = 2400, val_images: int = 400,
             seed: int = 0) -> Path:
    """Write ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``; returns ``root``."""
    root = Path(root)
    if kind == "digits":
        _write_digits(root, image_size, seed)
        return root
    base, colour = kind.split("-")[0], kind.endswith("-colour")
    classes = {"glyphs": LETTERS, "shapes": SHAPES, "sketches": SKETCHES}[base]
    fonts = _fonts()
    for split, total, offset in (("train", train_images, 0), ("val", val_images, 1)):
        per_class = total // len(classes)
        for ci, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, offset, ci, 7])
            for i in range(per_class):
                img = (draw_glyph(cls, image_size, rng, fonts, colour) if base == "glyphs"
                       else draw_sketch(cls, image_size, rng) if base == "sketches"
                       else draw_shape(cls, image_size, rng, colour))
                img.save(folder / f"{cls}_{i:05d}.jpg", quality=95)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("root")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(generate(args.kind, args.root, args.size, seed=args.seed))


if __name__ == "__main__":
    main()
