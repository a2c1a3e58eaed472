"""The baseline loader: reference augmentation parameters, persistent workers, build errors, config options. The
loader contract (batch, epochs, ranks, resume, seeds) is checked on every backend in tests/test_loader_contract.py."""

import os
import time

import numpy as np
import psutil
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from pipelines.build import build_loader
from pipelines.folder import DataError, list_images
from pipelines.spec import MultiCropSpec
from pipelines.torch_loader import TorchMultiCropLoader, color_jitter, sample_generator, sample_resized_crop


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("hw, scale", [((375, 500), (0.4, 1.0)), ((64, 64), (0.05, 0.4)), ((40, 300), (0.9, 1.0))])
def test_resized_crop_params_equal_torchvision(seed, hw, scale):
    torch.manual_seed(seed)
    expected = T.RandomResizedCrop.get_params(torch.zeros(3, *hw), scale, (3 / 4, 4 / 3))
    assert sample_resized_crop(hw[0], hw[1], scale, (3 / 4, 4 / 3), torch.Generator().manual_seed(seed)) == expected


@pytest.mark.parametrize("seed", range(4))
def test_color_jitter_equals_torchvision(seed):
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    torch.manual_seed(seed)
    expected = T.ColorJitter(0.4, 0.4, 0.2, 0.1)(img)
    got = color_jitter(img, MultiCropSpec(), torch.Generator().manual_seed(seed))
    assert np.array_equal(np.asarray(got), np.asarray(expected))


def test_workers_persist_across_epochs_and_serve_each_epochs_own_batches(tiny_image_root):
    """Two workers kept from epoch to epoch (no fork per epoch) give exactly the batches that a loader without
    workers gives, epoch after epoch, for a resumed epoch too; leaving an epoch early shuts them down."""
    spec = MultiCropSpec(global_size=32, local_size=16, n_local=2)
    images = list_images(tiny_image_root / "train")
    kept = TorchMultiCropLoader(images, spec, batch_size=8, num_workers=2, seed=5)
    plain = TorchMultiCropLoader(images, spec, batch_size=8, num_workers=0, seed=5)
    pids = []
    for epoch, start in ((0, 0), (1, 0), (1, 9), (2, 0)):
        for loader in (kept, plain):
            loader.set_epoch(epoch, start)
        got, want = list(kept), list(plain)
        assert len(got) == len(want) == kept.steps_per_epoch - start
        for x, y in zip(got, want):
            assert torch.equal(x.labels, y.labels) and all(torch.equal(p, q) for p, q in zip(x.crops, y.crops))
        pids.append([w.pid for w in kept._loader._iterator._workers])
    assert pids[0] == pids[1] == pids[2] == pids[3] and len(pids[0]) == 2
    workers = [psutil.Process(pid) for pid in pids[0]]
    kept.set_epoch(3)
    batches = iter(kept)
    next(batches)
    batches.close()  # a stop mid-epoch
    assert kept._loader is None
    for w in workers:
        w.wait(timeout=10)  # ended (and reaped by torch's shutdown, or here)


def test_augmentation_rates_match_the_spec(tiny_image_root):
    """Flip / grayscale rates measured through the real code path, against their probabilities."""
    from pipelines import torch_loader as tl

    calls = {"flip": 0, "gray": 0, "blur": 0, "solarize": 0}
    spec = MultiCropSpec(global_size=16, local_size=16, n_local=2)
    img = Image.new("RGB", (20, 20), (120, 30, 200))
    originals = (tl.TF.hflip, tl.TF.to_grayscale, tl.ImageOps.solarize)

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    tl.TF.hflip, tl.TF.to_grayscale = count("flip", originals[0]), count("gray", originals[1])
    tl.ImageOps.solarize = count("solarize", originals[2])
    try:
        n = 1500
        for i in range(n):
            tl.augment_crop(img, spec.crops()[1], spec, sample_generator(0, 0, i))  # G2: solarize p=0.2
    finally:
        tl.TF.hflip, tl.TF.to_grayscale, tl.ImageOps.solarize = originals
    for name, p in (("flip", 0.5), ("gray", 0.2), ("solarize", 0.2)):
        sd = (p * (1 - p) / n) ** 0.5
        assert abs(calls[name] / n - p) < 5 * sd, (name, calls[name] / n)


def test_build_loader_errors_are_clear(tmp_path):
    from dino_fast.config import DataConfig

    with pytest.raises(DataError, match="no data path"):
        build_loader(DataConfig(path=""))
    (tmp_path / "few").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "few" / "a.png")
    with pytest.raises(DataError, match="fewer than one batch"):
        build_loader(DataConfig(path=str(tmp_path / "few"), batch_size_per_gpu=4))
    assert list_images(tmp_path / "few").labels == [-1]


