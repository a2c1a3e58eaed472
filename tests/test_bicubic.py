"""The FFCV op's bicubic crop resize against PIL, the library the reference resizes with.

PIL's ``Image.resize`` of one axis is unambiguous in every Pillow version; for two axes Pillow ≤ 12 runs the
horizontal pass first, while newer Pillow sometimes runs the vertical pass first (rounding between the passes then
differs by a level or so). So the op must equal PIL's two one-axis resizes in the classic order bit for bit, and
stay within rounding of the one-call resize of the installed Pillow.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.ffcv.bicubic import bicubic_weights, resize_crop, transpose_image


def _pil_two_pass(img: np.ndarray, top: int, left: int, h: int, w: int, out_h: int, out_w: int) -> np.ndarray:
    crop = Image.fromarray(img).crop((left, top, left + w, top + h))
    return np.asarray(crop.resize((out_w, h), Image.BICUBIC).resize((out_w, out_h), Image.BICUBIC))


def _ours(img: np.ndarray, top: int, left: int, h: int, w: int, size: int, flip: bool = False) -> np.ndarray:
    columns = transpose_image(img, np.empty(img.size, dtype=np.uint8))
    out = np.empty((size, size, 3), dtype=np.uint8)
    resize_crop(columns, top, left, h, w, out, flip)
    return out


def _photo_like(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth structure plus noise and one hard edge: overshoot, clipping and flat areas all occur."""
    low = Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    arr = np.asarray(low).astype(np.int16) + rng.integers(-25, 26, (h, w, 3))
    arr[:, w // 2:] = 255 - arr[:, w // 2:]
    return np.clip(arr, 0, 255).astype(np.uint8)


def test_weights_sum_to_one_and_cover_the_support():
    for n_in, n_out in [(500, 224), (97, 96), (40, 96), (1000, 7), (5, 5)]:
        first, taps, weights = bicubic_weights(n_in, n_out)
        sums = weights.sum(axis=1)
        assert np.all(np.abs(sums - (1 << 22)) <= taps), (n_in, n_out)  # each weight rounded on its own
        support = 2.0 * max(n_in / n_out, 1.0)
        assert taps.max() <= int(np.ceil(support)) * 2 + 1 and first.min() >= 0
        assert np.all(first + taps <= n_in)


@pytest.mark.parametrize("seed", [0, 1])
def test_equals_pil_bicubic_bit_for_bit(seed):
    rng = np.random.default_rng(seed)
    cases = 0
    for _ in range(60):
        H, W = (int(v) for v in rng.integers(12, 260, 2))
        img = _photo_like(rng, H, W) if rng.random() < 0.5 else rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        h, w = int(rng.integers(1, H + 1)), int(rng.integers(1, W + 1))
        top, left = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
        size = int(rng.choice([16, 33, 96, 224]))
        flip = bool(rng.random() < 0.5)
        want = _pil_two_pass(img, top, left, h, w, size, size)
        np.testing.assert_array_equal(_ours(img, top, left, h, w, size, flip), want[:, ::-1] if flip else want)
        cases += 1
    assert cases == 60


def test_close_to_the_installed_pillows_one_call_resize():
    """The reference calls ``crop(...).resize(size, BICUBIC)`` once: whatever pass order this Pillow picks, the crops
    differ by rounding only (unrelated crops differ by tens of levels)."""
    rng = np.random.default_rng(2)
    diffs = []
    for _ in range(40):
        img = _photo_like(rng, 300, 400)
        h, w = (int(v) for v in rng.integers(60, 300, 2))
        top, left = int(rng.integers(0, 300 - h + 1)), int(rng.integers(0, 400 - w + 1))
        size = int(rng.choice([96, 224]))
        ref = np.asarray(Image.fromarray(img).crop((left, top, left + w, top + h)).resize((size, size),
                                                                                          Image.BICUBIC))
        diffs.append(np.abs(_ours(img, top, left, h, w, size).astype(np.int16) - ref).mean())
    assert max(diffs) < 0.5, diffs
