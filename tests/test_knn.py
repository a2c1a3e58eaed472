"""k-NN evaluation: the classifier against an independent float64 brute force, feature extraction against a
hand-built eval transform, multi-rank gathering over a real gloo process group, and the CLI's error path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from dino_fast.eval.knn import evaluate_knn, extract_features, knn_classify
from pipelines.demo_data import generate
from pipelines.folder import DataError, ImageList, list_images

REPO = Path(__file__).resolve().parents[1]


def brute_force_knn(train, ytr, test, yte, k, temperature, num_classes):
    """float64 numpy: full similarity matrix, stable sort, per-class weight sums; returns (top1 %, top5 %)."""
    train, test = train.astype(np.float64), test.astype(np.float64)
    sims = test @ train.T
    k = min(k, train.shape[0])
    top1 = top5 = 0
    for t in range(test.shape[0]):
        order = np.argsort(-sims[t], kind="stable")[:k]
        votes = np.zeros(num_classes)
        np.add.at(votes, ytr[order], np.exp(sims[t, order] / temperature))
        top1 += int(np.argmax(votes) == yte[t])
        # top-5 hit: the true class got votes and fewer than 5 classes got more.
        top5 += int(votes[yte[t]] > 0 and (votes > votes[yte[t]]).sum() < 5)
    n = test.shape[0]
    return 100.0 * top1 / n, 100.0 * top5 / n


def clustered_features(n, dim, classes, rng, spread=1.3):
    """Unit vectors around one random centroid per class: k-NN accuracy strictly between chance and 100%."""
    centroids = rng.standard_normal((classes, dim))
    labels = rng.integers(0, classes, n)
    x = centroids[labels] + spread * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


@pytest.mark.parametrize(
    "n_train, n_test, dim, classes, chunk, train_chunk, k_list",
    [
        (300, 70, 16, 7, 256, 0, (10, 20, 100, 200)),  # one test chunk
        (300, 70, 16, 7, 32, 0, (1, 10, 20, 100)),  # chunked over test rows (last chunk partial)
        (300, 70, 16, 12, 25, 64, (10, 20, 100, 200)),  # train walked in blocks with the running top-k merge
        (40, 33, 8, 3, 16, 0, (10, 100, 200)),  # k > train size clamps; 3 classes: top-5 clamps to 3
    ],
)
def test_knn_classify_matches_float64_brute_force(n_train, n_test, dim, classes, chunk, train_chunk, k_list):
    rng = np.random.default_rng(n_train + classes)
    train, ytr = clustered_features(n_train, dim, classes, rng)
    test, yte = clustered_features(n_test, dim, classes, rng)
    got = knn_classify(torch.from_numpy(train), torch.from_numpy(ytr), torch.from_numpy(test), torch.from_numpy(yte),
                       k_list=k_list, temperature=0.07, num_classes=classes, chunk_size=chunk,
                       train_chunk_size=train_chunk)
    assert list(got) == list(k_list)
    for k in k_list:
        want = brute_force_knn(train, ytr, test, yte, k, 0.07, classes)
        assert got[k] == pytest.approx(want, abs=1e-9), f"k={k}"
    top1s = [v[0] for v in got.values()]
    assert any(0 < t < 100 for t in top1s), "degenerate data: the comparison would not test anything"


def test_knn_classify_rejects_unlabelled_and_infers_classes():
    f = torch.nn.functional.normalize(torch.randn(10, 4), dim=1)
    with pytest.raises(ValueError, match="class"):
        knn_classify(f, -torch.ones(10, dtype=torch.long), f, torch.zeros(10, dtype=torch.long), k_list=(1,))
    # Querying the train set itself with k=1: every row is its own nearest neighbour.
    y = torch.arange(10) % 4
    assert knn_classify(f, y, f, y, k_list=(1,))[1] == (100.0, 100.0)


def _tiny_vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2, patch_size=8,
                             img_size=32, dynamic_img_size=True, global_pool="token").eval()


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shapes")
    generate(root, image_size=36, per_class_train=3, per_class_val=2)
    return root / "train", root / "val"


def _manual_eval_tensor(path: str, resize: int, crop: int) -> torch.Tensor:
    """The eval transform written out with PIL + numpy: shorter side → resize (bicubic), center crop, normalise."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = resize / min(w, h)
    img = img.resize((round(w * s), round(h * s)), Image.BICUBIC)
    w, h = img.size
    left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))
    arr = np.asarray(img.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255.0
    arr = (arr - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def test_extract_features_matches_manual_transform(tiny_folders):
    train, _ = tiny_folders
    model = _tiny_vit()
    model.train()  # extract must switch to eval and restore the mode
    feats, labels = extract_features(model, train, resize=40, crop=32, batch_size=5, num_workers=0, progress=False)
    images = list_images(train)
    assert model.training
    assert feats.shape == (len(images.files), 192) and feats.dtype == torch.float32
    assert torch.equal(labels, torch.tensor(images.labels))
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(len(feats)), atol=1e-5, rtol=0)
    model.eval()
    for i in (0, 7, len(images.files) - 1):
        with torch.no_grad():
            want = torch.nn.functional.normalize(model(_manual_eval_tensor(images.files[i], 40, 32)[None]), dim=1)
        torch.testing.assert_close(feats[i], want[0], atol=2e-5, rtol=0)


def test_extract_features_leaves_the_global_rng_alone(tiny_folders):
    """Periodic k-NN runs mid-training: drawing from the global RNG would shift the student's drop-path noise, so
    a run with k-NN every epoch would not follow the trajectory of one without."""
    train, _ = tiny_folders
    model = _tiny_vit()
    before = torch.get_rng_state()
    extract_features(model, train, resize=40, crop=32, batch_size=5, num_workers=0, progress=False)
    assert torch.equal(torch.get_rng_state(), before)


def test_extract_features_reports_corrupt_image(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / "a" / "ok.png")
    (tmp_path / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        extract_features(_tiny_vit(), tmp_path, resize=32, crop=32, num_workers=0, progress=False)
    with pytest.raises(ValueError, match="multiple of the model's patch size"):
        extract_features(_tiny_vit(), tmp_path, resize=32, crop=30, num_workers=0, progress=False)


def _shard_worker(rank: int, world: int, init_file: str, folder: ImageList, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        feats, labels = extract_features(_tiny_vit(), folder, resize=32, crop=32, batch_size=4, num_workers=0,
                                         rank=rank, world_size=world, progress=False)
        torch.save((feats, labels), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_extract_features_gathers_strided_shards_over_gloo(tiny_folders, tmp_path):
    images = list_images(tiny_folders[1])
    images = ImageList(images.files[:15], images.labels[:15], images.classes, images.root)  # shards 8/7: padded
    single, single_labels = extract_features(_tiny_vit(), images, resize=32, crop=32, num_workers=0, progress=False)
    out = str(tmp_path / "feats")
    mp.spawn(_shard_worker, args=(2, str(tmp_path / "init"), images, out), nprocs=2, join=True)
    for rank in range(2):
        feats, labels = torch.load(f"{out}.{rank}")
        torch.testing.assert_close(feats, single, atol=1e-5, rtol=0)
        assert torch.equal(labels, single_labels)


def _colour_folder(root: Path, colours: dict[str, list[tuple[int, int, int]]]) -> Path:
    for cls, shades in colours.items():
        (root / cls).mkdir(parents=True)
        for i, c in enumerate(shades):
            Image.new("RGB", (32, 32), c).save(root / cls / f"{i}.png")
    return root


def test_evaluate_knn_maps_val_classes_by_name(tmp_path):
    # Solid colours: a random ViT maps near shades to near features, so k=1 is perfect iff labels line up.
    # val lacks the first train class, so index-based labels would be off by one and score 0%.
    train = _colour_folder(tmp_path / "train", {"a_red": [(250, 0, 0), (200, 10, 10)],
                                                "b_green": [(0, 250, 0), (10, 200, 10)],
                                                "c_blue": [(0, 0, 250), (10, 10, 200)]})
    val = _colour_folder(tmp_path / "val", {"b_green": [(5, 230, 5)], "c_blue": [(5, 5, 230)]})
    res = evaluate_knn(_tiny_vit(), train, val, k_list=(1,), resize=32, crop=32, num_workers=0, progress=False)
    assert res == {1: (100.0, 100.0)}
    stray = _colour_folder(tmp_path / "val2", {"d_white": [(255, 255, 255)]})
    with pytest.raises(DataError, match="d_white"):
        evaluate_knn(_tiny_vit(), train, stray, k_list=(1,), resize=32, crop=32, num_workers=0, progress=False)


def test_knn_cli_missing_path_exits_2_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "dino_fast.eval.knn", "--weights", str(tmp_path / "nope.safetensors"), "--train",
         str(tmp_path), "--val", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "nope.safetensors' does not exist" in proc.stderr
