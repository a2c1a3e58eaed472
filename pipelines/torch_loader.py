"""The baseline loader: the reference multi-crop augmentation on PIL images in DataLoader workers.

This is the algorithm of the reference repository (torchvision ops on PIL, DINO_SPEC "Multi-crop augmentation")
and the baseline every fast backend is benchmarked against. Two deliberate differences, neither numeric:

- every random draw of one sample comes from a ``torch.Generator`` seeded by (run seed, epoch, image index)
  (``pipelines.loader.sample_seed``) instead of the global RNGs, so a run resumed mid-epoch sees exactly the crops
  an uninterrupted run sees;
- an unreadable image is replaced by the next readable one with a warning instead of killing the run.
"""

from __future__ import annotations

import math
import warnings

import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset

from pipelines.folder import DataError, ImageList
from pipelines.loader import MultiCropBatch, MultiCropLoader, sample_seed
from pipelines.spec import CropSpec, MultiCropSpec
from pipelines.workers import ignore_interrupts, raise_if_a_worker_died, report_worker_failures_at_next


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=gen))


def sample_resized_crop(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                        gen: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (top, left, h, w), 10 tries then a central crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(gen, scale[0], scale[1])
        aspect = math.exp(_uniform(gen, log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def color_jitter(img: Image.Image, spec: MultiCropSpec, gen: torch.Generator) -> Image.Image:
    """torchvision ColorJitter: four factors drawn, then applied in a random order."""
    order = torch.randperm(4, generator=gen).tolist()
    b, c, s, h = (_uniform(gen, lo, hi) for lo, hi in spec.jitter_ranges())
    for op in order:
        if op == 0:
            img = TF.adjust_brightness(img, b)
        elif op == 1:
            img = TF.adjust_contrast(img, c)
        elif op == 2:
            img = TF.adjust_saturation(img, s)
        else:
            img = TF.adjust_hue(img, h)
    return img


def augment_crop(img: Image.Image, crop: CropSpec, spec: MultiCropSpec, gen: torch.Generator) -> torch.Tensor:
    """One crop of one image, as the reference: RRC (bicubic) → flip → jitter → gray → blur → solarize → normalise."""
    width, height = img.size
    top, left, h, w = sample_resized_crop(height, width, crop.scale, spec.ratio, gen)
    out = TF.resized_crop(img, top, left, h, w, [crop.size, crop.size], TF.InterpolationMode.BICUBIC)
    if float(torch.rand(1, generator=gen)) < spec.flip_p:
        out = TF.hflip(out)
    if float(torch.rand(1, generator=gen)) < spec.jitter_p:
        out = color_jitter(out, spec, gen)
    if float(torch.rand(1, generator=gen)) < spec.gray_p:
        out = TF.to_grayscale(out, num_output_channels=3)
    if float(torch.rand(1, generator=gen)) <= crop.blur_p:  # the reference's blur tests `<=`
        out = out.filter(ImageFilter.GaussianBlur(radius=_uniform(gen, *spec.blur_sigma)))
    if float(torch.rand(1, generator=gen)) < crop.solarize_p:
        out = ImageOps.solarize(out, spec.solarize_threshold)
    return TF.normalize(TF.to_tensor(out), spec.mean, spec.std)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, epoch, index))


class MultiCropDataset(Dataset):
    """Key ``(index, epoch)`` → (list of crops, label); the augmentation is a pure function of the key and seed."""

    def __init__(self, images: ImageList, spec: MultiCropSpec, seed: int):
        self.images = images
        self.spec = spec
        self.seed = seed
        self.crop_specs = spec.crops()

    def __len__(self) -> int:
        return len(self.images.files)

    def load(self, index: int) -> tuple[Image.Image, int]:
        """Open image ``index``; an unreadable one is replaced by the next readable one, with a warning."""
        n = len(self.images.files)
        for attempt in range(min(n, 16)):
            i = (index + attempt) % n
            path = self.images.files[i]
            try:
                with Image.open(path) as im:
                    return im.convert("RGB"), self.images.labels[i]
            except Exception as exc:  # PIL raises many types for truncated/corrupt/non-image files
                warnings.warn(f"skipping unreadable image {path} ({type(exc).__name__}: {exc})", stacklevel=2)
        raise DataError(f"16 consecutive images from {self.images.files[index]} are unreadable; check the folder")

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        img, label = self.load(index)
        gen = sample_generator(self.seed, epoch, index)
        return [augment_crop(img, c, self.spec, gen) for c in self.crop_specs], label


def collate(samples) -> MultiCropBatch:
    n_crops = len(samples[0][0])
    crops = [torch.stack([s[0][i] for s in samples]) for i in range(n_crops)]
    return MultiCropBatch(crops, torch.tensor([s[1] for s in samples], dtype=torch.int64))


class _EpochBatches:
    """The DataLoader's batch sampler: the keys of the owner's current epoch (from its ``start_step``), read each
    time the DataLoader starts an epoch, so one DataLoader and its workers serve every epoch."""

    def __init__(self, owner: TorchMultiCropLoader):
        self.owner = owner

    def __iter__(self):
        return iter(self.owner.batch_keys())

    def __len__(self) -> int:
        return self.owner.steps_per_epoch - self.owner.start_step


class TorchMultiCropLoader(MultiCropLoader):
    """Batches of :class:`MultiCropBatch` from an image list (the constructor and the batch: ``pipelines.loader``).

    The workers persist from one epoch to the next (the keys carry the epoch): a new set of forked workers per epoch
    cost ~1.7 s per epoch on 2 CPU cores (the fork's copy-on-write of a process holding torch and the model),
    which doubled the time of a small data set's 2-step epochs.
    """

    def __init__(self, images: ImageList, spec: MultiCropSpec, batch_size: int, num_workers: int = 0, rank: int = 0,
                 world_size: int = 1, seed: int = 0, device: torch.device | str = "cpu"):
        super().__init__(len(images.files), images.root, spec, batch_size, num_workers, rank, world_size, seed, device)
        self.dataset = MultiCropDataset(images, spec, seed)
        self._loader: DataLoader | None = None

    def batch_keys(self) -> list[list[tuple[int, int]]]:
        order = self.epoch_order().reshape(-1, self.batch_size)
        return [[(int(i), self.epoch) for i in batch] for batch in order]

    def _data_loader(self) -> DataLoader:
        if self._loader is None:
            self._loader = DataLoader(
                self.dataset,
                batch_sampler=_EpochBatches(self),
                num_workers=self.num_workers,
                collate_fn=collate,
                pin_memory=self.device.type == "cuda",
                generator=torch.Generator(),  # keeps the global RNG (drop-path) untouched by the loader
                prefetch_factor=4 if self.num_workers else None,
                persistent_workers=self.num_workers > 0,
                worker_init_fn=ignore_interrupts if self.num_workers else None,
            )
        return self._loader

    def close(self) -> None:
        """Shut the workers down now (they otherwise live until the loader is freed)."""
        loader, self._loader = self._loader, None
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def __iter__(self):
        finished = False
        try:
            batches = iter(self._data_loader())  # starts the workers on the first epoch, resumes them after
            report_worker_failures_at_next()
            yield from batches
            raise_if_a_worker_died(batches)  # one that died after its last batch of the epoch
            finished = True
        finally:
            if not finished:  # left mid-epoch, or a worker died: these workers go, the next epoch starts new ones
                self.close()
