"""The DALI loader on DALI's CPU backend: its colour map, augmentation rates and geometry, zero-copy GPU batches,
bad files, and a few training steps through the trainer CLI with data.backend=dali. The loader contract (batch,
epochs, ranks, resume, seeds) is checked on every backend in tests/test_loader_contract.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.dali import AUX_FIELDS, DaliMultiCropLoader, build_pipeline, colour_jitter  # no DALI: a failure
from pipelines.folder import DataError, ImageList, list_images
from pipelines.spec import MultiCropSpec
from pipelines.torch_loader import sample_resized_crop

from child_env import clean_env

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
SPEC = MultiCropSpec(global_size=32, local_size=16, n_local=8)
SIDE = 256  # the coordinate image: R = x, G = y (one level per pixel), B = 200


def binomial_ok(hits: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(hits - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1e-9


def pixels(crop: torch.Tensor, spec: MultiCropSpec = SPEC) -> np.ndarray:
    """Normalised [B, 3, S, S] floats back to 0..255 pixel values."""
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return ((crop * std + mean) * 255).numpy()


@pytest.fixture(scope="module")
def coord_images(tmp_path_factory) -> ImageList:
    """64 entries of one lossless 256×256 image whose colour encodes the position."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    rgb = np.stack([xx, yy, np.full_like(xx, 200)], axis=-1).astype(np.uint8)
    path = tmp_path_factory.mktemp("coord") / "coord.png"
    Image.fromarray(rgb).save(path)
    return ImageList([str(path)] * 64, [0] * 64, [], str(path.parent))


def textured(rng: np.random.Generator, side: int, tint) -> np.ndarray:
    """A smooth random colour field with fine noise, shifted by ``tint``: natural-ish content, uint8 [side, side, 3]."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((side, side), Image.BICUBIC)
    px = np.asarray(coarse, dtype=np.float32) * 0.4 + rng.normal(0, 12, (side, side, 3)) + np.asarray(tint)
    return np.clip(px, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("b, c, s, h", [(1.3, 1.0, 1.0, 0.0), (1.0, 0.6, 1.0, 0.0), (1.0, 1.4, 1.0, 0.0),
                                        (1.0, 1.0, 1.2, 0.0), (1.0, 1.0, 0.8, 0.0), (1.0, 1.0, 1.0, 0.05),
                                        (1.0, 1.0, 1.0, -0.1), (0.7, 1.3, 0.85, -0.08)])
def test_colour_jitter_maps_torchvision_factors(b, c, s, h):
    """The graph's colour map against torchvision's adjust_brightness → contrast → saturation → hue with the same
    factors. Brightness, contrast and saturation are the same formulas (the reference's own uint8 round trip through
    HSV costs it ~1 level). The hue is a grey-axis rotation standing in for torchvision's HSV shift: it must bring
    every image closer to torchvision's result than leaving the hue alone does (a wrong sign or unit does not)."""
    import nvidia.dali.fn as fn
    import torchvision.transforms.functional as TF
    from nvidia.dali import pipeline_def

    rng = np.random.default_rng(2)
    images = [textured(rng, 48, tint) for tint in ([0, 0, 0], [120, 60, 0], [0, 40, 100], [60, 60, 60])]

    def ours(hue: float) -> list[np.ndarray]:
        @pipeline_def
        def pipe():
            x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
            return colour_jitter(x, *[fn.random.uniform(values=[float(v)]) for v in (b, c, s, hue)])

        p = pipe(batch_size=len(images), num_threads=1, device_id=None)
        p.build()
        out = p.run()[0]
        return [np.asarray(out.at(i), dtype=np.float32) for i in range(len(images))]

    refs = [np.asarray(TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(
        Image.fromarray(x), b), c), s), h), dtype=np.float32) for x in images]
    err = np.array([np.abs(o - r).mean() for o, r in zip(ours(h), refs)])
    if h == 0:
        assert err.max() < 1.5, err
    else:
        unshifted = np.array([np.abs(o - r).mean() for o, r in zip(ours(0.0), refs)])
        assert (err < unshifted).all(), (err, unshifted)
        assert err.mean() < (0.95 if abs(h) < 0.08 else 0.8) * unshifted.mean(), (err, unshifted)


