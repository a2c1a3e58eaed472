"""The embedded demo dataset and its harder tuning variant (pipelines/demo_data.py)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from pipelines.demo_data import CLASSES, generate


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*.jpg"))


def _pattern_contrast(path) -> float:
    """The grey-level spread of an image after a 3×3 box blur (which removes most of the per-pixel noise)."""
    grey = Image.open(path).convert("L").filter(ImageFilter.BoxBlur(1))
    return float(np.asarray(grey, dtype=np.float64).std())


def test_generation_is_deterministic_and_the_hard_variant_keeps_the_layout(tmp_path):
    generate(tmp_path / "a", per_class_train=3, per_class_val=1)
    generate(tmp_path / "b", per_class_train=3, per_class_val=1)
    generate(tmp_path / "hard", per_class_train=3, per_class_val=1, hard=True)
    names = _files(tmp_path / "a")
    assert len(names) == 4 * len(CLASSES) and {p.parts[0] for p in names} == {"train", "val"}
    assert {p.parts[1] for p in names} == set(CLASSES)
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in names)
    assert _files(tmp_path / "hard") == names
    assert all((tmp_path / "a" / p).read_bytes() != (tmp_path / "hard" / p).read_bytes() for p in names)


def test_the_hard_variant_has_about_a_third_of_the_pattern_contrast(tmp_path):
    """fg − bg is 110–140 grey levels in the demo set and 35–60 in the hard one: a two-level pattern's spread is
    about half of that (plus the hard set's brightness gradient), so the blurred images' spread drops by over 40 %."""
    generate(tmp_path / "demo", per_class_train=6, per_class_val=0)
    generate(tmp_path / "hard", per_class_train=6, per_class_val=0, hard=True)
    demo = np.median([_pattern_contrast(p) for p in (tmp_path / "demo").rglob("*.jpg")])
    hard = np.median([_pattern_contrast(p) for p in (tmp_path / "hard").rglob("*.jpg")])
    assert 35 < demo < 75 and hard < 0.6 * demo, (demo, hard)
