"""Weighted k-NN evaluation of a backbone on a train/val pair of image folders (DINO_SPEC "k-NN evaluation").

Protocol of the reference: backbone in eval mode; resize the shorter side to 256 (bicubic) → center crop 224 →
normalise; L2-normalised CLS features; for every val image the k most cosine-similar train images vote for their
class with weight exp(sim / 0.07); argmax of the summed votes is the prediction; top-1 and top-5 are reported for
k ∈ {10, 20, 100, 200}. Sizes are configurable because small images (the 64 px demo set) need e.g. 64/64.

CLI: ``dino-fast-knn --checkpoint RUN_OR_CHECKPOINT --train DIR --val DIR`` (or ``--weights FILE``: any layout of
``dino_fast/eval/weights.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from dino_fast.checkpoint import CheckpointError
from dino_fast.eval.weights import add_source_args, load_source
from pipelines.folder import DataError, ImageList, list_images
from pipelines.progress import Progress
from pipelines.spec import IMAGENET_MEAN, IMAGENET_STD
from pipelines.workers import ignore_interrupts

DEFAULT_K = (10, 20, 100, 200)


class _EvalImages(Dataset):
    """Deterministic eval view of a list of images: (tensor, label, error message or "")."""

    def __init__(self, files: list[str], labels: list[int], resize: int, crop: int):
        self.files, self.labels, self.crop = files, labels, crop
        self.transform = transforms.Compose([
            transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(crop),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            with Image.open(self.files[i]) as im:
                return self.transform(im.convert("RGB")), self.labels[i], ""
        except Exception as exc:  # PIL raises many types; reported by the main process as one clear DataError
            # Raising here would surface as a worker traceback; return the message and fail in the main process.
            return torch.zeros(3, self.crop, self.crop), self.labels[i], f"{self.files[i]} ({type(exc).__name__})"


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _gather_shards(local: torch.Tensor, n_total: int, world_size: int) -> torch.Tensor:
    """Reassemble strided shards (rank r holds items r, r+W, ...) into the full [n_total, ...] tensor on all ranks."""
    per_rank = math.ceil(n_total / world_size)
    comm_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else (
        torch.device("cpu"))
    padded = torch.zeros((per_rank, *local.shape[1:]), dtype=local.dtype, device=comm_device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    # Row j of rank r is item j·W + r, so stacking along dim 1 restores the global order; padding lands at the end.
    full = torch.stack(parts, dim=1).reshape(per_rank * world_size, *local.shape[1:])[:n_total]
    return full.to(local.device)


@torch.inference_mode()
def extract_features(backbone: nn.Module, folder_or_imagelist: str | Path | ImageList, *, resize: int = 256,
                     crop: int = 224, batch_size: int = 128, num_workers: int = 4,
                     device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
                     progress: bool = True, description: str = "features",
                     features_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised CLS features of every image, with the eval transform (resize bicubic → center crop → normalise).

    The feature is the backbone's output in eval mode: a ViT's or XCiT's CLS token after the final norm, a ResNet's
    pooled feature (as the reference's ``eval_knn.py`` takes ``model(images)`` for every family).

    ``features_fn`` (images → [B, D]) replaces the normalised CLS feature (the linear probe's unnormalised
    concatenations of several blocks' tokens).

    With ``world_size > 1`` this rank extracts items ``rank::world_size``; when a process group is initialised the
    shards are all-gathered so every rank returns all N rows in folder order (without one, only this rank's shard
    is returned). The backbone's train/eval mode is restored afterwards.

    Returns:
        features ``[N, D]`` float32 on ``device``, and labels ``[N]`` int64 (−1 for a flat folder).
    Raises:
        DataError: missing/empty folder or an unreadable image.
    """
    images = folder_or_imagelist if isinstance(folder_or_imagelist, ImageList) else list_images(folder_or_imagelist)
    device = torch.device(device)
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", None)  # none for a ResNet
    patch = patch if patch is None or isinstance(patch, int) else patch[0]  # an int for XCiT, a pair for a ViT
    if patch is not None and crop % patch:
        raise ValueError(f"crop size {crop} is not a multiple of the model's patch size {patch}; pick e.g. "
                         f"{crop - crop % patch or patch}")
    files, labels = images.files[rank::world_size], images.labels[rank::world_size]
    loader = DataLoader(_EvalImages(files, labels, resize, crop), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=False, worker_init_fn=ignore_interrupts if num_workers else None,
                        generator=torch.Generator())  # an evaluation mid-training must not move the global RNG
    dtype = next(backbone.parameters()).dtype
    was_training = backbone.training
    backbone.eval()
    chunks: list[torch.Tensor] = []
    bar = Progress("auto" if progress and rank == 0 else "none", stderr=True, transient=True,
                   print_every=max(1, math.ceil(len(files) / 4)))  # about four plain lines per pass
    bar.phase(description, len(files))
    try:
        for x, _, errors in loader:
            bad = [e for e in errors if e]
            if bad:
                more = f" (and {len(bad) - 1} more in this batch)" if len(bad) > 1 else ""
                raise DataError(f"cannot read image {bad[0]}{more}: remove or replace it")
            x = x.to(device, dtype, non_blocking=True)
            if features_fn is not None:
                chunks.append(features_fn(x).float())
            else:
                chunks.append(nn.functional.normalize(backbone(x).float(), dim=1, p=2))
            bar.update(bar.done + x.shape[0])
    finally:
        bar.close()
        backbone.train(was_training)
    if not chunks and features_fn is not None:  # an empty shard still needs the feature width for the gather
        with torch.no_grad():
            chunks.append(features_fn(torch.zeros(1, 3, crop, crop, device=device, dtype=dtype)).float()[:0])
    dim = chunks[0].shape[1] if chunks else backbone.num_features
    features = torch.cat(chunks) if chunks else torch.zeros(0, dim, device=device)
    if world_size > 1 and _dist_ready():
        features = _gather_shards(features, len(images.files), world_size)
        labels = images.labels
    return features, torch.tensor(labels, dtype=torch.int64, device=device)


