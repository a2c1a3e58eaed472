"""Shared fixtures: a tiny image folder and a tiny, fast run config."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Without a GPU, Triton kernels run in its interpreter on CPU tensors; the variable must be set before anything
# imports triton (torch, timm and deepspeed may), so here rather than in the kernel test modules.
if not (Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".torch_extensions"))


@pytest.fixture(scope="session")
def tiny_image_root(tmp_path_factory) -> Path:
    """8 classes × 12 train / 4 val images of 32 px shapes (the demo generator at a smaller size)."""
    from pipelines.demo_data import generate

    root = tmp_path_factory.mktemp("tiny_shapes")
    generate(root, image_size=32, per_class_train=12, per_class_val=4)
    return root


TINY_OVERRIDES = [
    "model.arch=vit_tiny_patch16_224", "model.patch_size=8", "model.depth=1", "model.out_dim=256",
    "model.head_hidden_dim=64", "model.head_bottleneck_dim=32", "data.global_crop_size=32",
    "data.local_crop_size=16", "data.local_crops_number=2", "data.batch_size_per_gpu=8", "data.num_workers=0",
    "optim.epochs=2", "optim.warmup_epochs=1", "logging.progress=none", "checkpoint.resume=none",
]


@pytest.fixture
def tiny_overrides(tiny_image_root, tmp_path) -> list[str]:
    return TINY_OVERRIDES + [f"data.path={tiny_image_root / 'train'}", f"checkpoint.output_dir={tmp_path / 'run'}"]
