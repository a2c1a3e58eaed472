"""The sketches held-out set (benchmarks/research/heldout_data.py): deterministic, the demo's layout, a whole
object drawn."""

from __future__ import annotations

import numpy as np
from PIL import Image

from benchmarks.research.heldout_data import SKETCHES, generate


def test_sketches_are_deterministic_in_the_demo_layout(tmp_path):
    generate("sketches", tmp_path / "a", train_images=16, val_images=8)
    generate("sketches", tmp_path / "b", train_images=16, val_images=8)
    names = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    assert len(names) == 24 and {p.parts[1] for p in names if p.parts[0] == "val"} == set(SKETCHES)
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in names)


def test_each_sketch_is_dark_ink_inside_the_frame_on_lighter_ruled_paper(tmp_path):
    """The ink (pixels well below the paper's median) covers a few percent of the image and its extent stays off the
    borders, so a crop of the image can hold the whole object; images of one class differ (random pose and paper)."""
    generate("sketches", tmp_path, train_images=32, val_images=0)
    for cls in SKETCHES:
        grey = [np.asarray(Image.open(p).convert("L"), dtype=np.float64)
                for p in sorted((tmp_path / "train" / cls).glob("*.jpg"))]
        for g in grey:
            ink = g < np.median(g) - 60
            assert 0.01 < ink.mean() < 0.35, (cls, ink.mean())
            rows, cols = np.nonzero(ink)
            assert rows.min() >= 1 and cols.min() >= 1 and rows.max() <= 62 and cols.max() <= 62, cls
        assert np.abs(grey[0] - grey[1]).mean() > 10, cls
