"""The FFCV multi-crop loader with real FFCV on CPU: decode once, crop geometry and content, JIT on == JIT off,
resume, errors, and a few training steps through the trainer CLI.

numba reads NUMBA_DISABLE_JIT when it is first imported, and other test files import it in this process, so every
loader run here happens in a child process with the variable set (or removed) explicitly.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.convert import convert_folder
from pipelines.folder import DataError
from pipelines.loader import epoch_indices
from pipelines.spec import MultiCropSpec
from pipelines.torch_loader import sample_resized_crop

from beton_reader import stored_images
from child_env import clean_env

REPO = Path(__file__).resolve().parents[1]
SIZES = [(64, 48), (48, 64), (80, 80), (120, 40), (90, 70), (70, 100)]  # (width, height); 120×40 is 3:1
SPEC = MultiCropSpec(global_size=32, local_size=16, n_local=3)
PROBE = r"""
import json, sys, threading
import numpy as np, torch
from ffcv.loader.epoch_iterator import EpochIterator
from pipelines.ffcv import decoder
from pipelines.ffcv.loader import FFCVMultiCropLoader
from pipelines.spec import MultiCropSpec

beton, raw_beton, out, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
calls = {"decode": 0, "resize": []}
if decoder.numba.config.DISABLE_JIT:  # wrap the decoder and the resize as the op calls them, to count and record
    real_decode, real_resize = decoder.IMDECODE, decoder.resize_crop
    def counting_decode(*args):
        calls["decode"] += 1
        return real_decode(*args)
    def recording_resize(columns, top, left, h, w, crop, flip):  # columns: the image transposed, [W, H·3]
        calls["resize"].append([int(v) for v in (columns.shape[1] // 3, columns.shape[0], top, top + h, left,
                                                 left + w, crop.shape[0], crop.shape[1])])
        return real_resize(columns, top, left, h, w, crop, flip)
    decoder.IMDECODE, decoder.resize_crop = counting_decode, recording_resize

def build(spec, path=beton):
    return FFCVMultiCropLoader(path, spec, 4, workers, rank=0, world_size=1, seed=3, device=torch.device("cpu"))

def epoch_rows(loader, epoch, start=0):
    loader.set_epoch(epoch, start)
    got = [(torch.cat([g.reshape(4, -1), l.reshape(4, -1)], 1).clone(), y.clone()) for _, g, l, y in
           loader.iter_uint8()]
    return torch.stack([r for r, _ in got]).numpy(), torch.stack([y for _, y in got]).numpy()

spec = MultiCropSpec(global_size=32, local_size=16, n_local=3)
loader = build(spec)
rows, labels = epoch_rows(loader, 1)
res = {"jit": not decoder.numba.config.DISABLE_JIT, "steps": len(loader), "decodes": calls["decode"],
       "resizes": list(calls["resize"])}
resumed, _ = epoch_rows(loader, 1, start=2)
res["resume_equal"] = bool(np.array_equal(resumed, rows[2:]))
other, _ = epoch_rows(loader, 2)
res["epochs_differ"] = bool((other != rows).mean() > 0.5)
loader.set_epoch(0)
batch = next(iter(loader))
res["crops"] = [[list(c.shape), str(c.dtype), bool(torch.isfinite(c).all())] for c in batch.crops]
res["labels_dtype"] = str(batch.labels.dtype)
# the batch above left its epoch after one of 6 batches: FFCV's thread must have stopped, not go on decoding (a
# process that exits while it is inside numba's TBB pool aborts)
res["threads_left"] = sum(isinstance(t, EpochIterator) and t.is_alive() for t in threading.enumerate())
# every crop the central square (all 10 tries fail or give it): its content can be recomputed independently
full = MultiCropSpec(global_size=32, local_size=16, n_local=3, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0),
                     ratio=(1.0, 1.0))
