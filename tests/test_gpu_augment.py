"""Photometric ops vs torchvision on the same parameters, parameter rates, and the numba CPU kernel vs the torch ops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from pipelines.ffcv import augment
from pipelines.ffcv.photometric import jitter
from pipelines.ffcv.photometric.blur import blur_radius, gaussian_blur
from pipelines.ffcv.photometric.chain import apply_photometric
from pipelines.ffcv.photometric.grayscale import rgb_to_grayscale
from pipelines.ffcv.photometric.params import PhotometricParams, draw_params
from pipelines.ffcv.photometric.solarize import normalize, solarize
from pipelines.spec import MultiCropSpec


def _images(n: int = 6, h: int = 23, w: int = 29, seed: int = 0) -> torch.Tensor:
    """Random colours plus pixels on a 1/4 grid (gray pixels, ties between channels, exact 0 and 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, h, w, generator=g)
    coarse = torch.rand(n, 3, h, w, generator=g) < 0.3
    return torch.where(coarse, (x * 4).round() / 4, x)


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation", "hue"])
def test_jitter_ops_equal_torchvision(name):
    x = _images()
    g = torch.Generator().manual_seed(1)
    if name == "hue":
        params = torch.rand(6, generator=g) - 0.5
    else:
        params = torch.rand(6, generator=g) * 1.5 + 0.2
    ours = getattr(jitter, f"adjust_{name}")(x, params)
    ref = torch.stack([getattr(TF, f"adjust_{name}")(x[i], float(params[i])) for i in range(6)])
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=0)


def test_grayscale_blur_solarize_normalize_equal_torchvision():
    x = _images()
    torch.testing.assert_close(rgb_to_grayscale(x), TF.rgb_to_grayscale(x, num_output_channels=3), atol=1e-6,
                               rtol=0)
    sigma = torch.tensor([0.1, 0.33, 0.7, 1.0, 1.5, 2.0])
    radius = blur_radius(sigma)
    assert radius.tolist() == [1, 1, 3, 3, 5, 6]  # kernel 2·ceil(3σ) + 1 taps
    ref = torch.stack([TF.gaussian_blur(x[i], [2 * int(radius[i]) + 1] * 2, [float(sigma[i])] * 2) for i in range(6)])
    torch.testing.assert_close(gaussian_blur(x, sigma), ref, atol=2e-6, rtol=0)
    torch.testing.assert_close(solarize(x, 128 / 255), TF.solarize(x, 128 / 255), atol=0, rtol=0)
    spec = MultiCropSpec()
    torch.testing.assert_close(normalize(x, spec.mean, spec.std), TF.normalize(x, spec.mean, spec.std),
                               atol=1e-6, rtol=0)


def _torchvision_chain(x: torch.Tensor, p: PhotometricParams, spec: MultiCropSpec) -> torch.Tensor:
    """The reference chain, one row at a time with torchvision's functional ops."""
    names = ("adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue")
    out = []
    for i in range(x.shape[0]):
        img = x[i]
        if p.jitter[i]:
            for op in p.order[i].tolist():
                img = getattr(TF, names[op])(img, float(p.factors[i, op]))
        if p.gray[i]:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if p.blur_radius[i] > 0:
            k = 2 * int(p.blur_radius[i]) + 1
            img = TF.gaussian_blur(img, [k, k], [float(p.blur_sigma[i])] * 2)
        if p.solarize[i]:
            img = TF.solarize(img, spec.solarize_threshold / 255)
        out.append(TF.normalize(img, spec.mean, spec.std))
    return torch.stack(out)


def _params(n: int, seed: int, spec: MultiCropSpec, blur_p: float = 0.5, solarize_p: float = 0.5):
    return draw_params(n, spec, torch.full((n,), blur_p), torch.full((n,), solarize_p),
                          torch.Generator().manual_seed(seed))


def test_torch_chain_equals_torchvision_chain():
    spec = MultiCropSpec()
    x = _images(n=40, h=19, w=21, seed=3)
    p = _params(40, seed=4, spec=spec)
    assert p.jitter.any() and (~p.jitter).any() and len(set(map(tuple, p.order[p.jitter].tolist()))) > 5
    torch.testing.assert_close(apply_photometric(x.clone(), p, spec), _torchvision_chain(x, p, spec),
                               atol=2e-5, rtol=0)


