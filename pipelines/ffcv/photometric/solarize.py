"""Solarize (p per crop type: 0.2 on G2) and the final normalisation, which the CPU loop fuses with it.

Solarize inverts values ≥ ``spec.solarize_threshold``/255; normalising maps v to (v − mean) / std per channel.
"""

from __future__ import annotations

import numba
import numpy as np
import torch


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Invert values ≥ threshold (torchvision solarize on float images)."""
    return torch.where(x >= threshold, 1.0 - x, x)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``(x − mean) / std`` per channel."""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


@numba.njit(cache=True, fastmath=True)
def solarize_normalize_cpu(img, solarize, threshold, mean, std):
    """A ``[3, P]`` float32 crop in place: solarized when ``solarize`` (threshold in [0, 1]), then normalised with
    float32 ``mean``, ``std`` ``[3]``: one pass over each plane."""
    one = np.float32(1.0)
    for ch in range(3):
        m, inv_s = mean[ch], one / std[ch]
        plane = img[ch]
        if solarize:
            for i in range(plane.size):
                v = plane[i]
                plane[i] = ((one - v if v >= threshold else v) - m) * inv_s
        else:
            for i in range(plane.size):
                plane[i] = (plane[i] - m) * inv_s
