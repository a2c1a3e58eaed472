"""The reference multi-crop augmentation as data (DINO_SPEC "Multi-crop augmentation"), shared by every backend.

The loaders that apply it, and the batch they yield, are defined by the loader contract in ``pipelines.loader``.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
# The luma of grayscale (and of contrast and saturation, which blend with it). The reference converts PIL images,
# whose "L" mode is R·299/1000 + G·587/1000 + B·114/1000 (ITU-R 601); DALI's GRAY conversion uses it too.
LUMA = (0.299, 0.587, 0.114)
# torchvision's tensor ops round the red weight to 0.2989. The batched photometric ops (pipelines.ffcv.photometric)
# are checked against those tensor ops to within 1e-6 (tests/test_gpu_augment.py), so they use this rounding.
LUMA_TORCHVISION = (0.2989, 0.587, 0.114)


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
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
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

    def jitter_ranges(self) -> tuple[tuple[float, float], ...]:
        """The uniform ranges torchvision's ColorJitter draws from: the brightness, contrast and saturation factors
        (``[max(0, 1 − x), 1 + x]``) and the hue shift in turns (``[−x, x]``)."""
        brightness, contrast, saturation, hue = self.jitter
        return tuple((max(0.0, 1 - x), 1 + x) for x in (brightness, contrast, saturation)) + ((-hue, hue),)

    def crops(self) -> list[CropSpec]:
        """The crops in output order G1, G2, L1..LN."""
        g1 = CropSpec("global1", self.global_size, self.global_scale, self.blur_p[0], self.solarize_p[0])
        g2 = CropSpec("global2", self.global_size, self.global_scale, self.blur_p[1], self.solarize_p[1])
        local = CropSpec("local", self.local_size, self.local_scale, self.blur_p[2], self.solarize_p[2])
        return [g1, g2] + [local] * self.n_local

    @classmethod
    def from_config(cls, data_cfg) -> MultiCropSpec:
        """Build from a :class:`dino_fast.config.DataConfig` (sizes, number of locals, scales, blur σ, the colour
        jitter, grayscale and solarize probabilities and the jitter's strengths)."""
        return cls(
            global_size=data_cfg.global_crop_size,
            local_size=data_cfg.local_crop_size,
            n_local=data_cfg.local_crops_number,
            global_scale=tuple(data_cfg.global_crops_scale),
            local_scale=tuple(data_cfg.local_crops_scale),
            blur_sigma=tuple(data_cfg.blur_sigma),
            jitter_p=data_cfg.jitter_p,
            jitter=tuple(data_cfg.jitter),
            gray_p=data_cfg.gray_p,
            solarize_p=tuple(data_cfg.solarize_p),
        )