def test_file_list_replaces_the_folder_scan(tiny_image_root, tmp_path):
    from dino_fast.config import DataConfig

    images = list_images(tiny_image_root / "train")
    listing = tmp_path / "x.beton.files.txt"
    listing.write_text("".join(f"{f} {y}\n" for f, y in list(zip(images.files, images.labels))[::2]))
    loader = build_loader(DataConfig(path="/nonexistent", file_list=str(listing), batch_size_per_gpu=8,
                                     global_crop_size=32, local_crop_size=16, local_crops_number=1, num_workers=0))
    assert loader.steps_per_epoch == 48 // 8
    assert loader.dataset.images.files == images.files[::2] and loader.dataset.images.labels == images.labels[::2]
    listing.write_text("no-label-here\n")
    with pytest.raises(DataError, match="line 1"):
        build_loader(DataConfig(file_list=str(listing)))


def test_data_config_reaches_the_spec_and_blur_sigma_takes_effect():
    from dino_fast.config import load_config
    from pipelines.torch_loader import augment_crop

    cfg = load_config(None, ["data.global_crop_size=32", "data.local_crop_size=16", "data.local_crops_number=3",
                             "data.global_crops_scale=[0.5,1]", "data.local_crops_scale=[0.1,0.3]",
                             "data.blur_sigma=[0.1,0.6]"])
    spec = MultiCropSpec.from_config(cfg.data)
    assert (spec.global_size, spec.local_size, spec.n_local) == (32, 16, 3)
    assert spec.global_scale == (0.5, 1.0) and spec.local_scale == (0.1, 0.3) and spec.blur_sigma == (0.1, 0.6)
    # G1 is always blurred: with equal draws, a narrower σ range keeps more of a sharp image's detail.
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    g1 = spec.crops()[0]
    sharp = augment_crop(img, g1, spec, sample_generator(0, 0, 0))
    blurred = augment_crop(img, g1, MultiCropSpec(global_size=32, global_scale=(0.5, 1.0)), sample_generator(0, 0, 0))
    assert sharp.std() > 1.2 * blurred.std()


def test_photometric_options_reach_the_spec_and_solarize_inverts_the_bright_pixels():
    from dino_fast.config import load_config
    from pipelines.torch_loader import augment_crop

    plain = load_config(None, ["data.jitter_p=0", "data.gray_p=0", "data.solarize_p=[0,0,0]"]).data
    spec = MultiCropSpec.from_config(plain)
    assert (spec.jitter_p, spec.gray_p, spec.solarize_p) == (0.0, 0.0, (0.0, 0.0, 0.0))
    ref = MultiCropSpec.from_config(load_config(None, []).data)  # the defaults are the reference augmentation
    assert (ref.jitter_p, ref.jitter, ref.gray_p, ref.solarize_p) == (0.8, (0.4, 0.4, 0.2, 0.1), 0.2, (0.0, 0.2, 0.0))
    assert MultiCropSpec.from_config(load_config(None, ["data.jitter=[0.1,0,0,0.05]"]).data).jitter_ranges() == (
        (0.9, 1.1), (1.0, 1.0), (1.0, 1.0), (-0.05, 0.05))

    solar = MultiCropSpec.from_config(load_config(None, ["data.jitter_p=0", "data.gray_p=0",
                                                         "data.solarize_p=[1,1,1]"]).data)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))

    def pixels(t):  # normalised float crop → the uint8 values it was made from
        mean, std = torch.tensor(spec.mean)[:, None, None], torch.tensor(spec.std)[:, None, None]
        return torch.round((t * std + mean) * 255).to(torch.int64)

    for crop, crop_solar in zip(spec.crops()[::2], solar.crops()[::2]):  # G1 and local crops: the same draws
        x = pixels(augment_crop(img, crop, spec, sample_generator(0, 0, 3)))
        y = pixels(augment_crop(img, crop_solar, solar, sample_generator(0, 0, 3)))
        assert (x >= 128).any() and (x < 128).any()
        assert torch.equal(y, torch.where(x >= 128, 255 - x, x))


def test_a_worker_killed_after_its_last_batch_of_the_epoch_is_reported(tiny_image_root):
    """torch notices a dead worker only while it still waits for that worker's batches; one killed (by the OOM
    killer, say) after the main process has read all of them went unnoticed, and the next epoch started new workers.
    That made the trainer's killed-worker test pass or fail with the kill's timing."""
    spec = MultiCropSpec(global_size=32, local_size=16, n_local=2)
    loader = TorchMultiCropLoader(list_images(tiny_image_root / "train"), spec, batch_size=8, num_workers=2, seed=1)
    loader.set_epoch(0)
    batches = iter(loader)
    others = {p.pid for p in psutil.Process(os.getpid()).children()}  # e.g. inductor's compile workers of other tests
    for _ in range(loader.steps_per_epoch):  # every batch of the epoch read: no worker has anything left to do
        next(batches)
    workers = [p for p in psutil.Process(os.getpid()).children() if p.pid not in others]
    assert len(workers) == 2
    workers[0].kill()
    while workers[0].status() != psutil.STATUS_ZOMBIE:  # dead, and left for its parent to reap (psutil's wait would)
        time.sleep(0.01)
    with pytest.raises(RuntimeError, match=rf"DataLoader worker \(pid {workers[0].pid}\) is killed by signal: SIGKILL"):
        next(batches)
    loader.set_epoch(1)  # a healthy epoch still ends cleanly
    assert sum(1 for _ in loader) == loader.steps_per_epoch
