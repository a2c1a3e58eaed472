"""Batched photometric augmentation of DINO with per-sample random parameters, on the device the batch lives on.

The reference chain after each crop (DINO_SPEC "Multi-crop augmentation"): colour jitter (brightness 0.4, contrast
0.4, saturation 0.2, hue 0.1, the four in a random order per sample, p = 0.8) → grayscale (p = 0.2) → Gaussian
blur (p per crop type, sigma ~ U(0.1, 2)) → solarize (p = 0.2 on G2) → normalise. The flip is done by the FFCV
decode op (``pipelines.ffcv_ops``), which also cuts the crops.

- The ops are plain functions of a float batch ``[N, 3, H, W]`` in [0, 1] and explicit per-sample parameters
  (tensors of length N); each equals torchvision's functional op on one image with the same parameter.
- Blur kernel size: ``2·ceil(3σ) + 1`` taps (the ±3σ support DALI also uses; the reference's PIL
  ``GaussianBlur(radius=σ)`` is an approximate Gaussian of standard deviation σ), reflect padding as torchvision.
- Pixel values stay float between ops (the PIL reference rounds to uint8 after each op); solarize inverts values
  ≥ 128/255.
- :class:`PhotometricAugment` draws the parameters with the spec's probabilities from a ``torch.Generator`` on the
  batch's device, re-seeded per batch from (seed, rank, epoch, step) so a resumed run repeats the same draws, and
  applies them: on CUDA with these torch ops (jitter rows grouped by their op order, ≤ 24 groups, one gather and one
  scatter each), on CPU with the fused numba kernel ``pipelines.ffcv_ops.photometric_cpu`` (~3 ms per image of
  2×224 + 8×96 where these torch ops take ~35 ms on a 2-core CPU). ``DINO_FAST_AUGMENT=torch|numba`` forces a path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.loader import derive_seed
from pipelines.spec import MultiCropSpec

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision / PIL "L"


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma ``[N, 1, H, W]`` of an RGB batch ``[N, 3, H, W]``."""
    r, g, b = x.unbind(-3)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(-3)


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


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """Grayscale with 3 equal channels (torchvision rgb_to_grayscale, num_output_channels=3)."""
    return grayscale(x).expand_as(x).contiguous()


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


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Invert values ≥ threshold (torchvision solarize on float images)."""
    return torch.where(x >= threshold, 1.0 - x, x)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``(x − mean) / std`` per channel."""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # index = op id in `order`


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


def apply_photometric(x: torch.Tensor, p: PhotometricParams, spec: MultiCropSpec) -> torch.Tensor:
    """The chain jitter → gray → blur → solarize → normalise with torch ops; x ``[N, 3, H, W]`` in [0, 1] is
    overwritten, the normalised batch is returned."""
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


def resolve_impl(device: torch.device, impl: str = "auto") -> str:
    """``numba`` on CPU (``torch`` when numba's JIT is disabled), ``torch`` on CUDA; the env variable
    DINO_FAST_AUGMENT (torch | numba) overrides."""
    impl = os.environ.get("DINO_FAST_AUGMENT", impl)
    if impl not in ("auto", "torch", "numba"):
        raise ValueError(f"DINO_FAST_AUGMENT={impl!r} is not one of auto, torch, numba")
    if impl == "auto":  # with NUMBA_DISABLE_JIT the numba kernel would run as Python loops
        from numba import config

        return "torch" if device.type == "cuda" or config.DISABLE_JIT else "numba"
    if impl == "numba" and device.type != "cpu":
        raise ValueError("DINO_FAST_AUGMENT=numba runs on the CPU only; use torch for a CUDA device")
    return impl


class PhotometricAugment:
    """Draws per-sample parameters (the spec's probabilities, per crop type) and applies them to a multi-crop batch.

    Args:
        spec: the augmentation parameters. device: where the batch and the generator live.
        seed, rank: key the per-batch generator seed together with (epoch, step).
        impl: ``auto`` | ``torch`` | ``numba`` (see :func:`resolve_impl`).
    """

    def __init__(self, spec: MultiCropSpec, device: torch.device | str, seed: int, rank: int = 0,
                 impl: str = "auto"):
        self.spec, self.device, self.seed, self.rank = spec, torch.device(device), seed, rank
        self.impl = resolve_impl(self.device, impl)
        self.gen = torch.Generator(device=self.device)

    def reseed(self, epoch: int, step: int) -> None:
        self.gen.manual_seed(derive_seed(self.seed, self.rank, epoch, step))

    def params(self, batch_size: int) -> tuple[PhotometricParams, PhotometricParams]:
        """Parameters for the globals (rows G1 × B then G2 × B) and the locals (N × B rows)."""
        b, n_local = batch_size, self.spec.n_local
        p_blur, p_sol = self.spec.blur_p, self.spec.solarize_p
        g_blur = torch.tensor([p_blur[0]] * b + [p_blur[1]] * b)
        g_sol = torch.tensor([p_sol[0]] * b + [p_sol[1]] * b)
        glob = draw_params(2 * b, self.spec, g_blur, g_sol, self.gen)
        loc = draw_params(n_local * b, self.spec, torch.full((n_local * b,), p_blur[2]),
                          torch.full((n_local * b,), p_sol[2]), self.gen)
        return glob, loc

    def apply(self, u8: torch.Tensor, p: PhotometricParams) -> torch.Tensor:
        """uint8 crops ``[B, C, S, S, 3]`` → normalised float32 ``[C, B, 3, S, S]``."""
        b, c, s = u8.shape[:3]
        if self.impl == "numba":
            from pipelines.ffcv_ops import photometric_cpu

            out = torch.empty((c, b, 3, s, s), dtype=torch.float32)
            a = p.numpy()
            photometric_cpu(u8.numpy(), out.numpy(), a["jitter"], a["order"], a["factors"], a["gray"],
                            a["blur_sigma"], a["blur_radius"], a["solarize"],
                            np.float32(self.spec.solarize_threshold / 255.0),
                            np.asarray(self.spec.mean, dtype=np.float32), np.asarray(self.spec.std, dtype=np.float32))
            return out
        x = u8.to(self.device, non_blocking=True).permute(1, 0, 4, 2, 3)
        x = x.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0).view(c * b, 3, s, s)
        return apply_photometric(x, p, self.spec).view(c, b, 3, s, s)

    def __call__(self, globals_u8: torch.Tensor, locals_u8: torch.Tensor, epoch: int, step: int) -> list[torch.Tensor]:
        """The crops G1, G2, L1..LN as ``[B, 3, S, S]`` float32 tensors on the device."""
        self.reseed(epoch, step)
        glob, loc = self.params(globals_u8.shape[0])
        crops = list(self.apply(globals_u8, glob).unbind(0))
        if self.spec.n_local:
            crops += list(self.apply(locals_u8, loc).unbind(0))
        return crops
