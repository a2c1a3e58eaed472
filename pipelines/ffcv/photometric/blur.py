"""Gaussian blur (p per crop type, σ ~ U(``spec.blur_sigma``)).

Kernel size ``2·ceil(3σ) + 1`` taps (the ±3σ support DALI also uses; the reference's PIL ``GaussianBlur(radius=σ)``
is an approximate Gaussian of standard deviation σ), reflect padding as torchvision.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
import torch.nn.functional as F

_F0 = np.float32(0.0)


def blur_radius(sigma: torch.Tensor) -> torch.Tensor:
    """Kernel half-width ``ceil(3σ)`` (int64); the kernel has ``2·radius + 1`` taps."""
    return torch.ceil(3.0 * sigma).to(torch.int64)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample Gaussian blur (torchvision gaussian_blur with kernel_size 2·radius + 1 and this sigma).

    Separable: each row's 1-D kernel is zero-padded to the batch's largest radius R, the batch is reflect-padded by
    R (reflection does not depend on the pad width, so a shorter kernel sees torchvision's values), then a grouped
    horizontal and a grouped vertical convolution. x: ``[N, C, H, W]``; sigma, radius: ``[N]``.
    """
    n, c, h, w = x.shape
    if n == 0:
        return x
    sigma = sigma.to(device=x.device, dtype=torch.float32)
    radius = blur_radius(sigma) if radius is None else radius.to(x.device)
    big = int(radius.max())
    taps = torch.arange(-big, big + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma[:, None]) ** 2) * (taps.abs() <= radius[:, None])
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(x.dtype).repeat_interleave(c, 0)
    padded = F.pad(x, (big, big, big, big), mode="reflect").reshape(1, n * c, h + 2 * big, w + 2 * big)
    out = F.conv2d(padded, kernel.view(n * c, 1, 1, 2 * big + 1), groups=n * c)
    out = F.conv2d(out, kernel.view(n * c, 1, 2 * big + 1, 1), groups=n * c)
    return out.view(n, c, h, w)


@numba.njit(cache=True, fastmath=True, inline="always")
def _axpy(dst, a, src):
    for i in range(dst.size):  # contiguous 0-based loop: vectorised
        dst[i] += a * src[i]


@numba.njit(cache=True, fastmath=True)
def blur_cpu(img, size, sigma, radius, tmp):
    """Separable Gaussian blur of a ``[3, S·S]`` float32 crop in place, 2·radius + 1 taps, reflect padding;
    ``tmp``: a float32 scratch plane of S·S."""
    taps = 2 * radius + 1
    w = np.empty(taps, dtype=np.float32)
    total = 0.0
    for k in range(taps):
        total += math.exp(-0.5 * ((k - radius) / sigma) ** 2)
    for k in range(taps):
        w[k] = math.exp(-0.5 * ((k - radius) / sigma) ** 2) / total
    inner = size - 2 * radius  # output columns whose taps all fall inside the row
    for ch in range(3):
        plane, t = img[ch].reshape(size, size), tmp.reshape(size, size)
        for y in range(size):  # horizontal
            row, out = plane[y], t[y]
            out[:] = _F0
            if inner > 0:
                for k in range(taps):
                    _axpy(out[radius:radius + inner], w[k], row[k:k + inner])
            for x in range(size):
                if inner > 0 and radius <= x < size - radius:
                    continue
                acc = _F0
                for k in range(taps):
                    j = x + k - radius
                    j = -j if j < 0 else (2 * (size - 1) - j if j >= size else j)
                    acc += w[k] * row[j]
                out[x] = acc
        for y in range(size):  # vertical: whole rows, reflected row index
            out = plane[y]
            out[:] = _F0
            for k in range(taps):
                j = y + k - radius
                j = -j if j < 0 else (2 * (size - 1) - j if j >= size else j)
                _axpy(out, w[k], t[j])