# Crop statistics against the reference on real JPEG photographs: tests/test_crop_stats.py (all backends).


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_graph_decodes_real_jpegs_and_hands_over_zero_copy(tmp_path):
    """nvJPEG (hardware decoder share 0.99) on real photographs: the batch contract on the GPU, crops that stay
    valid after later runs (zero-copy DLPack views of fresh buffers), and colour statistics equal to the CPU
    graph's (same ops, other decoder: means within 0.05, stds within 0.05 of a normalised unit)."""
    from benchmarks.research.crop_stats import photo_folder

    images = list_images(photo_folder(tmp_path, copies=8))  # 48 JPEGs
    spec = MultiCropSpec(global_size=64, local_size=32, n_local=2)
    gpu = torch.device("cuda")
    loader = DaliMultiCropLoader(images, spec, 16, 4, 0, 1, 0, gpu, hw_decoder_load=0.99)
    loader.set_epoch(0)
    batches = list(loader)
    kept = [c.clone() for c in batches[0].crops]
    loader.set_epoch(1)
    list(loader)
    torch.cuda.synchronize()
    for crop, old, size in zip(batches[0].crops, kept, [64, 64, 32, 32]):
        assert crop.is_cuda and crop.dtype == torch.float32 and tuple(crop.shape) == (16, 3, size, size)
        assert torch.equal(crop, old) and bool(torch.isfinite(crop).all())

    def moments(dev: torch.device) -> torch.Tensor:
        loader = DaliMultiCropLoader(images, spec, 16, 4, 0, 1, 0, dev)
        crops = []
        for epoch in range(4):
            loader.set_epoch(epoch)
            crops += [c.float().cpu() for batch in loader for c in batch.crops[:2]]
        x = torch.cat(crops)
        return torch.cat([x.mean((0, 2, 3)), x.std((0, 2, 3))])

    assert (moments(gpu) - moments(CPU)).abs().max() < 0.05


