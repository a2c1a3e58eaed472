"""The loader contract (``pipelines.loader``'s docstring) on every backend: torch, DALI (its CPU graph) and FFCV (real
FFCV on CPU, reading a .beton written by ``dino-fast-convert``), with one set of assertions.

Each backend runs one scripted session (:func:`observe`) in a fresh process (FFCV's beside the other two): FFCV's
loader thread compiles its pipeline with numba, and in a long-lived test process numba state left by earlier tests
made that compile fail (see tests/test_crop_stats.py); FFCV also sets torch's thread count, and a process of its own
keeps that from the tests that follow. A session builds its loaders with ``pipelines.build.build_loader`` (the one
constructor) and hands back plain arrays, which the tests below check against numbers computed here: the labels from
the folder listing, the image order from ``epoch_indices``, the pixel statistics from the image files read with PIL.

The images: the tiny shapes set, each image in a class folder of its own, so that a label names one image (a rank
split and an epoch's coverage can be read off the labels on every backend, DALI included, whose order is its own).
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.loader import epoch_indices
from pipelines.spec import MultiCropSpec

# Three backends in processes of their own (FFCV's numba compile included): ~40 s on 2 cores, so out of test-fast.
pytestmark = pytest.mark.slow
BACKENDS = ("torch", "dali", "ffcv")
SPEC = MultiCropSpec(global_size=32, local_size=16, n_local=3)
N_IMAGES, N_FLAT = 96, 10  # the tiny set's 8 classes × 12 train images; a flat folder of the first 10
BATCH, WORLD = 5, 2
STEPS = N_IMAGES // WORLD // BATCH  # 9: each rank's 48 images make 9 batches of 5, the last 3 are dropped
RESUME_AT = 4
# FFCV's session (~20 s, mostly numba compiling on one core) runs beside the torch and DALI sessions, which run one
# after the other (~10 s): all three at once oversubscribe two cores (each runs 2 workers or threads) and take longer
LANES = (("ffcv",), ("torch", "dali"))


def run_epoch(loader, epoch: int, start_step: int = 0, take: int | None = None) -> list:
    """The batches of one epoch; with ``take``, only the first ``take`` and the epoch is left there (as a run
    stopped mid-epoch leaves it)."""
    loader.set_epoch(epoch, start_step)
    batches, it = [], iter(loader)
    for batch in it:
        batches.append(batch)
        if len(batches) == take:
            it.close()
            break
    return batches


def as_arrays(batches: list) -> dict:
    """Crops stacked per crop ``[steps, B, 3, S, S]``, labels ``[steps, B]``, and each batch's layout:
    (shape, dtype, device) of every crop, then of the labels."""
    layout = [[(tuple(t.shape), str(t.dtype), t.device.type) for t in [*b.crops, b.labels]] for b in batches]
    crops = [np.stack([b.crops[c].numpy() for b in batches]) for c in range(len(batches[0].crops))]
    return {"crops": crops, "labels": np.stack([b.labels.numpy() for b in batches]), "layout": layout}


def observe(backend: str, indexed: str, flat: str, work: str) -> dict:
    """One backend's session of the contract, in a fresh process: what every loader yielded, as plain arrays.

    A: rank 0 of 2, seed 0: epochs 0 and 1 whole. B: rank 1: one batch of epoch 0 (then stopped), epoch 1 whole.
    R: rank 0, seed 0, fresh (a restarted run): epoch 1 from step RESUME_AT, then epoch 2 whole. D: seed 1: the first
    batch of epoch 0. F: the flat folder, one rank. Then close() on every loader.
    """
    import psutil
    import torch

    from dino_fast.config import DataConfig
    from pipelines.build import build_loader
    from pipelines.folder import DataError

    # a spawned process inherits "spawn" as its start method: back to the platform's default, so that the torch
    # loader's workers start as in a run (forked: a spawned worker imports torch again, ~5 s each on 2 cores)
    mp.set_start_method(None, force=True)

    def config(folder: str) -> DataConfig:
        cfg = DataConfig(backend=backend, path=folder, batch_size_per_gpu=BATCH, num_workers=2,
                         global_crop_size=SPEC.global_size, local_crop_size=SPEC.local_size,
                         local_crops_number=SPEC.n_local)
        if backend != "ffcv":
            return cfg
        from pipelines.convert import convert_folder

        beton = Path(work) / f"{Path(folder).name}.beton"
        if not beton.exists():
            convert_folder(folder, beton, workers=1, file_list=False, progress=False)
        return replace(cfg, ffcv_path=str(beton))

    indexed_cfg, flat_cfg = config(indexed), config(flat)  # FFCV's conversion leaves processes and threads behind:
    threads_before, children_before = set(threading.enumerate()), set(psutil.Process().children())  # so look after
    out: dict = {}
    a = build_loader(indexed_cfg, rank=0, world_size=WORLD, seed=0)
    out["len"], out["steps"] = len(a), a.steps_per_epoch
    a0 = run_epoch(a, 0)
    kept, copies = a0[0], [c.clone() for c in a0[0].crops]
    out["A0"], out["A1"] = as_arrays(a0), as_arrays(run_epoch(a, 1))
    b = build_loader(indexed_cfg, rank=1, world_size=WORLD, seed=0)
    out["B0_taken"] = len(run_epoch(b, 0, take=1))
    out["B1"] = as_arrays(run_epoch(b, 1))
    r = build_loader(indexed_cfg, rank=0, world_size=WORLD, seed=0)
    out["R1"] = as_arrays(run_epoch(r, 1, start_step=RESUME_AT))
    out["R2_steps"] = len(run_epoch(r, 2))
    try:
        r.set_epoch(3, start_step=STEPS + 1)
        out["bad_start"] = "accepted"
    except ValueError as exc:
        out["bad_start"] = str(exc)
    d = build_loader(indexed_cfg, rank=0, world_size=WORLD, seed=1)
    out["D0"] = as_arrays(run_epoch(d, 0, take=1))
    f = build_loader(flat_cfg, rank=0, world_size=1, seed=0)
    out["F_steps"], out["F0"] = f.steps_per_epoch, as_arrays(run_epoch(f, 0))
    try:
        build_loader(replace(indexed_cfg, batch_size_per_gpu=N_IMAGES // WORLD + 1), rank=0, world_size=WORLD, seed=0)
        out["too_few"] = "accepted"
    except DataError as exc:
        out["too_few"] = str(exc)
    out["kept_unchanged"] = all(torch.equal(x, y) for x, y in zip(kept.crops, copies))
    workers = [p for p in psutil.Process().children() if p not in children_before]
    out["workers_open"] = len(workers)
    for loader in (a, b, r, d, f):
        loader.close()
    # torch asks its workers to end and gives each 5 s to do so before it kills it, and its queues' feeder threads
    # end once they have seen the queue closed: wait that long, then look
    out["workers_left"] = len(psutil.wait_procs(workers, timeout=10)[1])
    for t in threading.enumerate():
        if t not in threads_before:
            t.join(timeout=10)
    out["threads_left"] = [t.name for t in threading.enumerate() if t not in threads_before]
    return out


@pytest.fixture(scope="module")
def folders(tiny_image_root, tmp_path_factory) -> dict[str, Path]:
    """``indexed``: every train image of the tiny set in a class folder of its own (label = its index in the
    sorted listing); ``flat``: the first N_FLAT of them with no class folders."""
    files = sorted((tiny_image_root / "train").rglob("*.jpg"))
    assert len(files) == N_IMAGES
    root = tmp_path_factory.mktemp("contract")
    for f in files:
        (root / "indexed" / f.stem).mkdir(parents=True)
        shutil.copy(f, root / "indexed" / f.stem / f.name)
    (root / "flat").mkdir()
    for f in files[:N_FLAT]:
        shutil.copy(f, root / "flat" / f.name)
    return {"indexed": root / "indexed", "flat": root / "flat", "work": root}


@pytest.fixture(scope="module")
def sessions(folders):
    """Every backend's :func:`observe`, each in a spawned process of its own, the LANES side by side."""
    spawn = mp.get_context("spawn")
    pools = [ProcessPoolExecutor(1, mp_context=spawn, max_tasks_per_child=1) for _ in LANES]
    futures = {b: pool.submit(observe, b, str(folders["indexed"]), str(folders["flat"]), str(folders["work"]))
               for pool, lane in zip(pools, LANES) for b in lane}
    assert sorted(futures) == sorted(BACKENDS)
    yield futures
    for pool in pools:
        pool.shutdown(cancel_futures=True)