full_rows, full_labels = epoch_rows(build(full, raw_beton), 0)
raw_rows, _ = epoch_rows(build(spec, raw_beton), 1)  # pixels stored uncompressed: same boxes, no JPEG error
np.savez(out, rows=rows, labels=labels, full_rows=full_rows, full_labels=full_labels, raw_rows=raw_rows)
print("PROBE " + json.dumps(res))
"""


def _env(jit: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_DISABLE_JIT"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env if jit else {**env, "NUMBA_DISABLE_JIT": "1"}


@pytest.fixture(scope="module")
def betons(tmp_path_factory) -> tuple[Path, Path]:
    """24 smooth random images of six sizes in 3 classes, converted to JPEG and to raw pixels."""
    root = tmp_path_factory.mktemp("ffcv_src")
    rng = np.random.default_rng(0)
    for i in range(24):
        w, h = SIZES[i % len(SIZES)]
        low = Image.fromarray((rng.random((5, 7, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        (root / f"c{i % 3}").mkdir(exist_ok=True)
        low.save(root / f"c{i % 3}" / f"{i:02d}.jpg", quality=95)
    out = tmp_path_factory.mktemp("ffcv_out")
    for mode in ("jpg", "raw"):
        assert convert_folder(root, out / f"{mode}.beton", write_mode=mode, workers=1, file_list=False,
                              progress=False).images_written == 24
    return out / "jpg.beton", out / "raw.beton"


@pytest.fixture(scope="module")
def beton(betons) -> Path:
    return betons[0]


@pytest.fixture(scope="module")
def probes(betons, tmp_path_factory):
    """The probe with JIT off (1 thread, decode calls counted) and with JIT on (2 threads), run side by side."""
    out = tmp_path_factory.mktemp("probe")
    procs = {jit: subprocess.Popen([sys.executable, "-c", PROBE, *map(str, betons), str(out / f"jit{jit}.npz"),
                                    "2" if jit else "1"], env=_env(jit), cwd=REPO, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE) for jit in (False, True)}
    results = {}
    for jit, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        line = next(x for x in stdout.splitlines() if x.startswith("PROBE "))
        results[jit] = (json.loads(line[6:]), np.load(out / f"jit{jit}.npz"))
    return results


@pytest.mark.slow
def test_decodes_each_image_once_and_crop_geometry(probes):
    res, _ = probes[False]
    assert not res["jit"] and res["steps"] == 6
    n_crops = SPEC.n_crops
    assert res["decodes"] == 24  # one decode per image for 2 + 3 crops (FFCV's own decoder: 5 per image)
    boxes = np.array(res["resizes"])
    assert boxes.shape == (24 * n_crops, 8)
    fractions = {"global": [], "local": []}
    for k, (rows, cols, r0, r1, c0, c1, out_h, out_w) in enumerate(boxes):
        kind = "global" if k % n_crops < 2 else "local"
        assert (out_h, out_w) == ((32, 32) if kind == "global" else (16, 16))
        assert (cols, rows) in SIZES and 0 <= r0 < r1 <= rows and 0 <= c0 < c1 <= cols
        h, w = r1 - r0, c1 - c0
        frac, lo, hi = h * w / (rows * cols), *(SPEC.global_scale if kind == "global" else SPEC.local_scale)
        if (h, w) == (rows, cols):  # torchvision's fallback after 10 failed tries: the whole (in-ratio) image
            assert kind == "global" and 0.75 <= cols / rows <= 4 / 3
        else:
            slack = 1 / h + 1 / w  # w and h are rounded to integers
            assert lo * (1 - 2 * slack) <= frac <= hi * (1 + 2 * slack)
            assert 0.75 * (1 - slack) <= w / h <= 4 / 3 * (1 + slack)
        fractions[kind].append((frac, rows, cols))
    # the area fractions follow the reference sampler's distribution on the same image sizes (mean within 4 s.e.)
    gen = torch.Generator().manual_seed(0)
    for kind, scale in (("global", SPEC.global_scale), ("local", SPEC.local_scale)):
        ours = np.array([f for f, _, _ in fractions[kind]])
        ref = []
        for _, rows, cols in fractions[kind]:
            for _ in range(50):
                _, _, h, w = sample_resized_crop(rows, cols, scale, SPEC.ratio, gen)
                ref.append(h * w / (rows * cols))
        assert abs(ours.mean() - np.mean(ref)) < 4 * np.std(ref) / math.sqrt(len(ours)), kind


@pytest.mark.slow
def test_crop_content_and_flips_match_an_independent_resize(betons, probes):
    """Crops of the whole central square from raw-stored pixels equal PIL's bicubic resize (the reference's), possibly
    mirrored; and crops from JPEG storage differ from those from raw storage by JPEG error only."""
    _, arrays = probes[False]
    images, labels = stored_images(betons[1])
    order = epoch_indices(24, 3, 0, 0, 1)
    rows, got_labels = arrays["full_rows"].reshape(24, -1), arrays["full_labels"].reshape(24)
    np.testing.assert_array_equal(got_labels, labels[order])
    flips, offsets = 0, [0, 32 * 32 * 3, 2 * 32 * 32 * 3] + [2 * 32 * 32 * 3 + j * 16 * 16 * 3 for j in (1, 2, 3)]
    for row, idx in zip(rows, order):
        img = images[idx]
        side = min(img.shape[:2])
        top, left = (img.shape[0] - side) // 2, (img.shape[1] - side) // 2
        square = img[top:top + side, left:left + side]
        for c, size in enumerate([32, 32, 16, 16, 16]):
            crop = row[offsets[c]:offsets[c] + size * size * 3].reshape(size, size, 3)
            want = np.asarray(Image.fromarray(square).resize((size, size), Image.BICUBIC))
            assert np.array_equal(crop, want) != np.array_equal(crop, want[:, ::-1])
            flips += np.array_equal(crop, want[:, ::-1])
    assert abs(flips / 120 - 0.5) <= 5 * math.sqrt(0.25 / 120)
    # JPEG (q 90, 4:2:0) storage: same boxes and flips, so only JPEG error (~2 levels; unrelated crops differ by ~60)
    assert np.abs(arrays["raw_rows"].astype(np.float64) - arrays["rows"]).mean() < 4.0


def test_jit_on_equals_jit_off_and_batches(probes):
    off, on = probes[False], probes[True]
    assert on[0]["jit"] and on[0]["steps"] == 6
    np.testing.assert_array_equal(on[1]["rows"], off[1]["rows"])  # crops are a pure function of (seed, epoch, index)
    np.testing.assert_array_equal(on[1]["labels"], off[1]["labels"])
    for res, _ in (off, on):
        assert res["resume_equal"] and res["epochs_differ"]
        g, loc = [[4, 3, 32, 32], "torch.float32", True], [[4, 3, 16, 16], "torch.float32", True]
        assert res["crops"] == [g, g, loc, loc, loc]
        assert res["labels_dtype"] == "torch.int64"
        assert res["threads_left"] == 0


def test_clear_errors(beton, tmp_path):
    from pipelines.ffcv.loader import FFCVMultiCropLoader

    def build(path: str, batch: int = 4):
        return FFCVMultiCropLoader(path, SPEC, batch, rank=0, world_size=1, seed=0, device=torch.device("cpu"))

    with pytest.raises(DataError, match="needs data.ffcv_path: run dino-fast-convert"):
        build("")
    with pytest.raises(DataError, match="does not exist: run dino-fast-convert"):
        build(str(tmp_path / "missing.beton"))
    (tmp_path / "junk.beton").write_text("not a beton")
    with pytest.raises(DataError, match="not a readable .beton"):
        build(str(tmp_path / "junk.beton"))
    with pytest.raises(DataError, match="fewer than one batch"):
        build(str(beton), batch=32)


@pytest.mark.slow
def test_trainer_runs_a_few_steps_on_ffcv(tmp_path):
    from pipelines.demo_data import ensure_demo_dataset

    train_dir, _ = ensure_demo_dataset(tmp_path / "demo", image_size=64, per_class_train=4, per_class_val=1)
    beton = tmp_path / "demo.beton"
    assert convert_folder(train_dir, beton, workers=2, progress=False).images_written == 32
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "dino_fast.train", "--config", str(REPO / "dino_fast/configs/demo.yaml"),
           "data.backend=ffcv", f"data.ffcv_path={beton}", f"data.path={train_dir}", "data.global_crop_size=64",
           "data.local_crop_size=32", "data.batch_size_per_gpu=8", "data.num_workers=2", "model.depth=1",
           "optim.max_steps=3", f"checkpoint.output_dir={run}", "logging.progress=plain"]
    env = clean_env(_env(jit=True))
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "photometric=numba on cpu" in proc.stdout and "JIT on" in proc.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]  # the demo recipe also logs k-NN records
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(math.isfinite(s["loss"]) and 0 < s["loss"] < 2 * math.log(4096) for s in steps)