@pytest.mark.parametrize("size", [11, 40])  # 11: blur radius up to 6 leaves no interior column
def test_numba_kernel_equals_torch_ops(size):
    spec = MultiCropSpec()
    g = torch.Generator().manual_seed(size)
    # a strided view, as the loader passes (crops of one type inside FFCV's packed rows)
    u8 = torch.randint(0, 256, (7, 4, size, size, 3), dtype=torch.uint8, generator=g)[:, 1:]
    p = _params(21, seed=5, spec=spec)
    aug_np = augment.PhotometricAugment(spec, "cpu", seed=0, impl="numba")
    aug_t = augment.PhotometricAugment(spec, "cpu", seed=0, impl="torch")
    assert aug_np.impl == "numba"
    ours, ref = aug_np.apply(u8, p), aug_t.apply(u8, p)
    assert ours.shape == (3, 7, 3, size, size) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=3e-5, rtol=0)
    x = u8.permute(1, 0, 4, 2, 3).reshape(21, 3, size, size).float() / 255  # and both match torchvision
    torch.testing.assert_close(ref.reshape(21, 3, size, size), _torchvision_chain(x, p, spec), atol=3e-5, rtol=0)


def _within(rate: float, p: float, n: int) -> bool:
    return abs(rate - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-9


def test_drawn_rates_and_ranges_match_the_spec():
    spec = MultiCropSpec()
    aug = augment.PhotometricAugment(spec, "cpu", seed=7, impl="torch")
    b = 4000
    aug.reseed(0, 0)
    glob, loc = aug.params(b)
    g1, g2 = slice(0, b), slice(b, 2 * b)
    for params, rows, blur_p, sol_p in ((glob, g1, 1.0, 0.0), (glob, g2, 0.1, 0.2), (loc, slice(None), 0.5, 0.0)):
        n = params.jitter[rows].numel()
        assert _within(params.jitter[rows].float().mean().item(), spec.jitter_p, n)
        assert _within(params.gray[rows].float().mean().item(), spec.gray_p, n)
        assert _within((params.blur_radius[rows] > 0).float().mean().item(), blur_p, n)
        assert _within(params.solarize[rows].float().mean().item(), sol_p, n)
    f, sigma = loc.factors, loc.blur_sigma
    for col, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        assert lo <= f[:, col].min() < lo + 0.01 and hi - 0.01 < f[:, col].max() <= hi
        assert abs(f[:, col].mean().item() - (lo + hi) / 2) < 0.01
    assert 0.1 <= sigma.min() < 0.11 and 1.99 < sigma.max() <= 2.0
    blurred = loc.blur_radius > 0
    assert torch.equal(loc.blur_radius[blurred], torch.ceil(3 * sigma[blurred]).long())
    perms = torch.unique(loc.order, dim=0, return_counts=True)[1]
    assert len(perms) == 24 and _within(perms.min().item() / len(loc.order), 1 / 24, len(loc.order))
    assert torch.equal(torch.sort(loc.order, dim=1).values, torch.arange(4).expand(len(loc.order), 4))


def test_grayscale_rate_on_pixels_and_reseeding():
    """Through the whole augmenter (numba kernel): gray crops (equal channels after un-normalising) ≈ 20 %."""
    spec = MultiCropSpec(global_size=24, local_size=12, n_local=6)
    g = torch.Generator().manual_seed(0)
    glob = torch.randint(0, 256, (100, 3, 24, 24, 3), dtype=torch.uint8, generator=g)[:, :2]
    loc = torch.randint(0, 256, (100, 7, 12, 12, 3), dtype=torch.uint8, generator=g)[:, 1:]
    aug = augment.PhotometricAugment(spec, "cpu", seed=1, impl="numba")
    crops = aug(glob, loc, epoch=2, step=5)
    assert len(crops) == 8 and [c.shape[-1] for c in crops] == [24, 24] + [12] * 6
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    gray = torch.cat([((c * std + mean).diff(dim=1).abs().amax(dim=(1, 2, 3)) < 1e-4) for c in crops])
    assert _within(gray.float().mean().item(), spec.gray_p, gray.numel())
    again = aug(glob, loc, epoch=2, step=5)
    other = aug(glob, loc, epoch=2, step=6)
    assert all(torch.equal(a, b) for a, b in zip(crops, again))
    assert not torch.equal(crops[0], other[0])


def test_impl_choice(monkeypatch):
    assert augment.resolve_impl(torch.device("cpu")) in ("numba", "torch")
    assert augment.resolve_impl(torch.device("cuda")) == "torch"
    monkeypatch.setenv("DINO_FAST_AUGMENT", "fast")
    with pytest.raises(ValueError, match="DINO_FAST_AUGMENT"):
        augment.resolve_impl(torch.device("cpu"))
    monkeypatch.setenv("DINO_FAST_AUGMENT", "numba")
    with pytest.raises(ValueError, match="CPU only"):
        augment.resolve_impl(torch.device("cuda"))
    np.testing.assert_equal(augment.resolve_impl(torch.device("cpu")), "numba")
