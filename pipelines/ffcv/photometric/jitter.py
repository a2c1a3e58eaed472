"""Colour jitter (p = ``spec.jitter_p``): brightness, contrast, saturation and hue, applied in a random order per
sample as torchvision's ColorJitter (the order and the factors are drawn by ``pipelines.ffcv.photometric.params``).

Every op clamps to [0, 1] as torchvision's float ops do. The pixel values stay float between ops, where the PIL
reference rounds to uint8 after each.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from pipelines.ffcv.photometric.grayscale import grayscale, luma_cpu

_F0, _F1, _F2, _F4, _F6 = np.float32(0.0), np.float32(1.0), np.float32(2.0), np.float32(4.0), np.float32(6.0)


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f * a + (1.0 - f) * b).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``clamp(x · f)`` per sample (torchvision adjust_brightness). x: ``[N, 3, H, W]``, factor: ``[N]``."""
    return (x * _col(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the mean of each sample's grayscale image (torchvision adjust_contrast)."""
    return _blend(x, grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), _col(factor, x))


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with each sample's grayscale image (torchvision adjust_saturation)."""
    return _blend(x, grayscale(x), _col(factor, x))


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` turns per sample (torchvision adjust_hue), shift in [-0.5, 0.5].

    Math: with M = max(r, g, b), d = M − min(r, g, b) and the hue in sixths of a turn h6 ∈ [0, 6) (torchvision's
    branch order: r, then g, then b), the shifted colour is channel_n = M − d · clamp(min(k, 4 − k), 0, 1) with
    k = (n + h6 + 6·shift) mod 6 and n = 5, 3, 1 for R, G, B. This is HSV→RGB in closed form (v·s = d), so saturation
    and value are untouched as in torchvision, in about a quarter of its passes over the image.
    """
    r, g, b = x.unbind(-3)
    mn, mx = torch.aminmax(x, dim=-3)
    d = mx - mn
    safe = torch.where(d > 0, d, torch.ones_like(d))
    h6 = torch.where(mx == r, (g - b) / safe, torch.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h6 += 6.0 * _col(shift, x).squeeze(1)
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        out.append(mx - d * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(out, dim=-3)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # index = op id in `order`


@numba.njit(cache=True, fastmath=True)
def jitter_cpu(img, op, f):
    """One colour-jitter op on a ``[3, P]`` float32 crop in place: op 0 brightness, 1 contrast, 2 saturation, 3 hue
    (the ids of ``JITTER_OPS``), factor or hue shift ``f``. Loops over one plane with float32 constants vectorise."""
    r, g, b = img[0], img[1], img[2]
    n = r.size
    f = np.float32(f)
    if op == 0:
        for i in range(n):
            r[i], g[i], b[i] = min(max(f * r[i], _F0), _F1), min(max(f * g[i], _F0), _F1), min(max(f * b[i], _F0), _F1)
    elif op == 1:  # blend with the mean of the grayscale image
        acc = 0.0
        for i in range(n):
            acc += luma_cpu(r[i], g[i], b[i])
        o = (_F1 - f) * np.float32(acc / n)
        for i in range(n):
            r[i], g[i], b[i] = min(max(f * r[i] + o, _F0), _F1), min(max(f * g[i] + o, _F0), _F1), \
                min(max(f * b[i] + o, _F0), _F1)
    elif op == 2:  # blend with the grayscale pixel
        for i in range(n):
            o = (_F1 - f) * luma_cpu(r[i], g[i], b[i])
            r[i], g[i], b[i] = min(max(f * r[i] + o, _F0), _F1), min(max(f * g[i] + o, _F0), _F1), \
                min(max(f * b[i] + o, _F0), _F1)
    else:  # hue: the closed form of adjust_hue, branch-free per pixel
        shift = _F6 * f
        for i in range(n):
            rr, gg, bb = r[i], g[i], b[i]
            mx, mn = max(rr, max(gg, bb)), min(rr, min(gg, bb))
            d = mx - mn
            inv = _F1 / d if d > _F0 else _F0
            h6 = (gg - bb) * inv if mx == rr else ((_F2 + (bb - rr) * inv) if mx == gg else _F4 + (rr - gg) * inv)
            h6 += shift
            r[i] = mx - d * _hue_weight(h6 + np.float32(5.0))
            g[i] = mx - d * _hue_weight(h6 + np.float32(3.0))
            b[i] = mx - d * _hue_weight(h6 + _F1)


@numba.njit(cache=True, fastmath=True, inline="always")
def _hue_weight(k):
    """clamp(min(k, 4 − k), 0, 1) with k taken mod 6 (k ∈ (−6, 12) here)."""
    k = k - _F6 if k >= _F6 else k
    k = k + _F6 if k < _F0 else k
    return min(max(min(k, _F4 - k), _F0), _F1)
