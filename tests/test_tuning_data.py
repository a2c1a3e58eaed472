"""The photographs tuning set (benchmarks/research/tuning_data.py): deterministic, the demo's layout, grey patches."""

from __future__ import annotations

import numpy as np
from PIL import Image

from benchmarks.research.tuning_data import PHOTO_CLASSES, generate, photo_sources


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*.jpg"))


def test_generation_is_deterministic_in_the_demo_layout(tmp_path):
    generate(tmp_path / "a", train_images=16, val_images=8)
    generate(tmp_path / "b", train_images=16, val_images=8)
    names = _files(tmp_path / "a")
    assert len(names) == 24 and {p.parts[0] for p in names} == {"train", "val"}
    assert {p.parts[1] for p in names} == set(PHOTO_CLASSES) == {p.parts[1] for p in names if p.parts[0] == "val"}
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in names)
    assert len(photo_sources()) == len(PHOTO_CLASSES) and all(p.exists() for p in photo_sources())


def test_patches_are_grey_and_differ_within_a_class(tmp_path):
    """Colour is no shortcut (every channel equal up to JPEG error) and a class is many different patches, not
    copies of one: two patches of a photo differ by tens of grey levels on average."""
    generate(tmp_path, train_images=16, val_images=0)
    for cls in PHOTO_CLASSES:
        a, b = (np.asarray(Image.open(p), dtype=np.float64) for p in sorted((tmp_path / "train" / cls).glob("*.jpg")))
        assert a.shape == (64, 64, 3)
        assert np.abs(a - a.mean(axis=2, keepdims=True)).max() <= 3, cls
        assert np.abs(a - b).mean() > 10, cls
