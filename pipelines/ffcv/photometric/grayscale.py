"""Grayscale (p = ``spec.gray_p``), and the luma that contrast and saturation blend with.

The weights are torchvision's tensor ones (``pipelines.spec.LUMA_TORCHVISION``): the torch ops are checked against
torchvision's tensor ops to 1e-6.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from pipelines.spec import LUMA_TORCHVISION

_WR, _WG, _WB = (np.float32(w) for w in LUMA_TORCHVISION)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma ``[N, 1, H, W]`` of an RGB batch ``[N, 3, H, W]``."""
    r, g, b = x.unbind(-3)
    return (LUMA_TORCHVISION[0] * r + LUMA_TORCHVISION[1] * g + LUMA_TORCHVISION[2] * b).unsqueeze(-3)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """Grayscale with 3 equal channels (torchvision rgb_to_grayscale, num_output_channels=3)."""
    return grayscale(x).expand_as(x).contiguous()


@numba.njit(cache=True, fastmath=True, inline="always")
def luma_cpu(r, g, b):
    """The luma of one float32 pixel."""
    return _WR * r + _WG * g + _WB * b


@numba.njit(cache=True, fastmath=True)
def grayscale_cpu(img):
    """A ``[3, P]`` float32 crop in place: every channel set to the luma."""
    for i in range(img.shape[1]):
        v = luma_cpu(img[0, i], img[1, i], img[2, i])
        img[0, i], img[1, i], img[2, i] = v, v, v