@torch.inference_mode()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, k_list: Sequence[int] = DEFAULT_K, temperature: float = 0.07,
                 num_classes: int | None = None, chunk_size: int = 256,
                 train_chunk_size: int = 0) -> dict[int, tuple[float, float]]:
    """Weighted k-NN accuracy (%) of ``test`` against ``train``; features must already be L2-normalised.

    Test rows are processed ``chunk_size`` at a time against the train matrix, so only a [chunk, N_train] block of
    similarities exists at once; with ``train_chunk_size > 0`` the train matrix is also walked in blocks with a
    running top-k merge (for train sets whose [chunk, N_train] block would not fit). k larger than the train set
    is clamped to it; top-5 is clamped to the number of classes and counts only classes that got votes.

    Math: for test row t, N_k(t) = the k train rows of highest s = f_t·f_i; votes_c = Σ_{i∈N_k(t), y_i=c}
    exp(s / T); prediction = argmax_c votes_c.

    Shapes: train_features [N, D], train_labels [N], test_features [M, D], test_labels [M] (any device; the
    computation runs on train_features' device).
    Returns:
        {k: (top-1 %, top-5 %)} for every k in ``k_list``.
    """
    if not k_list or min(k_list) < 1:
        raise ValueError(f"k values must be ≥ 1, got {list(k_list)}")
    device = train_features.device
    train_features = train_features.float()
    train_labels = train_labels.to(device, torch.int64)
    test_features = test_features.to(device, torch.float32)
    test_labels = test_labels.to(device, torch.int64)
    n_train, n_test = train_features.shape[0], test_features.shape[0]
    if n_train == 0 or n_test == 0:
        raise ValueError(f"k-NN needs a non-empty train and test set (got {n_train} train, {n_test} test)")
    if int(min(train_labels.min(), test_labels.min())) < 0:
        raise ValueError("k-NN needs class labels: give folders with one sub-folder per class (found label -1)")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k_max = min(max(k_list), n_train)
    n5 = min(5, num_classes)
    block = train_chunk_size if train_chunk_size > 0 else n_train
    correct = torch.zeros(len(k_list), 2, dtype=torch.int64, device=device)
    for start in range(0, n_test, chunk_size):
        feats = test_features[start:start + chunk_size]
        targets = test_labels[start:start + chunk_size]
        # Running top-k over train blocks: concatenating the best so far with a block's best and taking the
        # top-k again gives the global top-k (up to the order of exactly equal similarities).
        best_sim = best_idx = None
        for t0 in range(0, n_train, block):
            sim = feats @ train_features[t0:t0 + block].T
            s, i = sim.topk(min(k_max, sim.shape[1]), dim=1)
            i = i + t0
            if best_sim is not None:
                merged = torch.cat([best_sim, s], 1)
                s, j = merged.topk(min(k_max, merged.shape[1]), dim=1)
                i = torch.cat([best_idx, i], 1).gather(1, j)
            best_sim, best_idx = s, i
        neighbour_labels = train_labels[best_idx]  # [chunk, k_max], sorted by decreasing similarity
        weights = (best_sim / temperature).exp()
        for row, k in enumerate(k_list):
            kk = min(k, n_train)
            votes = torch.zeros(feats.shape[0], num_classes, device=device)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            top = votes.topk(n5, dim=1).indices
            hit = top == targets[:, None]
            # A class with no neighbour among the k is no prediction: which zero-vote classes topk returns is
            # arbitrary, so the true class only counts for top-5 when it got votes.
            voted = votes.gather(1, targets[:, None]).squeeze(1) > 0
            correct[row, 0] += hit[:, 0].sum()
            correct[row, 1] += (hit.any(dim=1) & voted).sum()
    counts = correct.cpu().tolist()  # the one host sync
    return {k: (100.0 * c1 / n_test, 100.0 * c5 / n_test) for k, (c1, c5) in zip(k_list, counts)}


