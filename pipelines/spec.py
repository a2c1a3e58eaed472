"""The reference multi-crop augmentation as data, and the batch contract every loader backend yields.

Batch contract (every backend: ``torch``, ``dali``, ``ffcv``)
-----------------------------------------------------------
Iterating a loader yields :class:`MultiCropBatch` ``(crops, labels)``:

- ``crops``: a list of ``2 + n_local`` float32 tensors in crop order G1, G2, L1..LN. Globals are
  ``[B, 3, global_size, global_size]``, locals ``[B, 3, local_size, local_size]``; normalised with the ImageNet
  mean/std (so a pixel of value v in [0, 1] becomes (v − mean) / std). Row b of every crop comes from the same image.
- ``labels``: int64 ``[B]``, the class index of each image (its sub-folder in sorted order), ``-1`` for a flat folder.
- Tensors are on the device the backend produces them on (the GPU for DALI ``mixed`` / FFCV GPU augmentation,
  else the CPU); the trainer moves them with ``non_blocking=True``.

A loader object also has ``steps_per_epoch`` (== ``len(loader)``; the last incomplete batch is dropped) and
``set_epoch(epoch, start_step=0)``, which must be called before iterating an epoch: it fixes the shuffle of that
epoch (seeded from the run seed and the epoch) and skips the first ``start_step`` batches when resuming mid-epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


class MultiCropBatch(NamedTuple):
    crops: list[torch.Tensor]
    labels: torch.Tensor


class MultiCropLoader(Protocol):
    steps_per_epoch: int

    def set_epoch(self, epoch: int, start_step: int = 0) -> None: ...

    def __iter__(self): ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class CropSpec:
    """One crop of the multi-crop set: its geometry and its per-crop photometric probabilities."""

    name: str
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


@dataclass(frozen=True)
class MultiCropSpec:
    """The reference DINO augmentation (DINO_SPEC "Multi-crop augmentation"), shared by all backends."""

    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # G1, G2, locals
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: tuple[float, float, float] = (0.0, 0.2, 0.0)  # G1, G2, locals
    solarize_threshold: int = 128  # pixels >= threshold are inverted (uint8 scale)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def n_crops(self) -> int:
        return 2 + self.n_local

    def crops(self) -> list[CropSpec]:
        """The crops in output order G1, G2, L1..LN."""
        g1 = CropSpec("global1", self.global_size, self.global_scale, self.blur_p[0], self.solarize_p[0])
        g2 = CropSpec("global2", self.global_size, self.global_scale, self.blur_p[1], self.solarize_p[1])
        local = CropSpec("local", self.local_size, self.local_scale, self.blur_p[2], self.solarize_p[2])
        return [g1, g2] + [local] * self.n_local

    @classmethod
    def from_config(cls, data_cfg) -> MultiCropSpec:
        """Build from a :class:`dino_fast.config.DataConfig` (sizes, number of locals, scales, blur σ)."""
        return cls(
            global_size=data_cfg.global_crop_size,
            local_size=data_cfg.local_crop_size,
            n_local=data_cfg.local_crops_number,
            global_scale=tuple(data_cfg.global_crops_scale),
            local_scale=tuple(data_cfg.local_crops_scale),
            blur_sigma=tuple(data_cfg.blur_sigma),
        )
