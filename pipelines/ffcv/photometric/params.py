"""The per-sample parameters of the photometric chain, drawn with the spec's probabilities and ranges."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from pipelines.ffcv.photometric.blur import blur_radius
from pipelines.spec import MultiCropSpec


@dataclass
class PhotometricParams:
    """Per-row parameters of one crop type (rows ``r = crop·B + image``)."""

    jitter: torch.Tensor  # bool [N]: colour jitter applied
    order: torch.Tensor  # int64 [N, 4]: op ids in application order (0 brightness, 1 contrast, 2 saturation, 3 hue)
    factors: torch.Tensor  # float32 [N, 4]: brightness, contrast, saturation factors and hue shift
    gray: torch.Tensor  # bool [N]
    blur_sigma: torch.Tensor  # float32 [N]
    blur_radius: torch.Tensor  # int64 [N]: ceil(3σ) where blurred, 0 where not
    solarize: torch.Tensor  # bool [N]

    def numpy(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name).cpu().numpy() for f in fields(self)}


def draw_params(n: int, spec: MultiCropSpec, blur_p: torch.Tensor, solarize_p: torch.Tensor,
                gen: torch.Generator) -> PhotometricParams:
    """Draw ``n`` rows of parameters on ``gen``'s device; ``blur_p``, ``solarize_p``: per-row probabilities."""
    dev = gen.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.empty(n, device=dev).uniform_(lo, hi, generator=gen)

    jitter = torch.rand(n, device=dev, generator=gen) < spec.jitter_p
    order = torch.rand(n, 4, device=dev, generator=gen).argsort(dim=1)  # a uniform random permutation per row
    factors = torch.stack([uniform(lo, hi) for lo, hi in spec.jitter_ranges()], dim=1)
    gray = torch.rand(n, device=dev, generator=gen) < spec.gray_p
    blur = torch.rand(n, device=dev, generator=gen) < blur_p.to(dev)
    sigma = uniform(*spec.blur_sigma)
    sol = torch.rand(n, device=dev, generator=gen) < solarize_p.to(dev)
    return PhotometricParams(jitter, order, factors, gray, sigma, torch.where(blur, blur_radius(sigma), 0), sol)
