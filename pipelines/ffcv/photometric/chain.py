"""The photometric chain jitter → gray → blur → solarize → normalise, with either implementation of its ops.

:func:`apply_photometric` runs the batched torch ops: jitter rows grouped by their op order (≤ 24 groups, one gather
and one scatter each), every other op on the rows that draw it. Each torch op makes a few memory-bound passes over
the whole batch, which on a CPU costs more than the baseline loader; :func:`photometric_cpu` therefore applies the
same parameters one crop at a time while it sits in cache, in parallel over crops.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from pipelines.ffcv.photometric.blur import blur_cpu, gaussian_blur
from pipelines.ffcv.photometric.grayscale import grayscale_cpu, rgb_to_grayscale
from pipelines.ffcv.photometric.jitter import JITTER_OPS, jitter_cpu
from pipelines.ffcv.photometric.params import PhotometricParams
from pipelines.ffcv.photometric.solarize import normalize, solarize, solarize_normalize_cpu
from pipelines.spec import MultiCropSpec


def apply_photometric(x: torch.Tensor, p: PhotometricParams, spec: MultiCropSpec) -> torch.Tensor:
    """The chain with torch ops; x ``[N, 3, H, W]`` in [0, 1] is overwritten, the normalised batch is returned."""
    rows = p.jitter.nonzero().squeeze(1)
    if rows.numel():
        codes = (p.order[rows] * torch.tensor([64, 16, 4, 1], device=x.device)).sum(1)
        for code in codes.unique().tolist():  # rows sharing an op order go through the four ops together
            sel = rows[codes == code]
            sub, f = x.index_select(0, sel), p.factors.index_select(0, sel)
            for op in ((code >> 6) & 3, (code >> 4) & 3, (code >> 2) & 3, code & 3):
                sub = JITTER_OPS[op](sub, f[:, op])
            x.index_copy_(0, sel, sub)
    sel = p.gray.nonzero().squeeze(1)
    if sel.numel():
        x.index_copy_(0, sel, rgb_to_grayscale(x.index_select(0, sel)))
    sel = (p.blur_radius > 0).nonzero().squeeze(1)
    if sel.numel():
        x.index_copy_(0, sel, gaussian_blur(x.index_select(0, sel), p.blur_sigma[sel], p.blur_radius[sel]))
    sel = p.solarize.nonzero().squeeze(1)
    if sel.numel():
        x.index_copy_(0, sel, solarize(x.index_select(0, sel), spec.solarize_threshold / 255.0))
    return normalize(x, spec.mean, spec.std)


@numba.njit(parallel=True, cache=True, fastmath=True)
def photometric_cpu(src, out, jitter, order, factors, gray, blur_sigma, blur_radius, solarize, threshold,
                    mean, std):
    """The chain on the CPU for one crop type, parameters explicit per row (:class:`PhotometricParams` as numpy).

    Args:
        src: uint8 ``[B, C, S, S, 3]`` crops (HWC); row ``r = c·B + b`` is crop c of image b.
        out: float32 ``[C, B, 3, S, S]``, written with the normalised result.
        jitter, gray, solarize: bool ``[C·B]``; order: int64 ``[C·B, 4]``; factors: float32 ``[C·B, 4]``
            (brightness, contrast, saturation, hue); blur_sigma: float32 ``[C·B]``; blur_radius: int64 ``[C·B]``
            (0 = no blur); threshold: solarize threshold in [0, 1]; mean, std: float32 ``[3]``.
    """
    n_img, n_crop, size = src.shape[0], src.shape[1], src.shape[2]
    for r in numba.prange(n_crop * n_img):
        c, b = r // n_img, r % n_img
        img = out[c, b].reshape(3, size * size)
        pix = src[b, c]
        for y in range(size):
            for x in range(size):
                for ch in range(3):
                    img[ch, y * size + x] = np.float32(pix[y, x, ch]) / np.float32(255.0)
        if jitter[r]:
            for k in range(4):
                jitter_cpu(img, order[r, k], factors[r, order[r, k]])
        if gray[r]:
            grayscale_cpu(img)
        if blur_radius[r] > 0:
            blur_cpu(img, size, blur_sigma[r], blur_radius[r], np.empty(size * size, dtype=np.float32))
        solarize_normalize_cpu(img, solarize[r], threshold, mean, std)
