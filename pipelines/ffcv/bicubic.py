"""PIL's bicubic resize of a crop (what the reference's ``RandomResizedCrop(..., BICUBIC)`` does), in numba.

The reference crops a PIL image and resizes it with ``Image.resize(size, BICUBIC)``: a separable cubic filter
(a = −0.5) whose support widens with the shrink factor (antialiasing), horizontal pass first into a uint8 image,
then the vertical pass; 22-bit fixed-point weights, each pass rounded and clipped to uint8 (Pillow's
``Resample.c``: ``precompute_coeffs``, ``normalize_coeffs_8bpc``, ``ImagingResampleInner``). This module computes
the same weights and the same integer sums, so its crops equal PIL's bit for bit (tested against PIL).

Speed: both passes are written as axpy loops over contiguous rows (LLVM vectorises them): the horizontal pass runs
over the image transposed once per image (:func:`transpose_image`, shared by all its crops), the vertical pass over
the horizontal result transposed back. A horizontal flip costs nothing: the horizontal pass writes its columns in
reverse order.

With ``NUMBA_DISABLE_JIT=1`` (FFCV's pure-Python debugging mode) the inner loops fall back to numpy slice
arithmetic, so a small test stays fast.
"""

from __future__ import annotations

import math

import numba
import numpy as np

_BITS = 22  # Pillow's PRECISION_BITS for 8-bit images: 32 - 8 - 2
_HALF = 1 << (_BITS - 1)
_ONE = float(1 << _BITS)

if numba.config.DISABLE_JIT:  # pure Python: numpy does the inner loops

    def _madd(acc, k, src):
        acc += k * src.astype(np.int32)

    def _clip8(acc, dst):
        dst[:] = np.clip(acc >> _BITS, 0, 255)

    def _transpose_pixels(src, dst, n_major, n_minor):
        """``dst[j, i] = src[i, j]`` for RGB pixels: src ``[n_major, n_minor·3]`` → dst ``[n_minor, n_major·3]``."""
        dst.reshape(n_minor, n_major, 3)[:] = src.reshape(n_major, n_minor, 3).transpose(1, 0, 2)

else:

    @numba.njit(cache=True, fastmath=True)
    def _madd(acc, k, src):
        for i in range(acc.size):  # contiguous, 0-based: vectorised (uint8 → int32 widening multiply-add)
            acc[i] += k * np.int32(src[i])

    @numba.njit(cache=True, fastmath=True)
    def _clip8(acc, dst):
        for i in range(acc.size):
            dst[i] = min(max(acc[i] >> _BITS, 0), 255)

    @numba.njit(cache=True)
    def _transpose_pixels(src, dst, n_major, n_minor):
        """``dst[j, i] = src[i, j]`` for RGB pixels: src ``[n_major, n_minor·3]`` → dst ``[n_minor, n_major·3]``."""
        block = 32  # tiles that stay in L1 on both sides
        for i0 in range(0, n_major, block):
            for j0 in range(0, n_minor, block):
                for i in range(i0, min(i0 + block, n_major)):
                    row = src[i]
                    for j in range(j0, min(j0 + block, n_minor)):
                        out = dst[j]
                        out[3 * i] = row[3 * j]
                        out[3 * i + 1] = row[3 * j + 1]
                        out[3 * i + 2] = row[3 * j + 2]


@numba.njit(cache=True)
def _cubic(x: float) -> float:
    """Pillow's bicubic kernel (a = −0.5)."""
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@numba.njit(cache=True)
def bicubic_weights(in_size: int, out_size: int):
    """Pillow's resampling weights from ``in_size`` to ``out_size`` pixels: (first input pixel ``[out]``, number of
    taps ``[out]``, 22-bit fixed-point weights ``[out, max taps]`` int32), as ``precompute_coeffs`` and
    ``normalize_coeffs_8bpc`` compute them (same double arithmetic, same truncations)."""
    scale = in_size / out_size
    fscale = max(scale, 1.0)
    support = 2.0 * fscale
    ksize = int(math.ceil(support)) * 2 + 1
    inv = 1.0 / fscale
    first = np.empty(out_size, dtype=np.int64)
    taps = np.empty(out_size, dtype=np.int64)
    weights = np.zeros((out_size, ksize), dtype=np.int32)
    w = np.empty(ksize, dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        n = min(int(center + support + 0.5), in_size) - lo
        total = 0.0
        for x in range(n):
            w[x] = _cubic((x + lo - center + 0.5) * inv)
            total += w[x]
        for x in range(n):
            v = w[x] / total if total != 0.0 else w[x]
            weights[xx, x] = int(v * _ONE - 0.5) if v < 0 else int(v * _ONE + 0.5)
        first[xx], taps[xx] = lo, n
    return first, taps, weights


@numba.njit(cache=True)
def transpose_image(image, out):
    """The decoded image ``[H, W, 3]`` as ``out[:W·H·3]`` viewed ``[W, H·3]`` (column x of the image = row x)."""
    h, w = image.shape[0], image.shape[1]
    t = out[:h * w * 3].reshape(w, h * 3)
    _transpose_pixels(image.reshape(h, w * 3), t, h, w)
    return t


@numba.njit(cache=True)
def resize_crop(columns, top: int, left: int, h: int, w: int, crop, flip: bool) -> None:
    """``crop[:] = PIL.Image.fromarray(image).crop((left, top, left + w, top + h)).resize(size, BICUBIC)``,
    mirrored left-right when ``flip``.

    Args:
        columns: the image transposed by :func:`transpose_image`, ``[W, H·3]`` uint8.
        crop: uint8 ``[S, S, 3]`` destination (written in full).
    """
    out_h, out_w = crop.shape[0], crop.shape[1]
    first_h, taps_h, weights_h = bicubic_weights(w, out_w)
    first_v, taps_v, weights_v = bicubic_weights(h, out_h)
    y0 = first_v[0]  # the vertical pass reads crop rows [y0, y1) only
    y1 = first_v[out_h - 1] + taps_v[out_h - 1]
    n = (y1 - y0) * 3
    a, b = (top + y0) * 3, (top + y1) * 3
    acc = np.empty(max(n, out_w * 3), dtype=np.int32)
    horiz = np.empty((out_w, n), dtype=np.uint8)  # horizontal result, transposed: row = output column
    for xx in range(out_w):
        acc_h = acc[:n]
        acc_h[:] = _HALF
        for j in range(taps_h[xx]):
            _madd(acc_h, weights_h[xx, j], columns[left + first_h[xx] + j, a:b])
        _clip8(acc_h, horiz[out_w - 1 - xx] if flip else horiz[xx])
    rows = np.empty((y1 - y0, out_w * 3), dtype=np.uint8)
    _transpose_pixels(horiz, rows, out_w, y1 - y0)
    out = crop.reshape(out_h, out_w * 3)
    acc_v = acc[:out_w * 3]
    for yy in range(out_h):
        acc_v[:] = _HALF
        for j in range(taps_v[yy]):
            _madd(acc_v, weights_v[yy, j], rows[first_v[yy] - y0 + j])
        _clip8(acc_v, out[yy])
