"""The reference algorithm's pieces that benchmarks and tests compare with: the loss and center update (DINO_SPEC
"Loss", the baseline of bench_loss and bench_train) and the multi-crop augmentation (DINO_SPEC "Multi-crop
augmentation").

The pair-loop loss and the per-parameter EMA loop live once, beside the kernels they are the baseline of
(:mod:`dino_fast.ops.reference`), and are re-exported here; :class:`ReferenceDINOLoss` adds the reference's center
update to the loss, as its training step calls it.

:class:`DataAugmentationDINO` is the reference's transform as its repository composes it: torchvision transforms on
a PIL image, Python's ``random`` for blur and solarisation and torch's global RNG for the rest (so seed both).
"""

from __future__ import annotations

import random

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms

from dino_fast.ops.reference import ema_reference_loop, reference_dino_loss

__all__ = ["DataAugmentationDINO", "ReferenceDINOLoss", "ema_reference_loop", "reference_dino_loss"]


class ReferenceDINOLoss:
    """The reference's loss object: the pair loop, then center ← 0.9·center + 0.1·mean of the teacher rows."""

    def __init__(self, out_dim: int, ncrops: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 device: torch.device | str = "cpu"):
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center = torch.zeros(1, out_dim, device=device)

    def __call__(self, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        loss, _ = reference_dino_loss(student_output, teacher_output, self.center, teacher_temp, self.student_temp,
                                      self.ncrops)
        self.update_center(teacher_output)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """Single-process form of the reference update (the all-reduce is a no-op with one rank)."""
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


class _GaussianBlur:
    """The reference's blur: with probability p, PIL's GaussianBlur with radius ~ U(radius_min, radius_max)."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0):
        self.prob, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() > self.prob:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class _Solarization:
    """The reference's solarisation: with probability p, PIL's ``ImageOps.solarize`` (threshold 128)."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


class DataAugmentationDINO:
    """The reference's multi-crop transform: PIL image → ``[G1, G2, L1..LN]`` normalised float tensors.

    Defaults are the reference's (224/96 px, blur radius 0.1–2); tests may shrink the crops (``global_size``,
    ``local_size``) to stay fast, with the same ops in the same order.
    """

    def __init__(self, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), local_crops_number: int = 8,
                 global_size: int = 224, local_size: int = 96, blur_radius=(0.1, 2.0)):
        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply([transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                                   p=0.8),
            transforms.RandomGrayscale(p=0.2),
        ])
        normalize = transforms.Compose([
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ])
        bicubic = transforms.InterpolationMode.BICUBIC
        self.global_transfo1 = transforms.Compose([
            transforms.RandomResizedCrop(global_size, scale=global_crops_scale, interpolation=bicubic),
            flip_and_color_jitter,
            _GaussianBlur(1.0, *blur_radius),
            normalize,
        ])
        self.global_transfo2 = transforms.Compose([
            transforms.RandomResizedCrop(global_size, scale=global_crops_scale, interpolation=bicubic),
            flip_and_color_jitter,
            _GaussianBlur(0.1, *blur_radius),
            _Solarization(0.2),
            normalize,
        ])
        self.local_crops_number = local_crops_number
        self.local_transfo = transforms.Compose([
            transforms.RandomResizedCrop(local_size, scale=local_crops_scale, interpolation=bicubic),
            flip_and_color_jitter,
            _GaussianBlur(p=0.5, radius_min=blur_radius[0], radius_max=blur_radius[1]),
            normalize,
        ])

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        crops += [self.local_transfo(image) for _ in range(self.local_crops_number)]
        return crops