def session(sessions: dict[str, Future], backend: str) -> dict:
    return sessions[backend].result(timeout=600)


def source_pixels(folder: Path) -> np.ndarray:
    """Every pixel of the images under ``folder`` in [0, 1], ``[N, 3]``, read with PIL."""
    return np.concatenate([np.asarray(Image.open(f).convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255
                           for f in sorted(folder.rglob("*.jpg"))])


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_are_the_contracts_crops_and_labels(backend, sessions):
    """2 + n_local float32 crops in the order G1, G2, L1..LN with the spec's sizes, int64 labels [B], on the CPU."""
    s = session(sessions, backend)
    g, loc = (BATCH, 3, SPEC.global_size, SPEC.global_size), (BATCH, 3, SPEC.local_size, SPEC.local_size)
    want = [(g, "torch.float32", "cpu")] * 2 + [(loc, "torch.float32", "cpu")] * SPEC.n_local
    want.append(((BATCH,), "torch.int64", "cpu"))
    for run in ("A0", "A1", "B1", "R1", "D0", "F0"):
        assert all(layout == want for layout in s[run]["layout"]), (run, s[run]["layout"][0])
    # a batch is the caller's: the epochs and loaders that ran after it did not overwrite it (DALI hands its
    # outputs over zero-copy, FFCV reuses its buffers)
    assert s["kept_unchanged"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_crops_are_normalised_with_the_imagenet_mean_and_std(backend, sessions, folders):
    """Un-normalised with the spec's mean/std, every crop lies in [0, 1], and per crop kind over two epochs its
    pixels have about the images' mean and standard deviation per channel (0.48 and 0.25; jitter, blur and G2's
    solarisation move them by up to ~0.07 and ~15%). Crops left in [0, 1] would come out with a standard deviation
    of 0.06, crops normalised twice outside [0, 1]."""
    s = session(sessions, backend)
    src = source_pixels(folders["indexed"])
    mean, std = np.array(SPEC.mean).reshape(1, 3, 1, 1), np.array(SPEC.std).reshape(1, 3, 1, 1)
    for kind, crops in (("G1", [0]), ("G2", [1]), ("locals", range(2, SPEC.n_crops))):
        normalised = np.concatenate([s[run]["crops"][c].reshape(-1, 3, *s[run]["crops"][c].shape[-2:])
                                     for run in ("A0", "A1") for c in crops])
        px = normalised.astype(np.float64) * std + mean
        assert px.min() >= -1e-4 and px.max() <= 1 + 1e-4, (kind, px.min(), px.max())
        channels = px.transpose(1, 0, 2, 3).reshape(3, -1)
        np.testing.assert_allclose(channels.mean(1), src.mean(0), atol=0.1, err_msg=kind)
        np.testing.assert_allclose(channels.std(1), src.std(0), rtol=0.2, err_msg=kind)


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_are_the_class_index_and_minus_one_for_a_flat_folder(backend, sessions, folders):
    """Each label is its image's class (the index of its sub-folder in sorted order), each image once per epoch and
    rank; torch and ffcv yield them in the contract's epoch order."""
    s = session(sessions, backend)
    classes = sorted(p.name for p in folders["indexed"].iterdir())
    assert len(classes) == N_IMAGES  # one image per class: label i is the image in the i-th folder
    for run in ("A0", "A1", "B1", "R1"):
        labels = s[run]["labels"].ravel()
        assert labels.min() >= 0 and labels.max() < len(classes) and len(set(labels)) == labels.size, run
    assert (s["F0"]["labels"] == -1).all() and s["F0"]["labels"].size == (N_FLAT // BATCH) * BATCH
    if backend != "dali":  # torch and ffcv read the contract's epoch order; DALI's reader shuffles by itself
        for run, epoch in (("A0", 0), ("A1", 1)):
            order = epoch_indices(N_IMAGES, seed=0, epoch=epoch, rank=0, world_size=WORLD)[:STEPS * BATCH]
            np.testing.assert_array_equal(s[run]["labels"].ravel(), order)


@pytest.mark.parametrize("backend", BACKENDS)
def test_steps_per_epoch_is_the_length_and_drops_the_last_incomplete_batch(backend, sessions):
    s = session(sessions, backend)
    assert s["len"] == s["steps"] == STEPS
    assert [len(s[run]["labels"]) for run in ("A0", "A1", "B1")] == [STEPS] * 3
    assert s["F_steps"] == len(s["F0"]["labels"]) == N_FLAT // BATCH
    assert "fewer than one batch per rank" in s["too_few"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_split_an_epoch_without_overlap(backend, sessions):
    """Rank 1 stopped its epoch 0 after one batch, as a run that ends mid-epoch: its epoch 1 is still whole, and the
    two ranks' epoch 1 are disjoint; the next epoch is reshuffled."""
    s = session(sessions, backend)
    assert s["B0_taken"] == 1
    rank0, rank1 = set(s["A1"]["labels"].ravel()), set(s["B1"]["labels"].ravel())
    assert len(rank0) == len(rank1) == STEPS * BATCH and not rank0 & rank1
    assert not np.array_equal(s["A0"]["labels"], s["A1"]["labels"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_resumed_epoch_yields_the_rest_of_the_epoch(backend, sessions):
    """A fresh loader (a restarted run) with ``set_epoch(1, RESUME_AT)`` yields STEPS − RESUME_AT batches, and the
    next epoch whole; a start step past the epoch is refused."""
    s = session(sessions, backend)
    resumed = s["R1"]
    assert len(resumed["labels"]) == STEPS - RESUME_AT and s["R2_steps"] == STEPS
    assert "start_step" in s["bad_start"]
    if backend == "dali":
        # DALI's reader shuffles by its own epoch counter, which a restarted process begins at 0, and skips by
        # reading start_step batches (pipelines/dali.py, "Resuming"): the restarted run's batches are those the
        # uninterrupted run read at the same steps of its first epoch, not of epoch 1.
        same = s["A0"]
        assert not np.array_equal(resumed["labels"], s["A1"]["labels"][RESUME_AT:])
    else:
        # the order is epoch_indices(seed, epoch) and every crop a pure function of (seed, epoch, image): bit-equal
        same = s["A1"]
    np.testing.assert_array_equal(resumed["labels"], same["labels"][RESUME_AT:])
    for got, want in zip(resumed["crops"], same["crops"]):
        np.testing.assert_array_equal(got, want[RESUME_AT:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_seed_fixes_the_batches(backend, sessions):
    """Two loaders built with one seed give the same batch at the same step, bit for bit (R, restarted, against A;
    for DALI at that step of its first epoch, see the resume test); another seed gives another order and other
    crops (every backend shuffles with the run seed, DALI's reader too)."""
    s = session(sessions, backend)
    first = s["A0"] if backend == "dali" else s["A1"]
    assert np.array_equal(s["R1"]["labels"][0], first["labels"][RESUME_AT])
    assert all(np.array_equal(got[0], want[RESUME_AT]) for got, want in zip(s["R1"]["crops"], first["crops"]))
    other, same = s["D0"], s["A0"]
    assert not np.array_equal(other["labels"][0], same["labels"][0])
    for got, want in zip(other["crops"], same["crops"]):
        assert np.abs(got[0] - want[0]).mean() > 0.1  # normalised units: unrelated crops differ by ~1


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_releases_the_workers(backend, sessions):
    """After ``close()`` no worker process and no loader thread is left (the torch loader keeps its workers between
    epochs until then)."""
    s = session(sessions, backend)
    if backend == "torch":
        assert s["workers_open"] > 0
    assert s["workers_left"] == 0 and s["threads_left"] == []


def test_epoch_indices_split_every_epoch_without_overlap():
    """The contract's epoch order (torch and ffcv): one permutation cut to a multiple of the world size, rank r takes
    every world-th index; another epoch, another permutation."""
    for world in (1, 2, 3):
        parts = [epoch_indices(101, seed=0, epoch=5, rank=r, world_size=world) for r in range(world)]
        flat = np.concatenate(parts)
        assert len(flat) == (101 // world) * world and len(set(flat.tolist())) == len(flat)
    assert not np.array_equal(epoch_indices(50, 0, 0, 0, 1), epoch_indices(50, 0, 1, 0, 1))