def _subset(images: ImageList, n: int) -> ImageList:
    """``n`` evenly spaced images (the list is sorted class by class, so class proportions are kept); 0 → all."""
    if n <= 0 or n >= len(images.files):
        return images
    idx = np.unique(np.linspace(0, len(images.files) - 1, n).round().astype(int))
    return ImageList([images.files[i] for i in idx], [images.labels[i] for i in idx], images.classes, images.root)


def _labelled_pair(train_dir: str | Path | ImageList, val_dir: str | Path | ImageList) -> tuple[ImageList, ImageList]:
    """List both folders; val labels are re-indexed by class *name* into the train classes."""
    train = train_dir if isinstance(train_dir, ImageList) else list_images(train_dir)
    val = val_dir if isinstance(val_dir, ImageList) else list_images(val_dir)
    for name, images in (("train", train), ("val", val)):
        if not images.classes:
            raise DataError(f"k-NN {name} folder '{images.root}' has no class sub-folders: k-NN needs "
                            f"<folder>/<class>/<image> to know each image's label")
    index = {c: i for i, c in enumerate(train.classes)}
    unknown = sorted(set(val.classes) - set(index))
    if unknown:
        raise DataError(f"val classes {unknown[:5]} are not in the train folder '{train.root}'; use matching splits")
    labels = [index[val.classes[y]] for y in val.labels]
    return train, ImageList(val.files, labels, train.classes, val.root)


def evaluate_knn(backbone: nn.Module, train_dir: str | Path | ImageList, val_dir: str | Path | ImageList, *,
                 k_list: Sequence[int] = DEFAULT_K, temperature: float = 0.07, resize: int = 256, crop: int = 224,
                 batch_size: int = 128, num_workers: int = 4, device: torch.device | str = "cpu",
                 train_subset: int = 0, val_subset: int = 0, rank: int = 0, world_size: int = 1,
                 progress: bool = True) -> dict[int, tuple[float, float]]:
    """Extract train and val features (sharded over ranks when a process group is up) and run :func:`knn_classify`.

    Every rank gets the same result. ``train_subset``/``val_subset`` > 0 evaluate on that many evenly spaced
    images (for a quick periodic check during training).
    """
    if world_size > 1 and not _dist_ready():
        raise ValueError("world_size > 1 needs an initialised torch.distributed process group")
    train, val = _labelled_pair(train_dir, val_dir)
    train, val = _subset(train, train_subset), _subset(val, val_subset)
    common = dict(resize=resize, crop=crop, batch_size=batch_size, num_workers=num_workers, device=device,
                  rank=rank, world_size=world_size, progress=progress)
    train_f, train_y = extract_features(backbone, train, description="k-NN train features", **common)
    val_f, val_y = extract_features(backbone, val, description="k-NN val features", **common)
    results = None
    if rank == 0:
        results = knn_classify(train_f, train_y, val_f, val_y, k_list, temperature, len(train.classes))
    if world_size > 1:
        box = [results]
        dist.broadcast_object_list(box, src=0)
        results = box[0]
    return results