def measured_boxes(crop: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(width, height) in source pixels of each crop of the coordinate image: the R (G) slope along x (y) in the
    crop's middle half, where the resampling filter never reaches past the image border, times the output size."""
    px = pixels(crop)
    s = px.shape[-1]
    mid = slice(s // 4, 3 * s // 4)
    dx = np.diff(px[:, 0, mid, :], axis=2)[:, :, s // 4: 3 * s // 4 - 1].mean(axis=(1, 2))
    dy = np.diff(px[:, 1, :, mid], axis=1)[:, s // 4: 3 * s // 4 - 1, :].mean(axis=(1, 2))
    return dx * s, dy * s


def test_crop_areas_and_aspect_ratios_follow_the_reference_scales(coord_images):
    loader = DaliMultiCropLoader(coord_images, SPEC, 32, 2, 0, 1, 0, CPU, ops=())
    areas: dict[str, list[np.ndarray]] = {"global": [], "local": []}
    for epoch in range(3):
        loader.set_epoch(epoch)
        for crops, _ in loader:
            for i, crop in enumerate(crops):
                w, h = measured_boxes(crop)
                assert (w > 0).all() and (h > 0).all()  # no flip without the flip op
                assert ((w / h > 0.75 * 0.95) & (w / h < 4 / 3 * 1.05)).all()
                areas["global" if i < 2 else "local"].append(w * h / SIDE**2)
    gen = torch.Generator().manual_seed(0)
    for kind, (low, high) in (("global", SPEC.global_scale), ("local", SPEC.local_scale)):
        a = np.concatenate(areas[kind])
        assert a.min() > low * 0.93 and a.max() < high * 1.05, (kind, a.min(), a.max())
        span = high - low
        assert a.min() < low + 0.15 * span and a.max() > high - 0.15 * span, (kind, a.min(), a.max())
        # the reference algorithm (torchvision's, with its retries on crops that do not fit) on the same image
        ref = [h * w / SIDE**2 for h, w in (sample_resized_crop(SIDE, SIDE, (low, high), SPEC.ratio, gen)[2:]
                                             for _ in range(2000))]
        for q in (10, 50, 90):
            assert abs(np.percentile(a, q) - np.percentile(ref, q)) < 0.06 * span, (kind, q)


def test_flip_and_grayscale_rates_from_pixels(coord_images):
    loader = DaliMultiCropLoader(coord_images, SPEC, 64, 2, 0, 1, 0, CPU, ops=("flip", "gray"))
    flips = grays = n = 0
    for epoch in range(4):
        loader.set_epoch(epoch)
        for crops, _ in loader:
            for crop in crops:
                px = pixels(crop)
                w, _ = measured_boxes(crop)
                flips += int((w < 0).sum())  # R (or the grey value) falls along x in a mirrored crop
                grays += int((np.ptp(px, axis=1).max(axis=(1, 2)) < 1.0).sum())
                n += crop.shape[0]
    assert n == 4 * 64 * SPEC.n_crops
    assert binomial_ok(flips, n, SPEC.flip_p), flips / n
    assert binomial_ok(grays, n, SPEC.gray_p), grays / n


def test_solarize_hits_only_the_second_global_crop_at_its_rate(coord_images):
    loader = DaliMultiCropLoader(coord_images, SPEC, 64, 2, 0, 1, 0, CPU, ops=("solarize",))
    hits = np.zeros(SPEC.n_crops, dtype=int)
    for epoch in range(6):
        loader.set_epoch(epoch)
        for crops, _ in loader:
            for i, crop in enumerate(crops):
                blue = pixels(crop)[:, 2].mean(axis=(1, 2))
                assert ((np.abs(blue - 200) < 1) | (np.abs(blue - 55) < 1)).all()  # 200 ≥ 128 inverts to 55
                hits[i] += int((blue < 128).sum())
    assert binomial_ok(hits[1], 6 * 64, SPEC.solarize_p[1]), hits
    assert hits[0] == 0 and hits[2:].sum() == 0


def test_blur_and_jitter_draws_have_the_reference_rates(coord_images):
    spec = MultiCropSpec(global_size=32, local_size=16, n_local=4)
    pipe = build_pipeline(coord_images, spec, 64, 2, 0, 1, 0, CPU, aux=True)
    draws = np.concatenate([np.array(pipe.run()[-1].as_tensor()) for _ in range(8)])  # [512, n_crops, 6]
    d = {name: draws[..., i] for i, name in enumerate(AUX_FIELDS)}
    n = draws.shape[0]
    blur_p = [spec.blur_p[0], spec.blur_p[1]] + [spec.blur_p[2]] * spec.n_local
    for i, p in enumerate(blur_p):
        if p in (0.0, 1.0):
            assert (d["blur"][:, i] == p).all()
        else:
            assert binomial_ok(int(d["blur"][:, i].sum()), n, p), (i, d["blur"][:, i].mean())
    assert binomial_ok(int(d["jitter"].sum()), d["jitter"].size, spec.jitter_p)
    assert binomial_ok(int(d["flip"].sum()), d["flip"].size, spec.flip_p)
    assert binomial_ok(int(d["gray"].sum()), d["gray"].size, spec.gray_p)
    assert binomial_ok(int(d["solarize"][:, 1].sum()), n, spec.solarize_p[1])
    assert d["solarize"][:, 0].sum() == 0 and d["solarize"][:, 2:].sum() == 0
    sigma = d["sigma"][d["blur"] == 1]
    assert spec.blur_sigma[0] <= sigma.min() < 0.2 and 1.9 < sigma.max() <= spec.blur_sigma[1]


def test_photometric_options_of_the_config_set_the_dali_rates(coord_images):
    """data.jitter_p / data.gray_p / data.solarize_p reach DALI's draws (the demo recipe turns solarisation off)."""
    from dino_fast.config import load_config

    cfg = load_config(None, ["data.global_crop_size=32", "data.local_crop_size=16", "data.local_crops_number=4",
                             "data.jitter_p=0.3", "data.gray_p=0.6", "data.solarize_p=[0.5,0,1]"])
    spec = MultiCropSpec.from_config(cfg.data)
    pipe = build_pipeline(coord_images, spec, 64, 2, 0, 1, 0, CPU, aux=True)
    draws = np.concatenate([np.array(pipe.run()[-1].as_tensor()) for _ in range(8)])  # [512, n_crops, 6]
    d = {name: draws[..., i] for i, name in enumerate(AUX_FIELDS)}
    assert binomial_ok(int(d["jitter"].sum()), d["jitter"].size, 0.3)
    assert binomial_ok(int(d["gray"].sum()), d["gray"].size, 0.6)
    assert binomial_ok(int(d["solarize"][:, 0].sum()), draws.shape[0], 0.5)
    assert d["solarize"][:, 1].sum() == 0 and (d["solarize"][:, 2:] == 1).all()


def test_zero_width_ranges_are_constants_not_a_dali_error(coord_images):
    """A jitter strength of 0 or a one-value blur σ range is valid config; DALI's uniform refuses [x, x)."""
    spec = MultiCropSpec(global_size=32, local_size=16, n_local=2, jitter=(0.0, 0.0, 0.0, 0.0), blur_sigma=(0.5, 0.5))
    pipe = build_pipeline(coord_images, spec, 64, 2, 0, 1, 0, CPU, aux=True)
    out = pipe.run()
    d = np.array(out[-1].as_tensor())  # [64, n_crops, 6]
    sigma = d[..., AUX_FIELDS.index("sigma")][d[..., AUX_FIELDS.index("blur")] == 1]
    assert sigma.size and np.allclose(sigma, 0.5)
    # The zero-strength jitter ran and changed nothing: G1 (never solarised) keeps the image's constant blue 200
    # wherever it was not turned grey.
    jitter, gray = d[:, 0, AUX_FIELDS.index("jitter")] == 1, d[:, 0, AUX_FIELDS.index("gray")] == 1
    assert (jitter & ~gray).any()
    blue = pixels(torch.as_tensor(np.array(out[0].as_tensor())))[:, 2]
    assert (np.abs(blue[~gray] - 200) < 1).all()


def test_blur_flag_drives_the_blur(tmp_path):
    """Crops of white noise: the ones whose draw says "blurred" with sigma ≥ 1 are far smoother than the rest."""
    path = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
    images = ImageList([str(path)] * 64, [0] * 64, [], str(tmp_path))
    spec = MultiCropSpec(global_size=32, local_size=16, n_local=2, local_scale=(0.4, 0.4), global_scale=(0.4, 0.4))
    pipe = build_pipeline(images, spec, 64, 2, 0, 1, 0, CPU, ops=("blur",), aux=True)
    out = pipe.run()
    draws = np.array(out[-1].as_tensor())
    for i in (2, 3):  # the locals: blurred half of the time
        crop = np.array(out[i].as_tensor())
        roughness = np.abs(np.diff(crop, axis=-1)).mean(axis=(1, 2, 3))
        blurred = (draws[:, i, 3] == 1) & (draws[:, i, 4] >= 1.0)
        sharp = draws[:, i, 3] == 0
        assert blurred.any() and sharp.any()
        assert roughness[blurred].max() < 0.6 * roughness[sharp].min(), i


def test_corrupt_files_are_skipped_with_a_warning(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / f"ok{i:02d}.jpg")
    good = (tmp_path / "ok00.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])  # passes PIL's header check; DALI would die
    (tmp_path / "garbage.jpg").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not a png")
    images = list_images(tmp_path)
    assert len(images.files) == 24
    with pytest.warns(UserWarning, match=r"skipping 4 of 24 images .*truncated\.jpg"):
        loader = DaliMultiCropLoader(images, SPEC, 4, 1, 0, 1, 0, CPU)
    loader.set_epoch(0)
    assert sum(len(b.labels) for b in loader) == 20
    only_bad = ImageList([str(tmp_path / "garbage.jpg"), str(tmp_path / "empty.jpg")], [-1, -1], [], str(tmp_path))
    with pytest.raises(DataError, match="none of the 2 images"):
        DaliMultiCropLoader(only_bad, SPEC, 1, 1, 0, 1, 0, CPU)


@pytest.mark.slow
def test_trainer_runs_a_few_steps_with_the_dali_backend(tmp_path):
    env = clean_env(DINO_FAST_DEMO_DIR=str(tmp_path / "demo"))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "dino_fast.train", "--config", "dino_fast/configs/demo.yaml", "data.path=demo",
           "data.backend=dali", "data.global_crop_size=64", "data.local_crop_size=32", "data.batch_size_per_gpu=8",
           "data.demo_images_per_class=8", "data.num_workers=2", "model.depth=1", "optim.max_steps=3",
           f"checkpoint.output_dir={run}", "logging.progress=plain"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data=dali" in proc.stdout
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps][-1] == 3
    assert all(math.isfinite(m["loss"]) for m in steps)
