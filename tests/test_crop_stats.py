"""Every loader backend's crops look like the reference's: per crop kind (G1, G2, locals) the gray and solarised
shares, sharpness (mean |Laplacian|), brightness, contrast and saturation, on real photographs.

Statistics, photographs and tolerances: ``benchmarks.research.crop_stats`` (tolerances from two seeds of the reference's
own transform, ``benchmarks.reference.DataAugmentationDINO``). Crops are 112 and 48 px from photographs at longest
side 256 (the reference's 224 and 96 relative to ImageNet-sized images, at a quarter of the cost).
"""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.research.crop_stats import STATS, compare, loader_stats, photo_folder, reference_stats
from pipelines.spec import MultiCropSpec

COPIES = 24  # of each of the 6 photographs
EPOCHS = 6  # → 864 images per backend: 864 G1, 864 G2, 3,456 locals
SPEC = MultiCropSpec(global_size=112, local_size=48, n_local=4)


# every backend's crops of real photographs, and the reference's own seed-to-seed noise: ~55 s on 2 cores
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return photo_folder(tmp_path_factory.mktemp("photos"), COPIES)


@pytest.fixture(scope="module")
def reference(photos):
    return reference_stats(photos, SPEC, 0, EPOCHS), reference_stats(photos, SPEC, 1, EPOCHS)


def _loader(backend: str, folder: Path, tmp_path: Path):
    from dino_fast.config import DataConfig
    from pipelines.build import build_loader

    cfg = DataConfig(backend=backend, path=str(folder), batch_size_per_gpu=48, num_workers=2,
                     global_crop_size=SPEC.global_size, local_crop_size=SPEC.local_size,
                     local_crops_number=SPEC.n_local)
    if backend == "ffcv":
        from pipelines.convert import convert_folder

        beton = tmp_path / "photos.beton"
        convert_folder(folder, beton, max_resolution=256, jpeg_quality=95, workers=2, file_list=False,
                       progress=False)
        cfg = replace(cfg, ffcv_path=str(beton))
    return build_loader(cfg, seed=1, device="cpu")


def _backend_stats(backend: str, folder: str, tmp_path: str, results) -> None:
    try:
        results.put(loader_stats(_loader(backend, Path(folder), Path(tmp_path)), EPOCHS))
    except BaseException as exc:  # the parent reports it
        results.put(f"{type(exc).__name__}: {exc}")


def _stats_in_a_fresh_process(backend: str, folder: Path, tmp_path: Path) -> dict:
    """Each backend's crops in a new process, as a training run makes them. In this long-lived test process, numba
    state left by earlier tests (the bicubic functions compiled on the main thread by tests/test_bicubic.py) made
    FFCV's compile of its pipeline fail in its loader thread with a KeyError from numba on a cold numba cache."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=_backend_stats, args=(backend, str(folder), str(tmp_path), results))
    child.start()
    out = results.get(timeout=600)
    child.join(timeout=60)
    assert isinstance(out, dict), out
    return out


def test_the_reference_agrees_with_itself(reference):
    """The shares are the spec's: 0.8 · 0.2 + 0.2 · … ≈ 0.2 gray on every kind, 0.2 solarised on G2 only."""
    a, b = reference
    for kind in a:
        assert {s: len(v) for s, v in a[kind].items()} == {s: len(b[kind]["gray"]) for s in STATS}
        assert abs(a[kind]["gray"].mean() - 0.2) < 0.05, kind
    assert len(a["locals"]["gray"]) == SPEC.n_local * len(a["G1"]["gray"])
    assert abs(a["G2"]["solarised"].mean() - a["G1"]["solarised"].mean() - 0.2) < 0.05


@pytest.mark.parametrize("backend", ["torch", "dali", "ffcv"])
def test_backend_crops_match_the_reference(backend, photos, reference, tmp_path):
    ref_a, ref_b = reference
    ours = _stats_in_a_fresh_process(backend, photos, tmp_path)
    for kind in ref_a:
        assert len(ours[kind]["sharpness"]) == len(ref_a[kind]["sharpness"]), kind
    report, failures = compare(ours, ref_a, ref_b, backend)
    print("\n".join(report))
    assert not failures, "\n".join(failures)
