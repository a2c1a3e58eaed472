"""One factory for every loader backend, so the trainer and the benchmarks build them the same way."""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.folder import DataError, ImageList, list_images, read_file_list
from pipelines.loader import MultiCropLoader
from pipelines.spec import MultiCropSpec


def resolve_data_path(data_cfg, split: str = "train") -> Path:
    """``data.path=demo`` → the generated demo dataset's ``train``/``val`` folder; anything else is used as is for
    ``train``. A held-out ``val`` folder is looked for beside a ``train`` folder (``<parent>/val``)."""
    if not data_cfg.path:
        raise DataError("no data path given: set data.path=/path/to/images (or data.path=demo for the demo set)")
    if data_cfg.path == "demo":
        from pipelines.demo_data import ensure_demo_dataset

        train, val = ensure_demo_dataset(image_size=data_cfg.demo_image_size,
                                         per_class_train=data_cfg.demo_images_per_class)
        return train if split == "train" else val
    path = Path(data_cfg.path).expanduser()
    if split == "train":
        return path
    sibling = path.parent / split
    if path.name == "train" and sibling.is_dir():
        return sibling
    if path.name != "train":
        raise DataError(f"no held-out '{split}' split for data.path '{path}': one is looked for only beside a folder "
                        f"named 'train' (data.path=<root>/train with <root>/{split} next to it)")
    raise DataError(f"no held-out '{split}' folder '{sibling}' next to data.path '{path}'")


def build_loader(data_cfg, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device: torch.device | str = "cpu", images: ImageList | None = None) -> MultiCropLoader:
    """The loader of ``data_cfg.backend``, built with the one constructor of the loader contract
    (``pipelines.loader``): the backend's source, then the same arguments for every backend."""
    backend = data_cfg.backend
    if backend not in ("torch", "dali", "ffcv"):
        raise DataError(f"data.backend='{backend}' is not one of torch, dali, ffcv")
    if backend == "ffcv":
        from pipelines.ffcv.loader import FFCVMultiCropLoader as Backend

        source = data_cfg.ffcv_path
    else:
        if images is None and data_cfg.file_list:  # the checked list dino-fast-convert wrote: no folder scan
            images = read_file_list(data_cfg.file_list)
        source = images if images is not None else list_images(resolve_data_path(data_cfg, "train"))
        if backend == "torch":
            from pipelines.torch_loader import TorchMultiCropLoader as Backend
        else:
            from pipelines.dali import DaliMultiCropLoader as Backend
    return Backend(source, MultiCropSpec.from_config(data_cfg), data_cfg.batch_size_per_gpu, data_cfg.num_workers,
                   rank, world_size, seed, device)