def check_knn_split(cfg) -> None:
    """Raise DataError (what to add, or which keys turn the k-NN off) when the held-out split is missing."""
    from pipelines.build import resolve_data_path

    try:
        resolve_data_path(cfg.data, "val")
    except DataError as exc:
        raise DataError(f"{exc}. The k-NN evaluation (eval.knn_at_start, eval.knn_at_end, eval.knn_every_epochs) "
                        "needs those labelled held-out images: add them, or turn it off with eval.knn_at_start=false "
                        "eval.knn_at_end=false eval.knn_every_epochs=0") from None


def periodic_knn(cfg, teacher: torch.nn.Module, device: torch.device, rank: int, world: int) -> dict:
    """Weighted k-NN accuracy of the teacher backbone on the held-out split (every rank takes part).

    The backbone runs in eval mode (BatchNorm on its running statistics) and is put back in the mode it was in
    (:func:`extract_features`): a teacher with BatchNorm trains in train mode, as the reference's.
    """
    from pipelines.build import resolve_data_path

    size = cfg.data.global_crop_size
    results = evaluate_knn(
        teacher.backbone, resolve_data_path(cfg.data, "train"), resolve_data_path(cfg.data, "val"),
        k_list=(cfg.eval.knn_k,), temperature=cfg.eval.knn_temperature, resize=round(size * 256 / 224), crop=size,
        batch_size=2 * cfg.data.batch_size_per_gpu, num_workers=cfg.data.num_workers, device=device,
        train_subset=cfg.eval.knn_train_subset, val_subset=cfg.eval.knn_val_subset, rank=rank, world_size=world,
        progress=False)
    top1, top5 = results[cfg.eval.knn_k]
    return {"knn_top1": top1, "knn_top5": top5}


def _init_distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    """Under torchrun (WORLD_SIZE > 1) join the process group; returns rank, world size and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_arg:
        device = torch.device(device_arg)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if world <= 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dino-fast-knn", description=__doc__.split("\n\n")[0])
    add_source_args(p)
    p.add_argument("--train", required=True, help="train image folder (<dir>/<class>/<image>)")
    p.add_argument("--val", required=True, help="val image folder with the same class sub-folders")
    p.add_argument("--k", type=int, nargs="+", default=list(DEFAULT_K), help="neighbour counts")
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--resize", type=int, default=256, help="shorter side before the center crop (bicubic)")
    p.add_argument("--crop", type=int, default=224, help="center crop side (a multiple of the patch size)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--train-subset", type=int, default=0, help="use this many train images (0: all)")
    p.add_argument("--val-subset", type=int, default=0, help="use this many val images (0: all)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        for flag in ("k", "resize", "crop", "batch_size"):
            values = getattr(args, flag)
            if min(values if isinstance(values, list) else [values]) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be ≥ 1")
        for flag in ("train", "val", "checkpoint", "weights"):
            path = getattr(args, flag)
            if path is not None and not Path(path).exists():
                raise DataError(f"--{flag} path '{path}' does not exist")
        rank, world, device = _init_distributed(args.device)
        backbone, source = load_source(args)
        backbone.to(device)
        t0 = time.perf_counter()
        results = evaluate_knn(backbone, args.train, args.val, k_list=args.k, temperature=args.temperature,
                               resize=args.resize, crop=args.crop, batch_size=args.batch_size,
                               num_workers=args.workers, device=device, train_subset=args.train_subset,
                               val_subset=args.val_subset, rank=rank, world_size=world)
    except (DataError, CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"dino-fast-knn: error: {exc}", file=sys.stderr)
        sys.exit(2)
    if rank != 0:
        return
    seconds = time.perf_counter() - t0
    for k, (top1, top5) in results.items():
        print(f"k-NN k={k:<4d} top-1 {top1:6.2f}%  top-5 {top5:6.2f}%")
    print(f"({source}; {seconds:.1f} s on {device})")
    if args.out:
        record = {"source": source, "train": str(args.train), "val": str(args.val), "resize": args.resize,
                  "crop": args.crop, "temperature": args.temperature, "seconds": seconds,
                  "results": {str(k): {"top1": t1, "top5": t5} for k, (t1, t5) in results.items()}}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
