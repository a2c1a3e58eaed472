"""Batched photometric augmentation of DINO with per-sample random parameters, on the device the batch lives on.

The reference chain after each crop (DINO_SPEC "Multi-crop augmentation"): colour jitter (brightness 0.4, contrast
0.4, saturation 0.2, hue 0.1, the four in a random order per sample, p = 0.8) → grayscale (p = 0.2) → Gaussian
blur (p per crop type, sigma ~ U(0.1, 2)) → solarize (p = 0.2 on G2) → normalise. The flip is done by the FFCV
decode op (``pipelines.ffcv.decoder``), which also cuts the crops. The ops, each with its torch and its numba
implementation, are in ``pipelines.ffcv.photometric``.

:class:`PhotometricAugment` draws the parameters with the spec's probabilities from a ``torch.Generator`` on the
batch's device, re-seeded per batch from (seed, rank, epoch, step) so a resumed run repeats the same draws, and
applies them: on CUDA with the batched torch ops, on CPU with the fused numba kernel
(``pipelines.ffcv.photometric.chain``: batched torch ops make several memory-bound passes over the whole batch, the
kernel one pass per crop while it is in cache). ``DINO_FAST_AUGMENT=torch|numba`` forces a path.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from pipelines.ffcv.photometric.chain import apply_photometric, photometric_cpu
from pipelines.ffcv.photometric.params import PhotometricParams, draw_params
from pipelines.loader import derive_seed
from pipelines.spec import MultiCropSpec


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
