"""Linear evaluation of a frozen backbone: the reference DINO protocol, and a fast grid on cached features.

Features (the reference's ``eval_linear.py``): the final norm applied to the outputs of the last ``n`` blocks; the
CLS tokens of those blocks concatenated, and with ``avgpool`` also the mean of the last block's patch tokens. The
reference uses n=4 without avgpool for ViT-S and n=1 with avgpool for ViT-B (``auto``: by width, < 768 → ViT-S's).
A ResNet or an XCiT is probed on its output, as the reference does (``model(images)``: the pooled feature, the CLS
token after the final norm): the layout ``pooled`` (n = 0); ``n_last_blocks`` and ``avgpool`` apply to ViTs.

- Reference protocol (``dino-fast-linear``): one linear layer (weights N(0, 0.01), bias 0) trained with SGD,
  momentum 0.9, weight decay 0, lr 0.001 × batch / 256, cosine to 0 over 100 epochs (stepped per epoch) on
  RandomResizedCrop + horizontal flip; evaluated with resize + centre crop; the best top-1 over the evaluations is
  reported, as the reference does.
- Fast mode (``--fast``, as dinov2's linear eval): features extracted once, without augmentation; one linear head per
  (feature layout, lr, weight decay) of a grid, all trained together on the cached features with the same SGD; the
  setting that scores best on a held-out part of the train split is reported with its top-1/top-5 on the val split
  (and, for comparison with dinov2's numbers, the best val top-1 over the whole grid).

CLI: ``dino-fast-linear --checkpoint RUN --train DIR --val DIR [--fast]`` (or ``--weights FILE``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from dino_fast.checkpoint import CheckpointError
from dino_fast.eval.knn import _labelled_pair, extract_features
from dino_fast.eval.weights import add_source_args, load_source
from dino_fast.models import backbone_family
from pipelines.folder import DataError, ImageList
from pipelines.spec import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)  # dinov2's grid
DEFAULT_WDS = (0.0, 1e-4, 1e-3)
LAYOUTS = ((4, False), (1, True), (1, False), (4, True))  # (n_last_blocks, avgpool): the fast mode's grid


POOLED = (0, False)  # the layout of a network that is not a plain ViT: its output


def is_vit(backbone: nn.Module) -> bool:
    """Whether the block layouts apply: a timm VisionTransformer (else the network's output is probed)."""
    return backbone_family(backbone) == "vit"


def default_layout(backbone: nn.Module) -> tuple[int, bool]:
    """The reference's choice: ViT-S (and smaller) → 4 CLS tokens; ViT-B and wider → last CLS + pooled patches;
    another network → its output (:data:`POOLED`)."""
    if not is_vit(backbone):
        return POOLED
    return (1, True) if backbone.embed_dim >= 768 else (4, False)


def layout_name(n: int, avgpool: bool) -> str:
    return "pooled" if n == 0 else f"cls{n}" + ("+avgpool" if avgpool else "")


def block_features(backbone: nn.Module, x: torch.Tensor, n: int, avgpool: bool) -> torch.Tensor:
    """[B, D·(n + avgpool)]: normed CLS tokens of the last ``n`` blocks (oldest first), then the pooled patches;
    with ``n`` = 0 the backbone's output [B, D] (:data:`POOLED`)."""
    if n == 0:
        return backbone(x)
    outs = backbone.forward_intermediates(x, indices=n, return_prefix_tokens=True, norm=True, output_fmt="NLC",
                                          intermediates_only=True)
    parts = [prefix[:, 0] for _, prefix in outs]
    if avgpool:
        parts.append(outs[-1][0].mean(dim=1))
    return torch.cat(parts, dim=1)


def _slice(features: torch.Tensor, dim: int, n: int, avgpool: bool) -> torch.Tensor:
    """From cached [N, (m + 1)·D] features (m CLS tokens, then the pooled patches) the columns of one layout."""
    m = features.shape[1] // dim - 1
    cols = features[:, (m - n) * dim:m * dim]
    return torch.cat([cols, features[:, m * dim:]], 1) if avgpool else cols


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 (top-min(5, C)) accuracy in %; logits [..., N, C], labels [N] → per leading index."""
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    hit = top == labels[:, None]
    return 100.0 * hit[..., 0].float().mean(-1), 100.0 * hit.any(-1).float().mean(-1)


@dataclass
class HeadGrid:
    """Linear heads trained together: weight [H, D, C], bias [H, C], each with its own lr and weight decay."""

    weight: torch.Tensor
    bias: torch.Tensor
    lrs: torch.Tensor  # [H], already scaled by batch / 256
    wds: torch.Tensor  # [H]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[N, D] → [H, N, C], as one [N, D] × [D, H·C] matrix product (a batched one with C columns each is
        several times slower on a CPU)."""
        h, d, c = self.weight.shape
        out = x @ self.weight.permute(1, 0, 2).reshape(d, h * c)
        return out.reshape(-1, h, c).transpose(0, 1) + self.bias[:, None]


def train_heads(x: torch.Tensor, y: torch.Tensor, num_classes: int, lrs: Sequence[float], wds: Sequence[float], *,
                epochs: int, batch_size: int, momentum: float = 0.9, seed: int = 0) -> HeadGrid:
    """One linear head per (lr, wd) pair, trained on the same shuffled mini-batches of fixed features ``x``.

    Each head follows ``torch.optim.SGD(lr, momentum, weight_decay=wd)`` (wd applied to weight and bias, like the
    reference's optimizer over the whole linear layer) with the lr cosine-annealed to 0 per epoch; the heads'
    losses are summed, so each head's gradient is its own. Init as the reference: N(0, 0.01) weights, zero bias.

    Shapes: x [N, D], y [N] int64, lrs/wds [H] → HeadGrid with weight [H, D, C].
    """
    gen = torch.Generator().manual_seed(seed)
    heads = len(lrs)
    dev = x.device
    w = (0.01 * torch.randn(heads, x.shape[1], num_classes, generator=gen)).to(dev).requires_grad_()
    b = torch.zeros(heads, num_classes, device=dev, requires_grad=True)
    grid = HeadGrid(w, b, torch.tensor(lrs, dtype=torch.float32, device=dev),
                    torch.tensor(wds, dtype=torch.float32, device=dev))
    bufs = [torch.zeros_like(w), torch.zeros_like(b)]
    for epoch in range(epochs):
        scale = 0.5 * (1 + math.cos(math.pi * epoch / epochs))  # CosineAnnealingLR(T_max=epochs, eta_min=0)
        order = torch.randperm(x.shape[0], generator=gen).to(dev)
        for start in range(0, x.shape[0], batch_size):
            idx = order[start:start + batch_size]
            logits = grid.logits(x[idx])
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), y[idx].repeat(heads), reduction="sum")
            loss = loss / idx.numel()  # = Σ_heads mean cross-entropy of that head
            gw, gb = torch.autograd.grad(loss, (w, b))
            with torch.no_grad():
                for p, g, buf, view in ((w, gw, bufs[0], (-1, 1, 1)), (b, gb, bufs[1], (-1, 1))):
                    g = g + grid.wds.view(view) * p
                    buf.mul_(momentum).add_(g)
                    p.sub_((scale * grid.lrs).view(view) * buf)
    w.requires_grad_(False)
    b.requires_grad_(False)
    return grid


def _holdout_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (fit, held out): ``fraction`` of each class, at least one image, drawn with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten().cpu()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        k = max(1, round(fraction * idx.numel())) if idx.numel() > 1 else 0
        held.append(idx[:k])
        fit.append(idx[k:])
    return torch.cat(fit), torch.cat(held)


def linear_fast(backbone: nn.Module, train_dir: str | Path | ImageList, val_dir: str | Path | ImageList, *,
                lrs: Sequence[float] = DEFAULT_LRS, wds: Sequence[float] = DEFAULT_WDS,
                layouts: Sequence[tuple[int, bool]] = LAYOUTS, epochs: int = 20, batch_size: int = 256,
                holdout: float = 0.1, resize: int = 256, crop: int = 224, num_workers: int = 4,
                device: torch.device | str = "cpu", seed: int = 0, progress: bool = True) -> dict:
    """dinov2-style linear eval: cache features once, train a grid of heads, report the held-out-best setting.

    ``lrs`` are per 256 images (scaled by ``batch_size / 256``). ``holdout`` = 0 selects on the val split itself
    (dinov2's way; optimistic). Returns {"best": {...}, "best_val_top1_over_grid", "grid": [...], "seconds": {...}}.
    """
    if not 0 <= holdout < 1:
        raise ValueError(f"--holdout must be in [0, 1), got {holdout}")
    train, val = _labelled_pair(train_dir, val_dir)
    if is_vit(backbone):
        depth, dim = len(backbone.blocks), backbone.embed_dim
        layouts = [(n, a) for n, a in layouts if n <= depth]
        m, cached = max(n for n, _ in layouts), True
    else:  # the network's output, cached as is (one layout)
        dim, layouts, m, cached = backbone.num_features, [POOLED], 0, False
    t0 = time.perf_counter()
    common = dict(resize=resize, crop=crop, batch_size=128, num_workers=num_workers, device=device,
                  progress=progress, features_fn=lambda x: block_features(backbone, x, m, cached))
    x_tr, y_tr = extract_features(backbone, train, description="linear train features", **common)
    x_va, y_va = extract_features(backbone, val, description="linear val features", **common)
    t_feat, cpu0 = time.perf_counter() - t0, time.process_time()
    fit, held = _holdout_split(y_tr, holdout, seed) if holdout > 0 else (torch.arange(len(y_tr)), None)
    settings = [(lr, wd) for lr in lrs for wd in wds]
    scale = batch_size / 256.0
    rows = []
    for n, avgpool in layouts:
        def cols(f: torch.Tensor, n=n, avgpool=avgpool) -> torch.Tensor:
            return _slice(f, dim, n, avgpool) if cached else f

        grid = train_heads(cols(x_tr[fit]), y_tr[fit], len(train.classes), [lr * scale for lr, _ in settings],
                           [wd for _, wd in settings], epochs=epochs, batch_size=batch_size, seed=seed)
        sel_x, sel_y = (cols(x_tr[held]), y_tr[held]) if held is not None else (cols(x_va), y_va)
        sel_logits = grid.logits(sel_x)
        sel_top1, _ = accuracy(sel_logits, sel_y)
        sel_loss = nn.functional.cross_entropy(sel_logits.transpose(1, 2), sel_y.expand(len(settings), -1),
                                               reduction="none").mean(1)
        val_top1, val_top5 = accuracy(grid.logits(cols(x_va)), y_va)
        for h, (lr, wd) in enumerate(settings):
            rows.append({"layout": layout_name(n, avgpool), "lr": lr, "wd": wd, "select_top1": float(sel_top1[h]),
                         "select_loss": float(sel_loss[h]), "val_top1": float(val_top1[h]),
                         "val_top5": float(val_top5[h])})
    best = max(rows, key=lambda r: (r["select_top1"], -r["select_loss"]))  # ties: the better-calibrated head
    return {"mode": "fast", "best": best, "best_val_top1_over_grid": max(r["val_top1"] for r in rows),
            "select_on": f"held-out {holdout:.0%} of train" if held is not None else "val", "heads": len(rows),
            "n_train": int(fit.numel()), "n_val": len(y_va), "grid": rows,
            "seconds": {"features": t_feat, "heads": time.perf_counter() - t0 - t_feat,
                        "heads_cpu": time.process_time() - cpu0}}  # CPU time: what a busy machine does not inflate


class _TrainImages(Dataset):
    """The reference's linear-train augmentation: RandomResizedCrop + horizontal flip; (tensor, label, error or "")."""

    def __init__(self, images: ImageList, crop: int):
        self.images, self.crop = images, crop
        self.transform = transforms.Compose([
            transforms.RandomResizedCrop(crop), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.images.files)

    def __getitem__(self, i: int):
        from PIL import Image

        try:
            with Image.open(self.images.files[i]) as im:
                return self.transform(im.convert("RGB")), self.images.labels[i], ""
        except Exception as exc:  # PIL raises many types; the main process turns it into one DataError
            return torch.zeros(3, self.crop, self.crop), self.images.labels[i], f"{self.images.files[i]} ({exc})"


def linear_full(backbone: nn.Module, train_dir: str | Path | ImageList, val_dir: str | Path | ImageList, *,
                n_last_blocks: int, avgpool: bool, epochs: int = 100, lr: float = 0.001, batch_size: int = 1024,
                weight_decay: float = 0.0, resize: int = 256, crop: int = 224, num_workers: int = 4,
                device: torch.device | str = "cpu", seed: int = 0, val_every: int = 1, progress: bool = True) -> dict:
    """The reference's linear protocol on the frozen backbone (module docstring); one process.

    The backbone is frozen and the eval transform deterministic, so the val features are extracted once and every
    evaluation applies the current linear layer to them (what the reference's per-epoch val pass computes).
    Returns {"top1", "top5" (of the best evaluation), "best_epoch", "history": [...], "seconds"}.
    """
    train, val = _labelled_pair(train_dir, val_dir)
    if not is_vit(backbone) and (n_last_blocks, avgpool) != POOLED:
        raise ValueError(f"--n-last-blocks and --avgpool apply to ViTs; a {type(backbone).__name__} is probed on its "
                         f"output (drop them)")
    if is_vit(backbone) and n_last_blocks > len(backbone.blocks):
        raise ValueError(f"--n-last-blocks {n_last_blocks} > the model's {len(backbone.blocks)} blocks")
    device = torch.device(device)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    backbone.eval().requires_grad_(False)
    features = lambda x: block_features(backbone, x, n_last_blocks, avgpool)  # noqa: E731
    x_va, y_va = extract_features(backbone, val, resize=resize, crop=crop, batch_size=128, num_workers=num_workers,
                                  device=device, progress=progress, description="linear val features",
                                  features_fn=features)
    head = nn.Linear(x_va.shape[1], len(train.classes)).to(device)
    torch.nn.init.normal_(head.weight, mean=0.0, std=0.01, generator=gen)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr * batch_size / 256.0, momentum=0.9, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=0)
    loader = DataLoader(_TrainImages(train, crop), batch_size=batch_size, shuffle=True, num_workers=num_workers,
                        generator=gen, persistent_workers=num_workers > 0)
    history, dtype = [], next(backbone.parameters()).dtype
    for epoch in range(epochs):
        total, seen = 0.0, 0
        for x, y, errors in loader:
            bad = [e for e in errors if e]
            if bad:
                raise DataError(f"cannot read image {bad[0]}: remove or replace it")
            with torch.inference_mode():
                f = features(x.to(device, dtype)).float()
            loss = nn.functional.cross_entropy(head(f.clone()), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, seen = total + float(loss.detach()) * len(y), seen + len(y)
        sched.step()
        if (epoch + 1) % val_every == 0 or epoch + 1 == epochs:
            with torch.no_grad():
                top1, top5 = accuracy(head(x_va), y_va)
            history.append({"epoch": epoch + 1, "loss": total / seen, "top1": float(top1), "top5": float(top5)})
            if progress:
                print(f"epoch {epoch + 1}/{epochs}: loss {total / seen:.4f}, val top-1 {float(top1):.2f}% "
                      f"top-5 {float(top5):.2f}%", file=sys.stderr, flush=True)
    best = max(history, key=lambda h: h["top1"])
    return {"mode": "full", "layout": layout_name(n_last_blocks, avgpool), "top1": best["top1"],
            "top5": best["top5"], "best_epoch": best["epoch"], "history": history, "head": head,
            "seconds": time.perf_counter() - t0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dino-fast-linear", description=__doc__.split("\n\n")[0])
    add_source_args(p)
    p.add_argument("--train", required=True, help="train image folder (<dir>/<class>/<image>)")
    p.add_argument("--val", required=True, help="val image folder with the same class sub-folders")
    p.add_argument("--fast", action="store_true", help="grid of heads on cached features (dinov2) instead of the "
                                                       "reference's 100 augmented epochs")
    p.add_argument("--epochs", type=int, default=None, help="default: 100 (reference), 20 with --fast")
    p.add_argument("--batch-size", type=int, default=None, help="default: 1024 (reference), 256 with --fast")
    p.add_argument("--lr", type=float, default=0.001, help="per 256 images (scaled by batch / 256)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--n-last-blocks", type=int, default=0, help="CLS tokens of this many last blocks (0: by width)")
    p.add_argument("--avgpool", choices=("auto", "true", "false"), default="auto",
                   help="append the last block's mean patch token (auto: for ViT-B and wider)")
    p.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS), help="--fast: lr grid (per 256)")
    p.add_argument("--wds", type=float, nargs="+", default=list(DEFAULT_WDS), help="--fast: weight-decay grid")
    p.add_argument("--holdout", type=float, default=0.1,
                   help="--fast: share of each train class held out to pick the setting (0: pick on val)")
    p.add_argument("--val-every", type=int, default=1, help="evaluate every this many epochs (reference mode)")
    p.add_argument("--resize", type=int, default=256, help="shorter side before the centre crop (bicubic)")
    p.add_argument("--crop", type=int, default=224, help="crop side (a multiple of the patch size)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def _run(args: argparse.Namespace) -> tuple[dict, str]:
    args.epochs = args.epochs or (20 if args.fast else 100)
    for flag in ("epochs", "resize", "crop", "val_every"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be ≥ 1")
    for flag in ("train", "val"):
        if not Path(getattr(args, flag)).exists():
            raise DataError(f"--{flag} path '{getattr(args, flag)}' does not exist")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone, source = load_source(args)
    backbone.to(device)
    common = dict(epochs=args.epochs, resize=args.resize, crop=args.crop, num_workers=args.workers, device=device,
                  seed=args.seed)
    if not is_vit(backbone) and (args.n_last_blocks or args.avgpool == "true"):
        raise ValueError(f"--n-last-blocks and --avgpool apply to ViTs; a {type(backbone).__name__} is probed on its "
                         f"output (drop them)")
    if args.fast:
        layouts = LAYOUTS
        if args.n_last_blocks or args.avgpool != "auto":  # a fixed layout: the grid is over lr and wd only
            n, avg = default_layout(backbone)
            layouts = [(args.n_last_blocks or n, avg if args.avgpool == "auto" else args.avgpool == "true")]
        return linear_fast(backbone, args.train, args.val, lrs=args.lrs, wds=args.wds, layouts=layouts,
                           batch_size=args.batch_size or 256, holdout=args.holdout, **common), source
    n, avg = default_layout(backbone)
    n = args.n_last_blocks or n
    avg = avg if args.avgpool == "auto" else args.avgpool == "true"
    result = linear_full(backbone, args.train, args.val, n_last_blocks=n, avgpool=avg, lr=args.lr,
                         batch_size=args.batch_size or 1024, weight_decay=args.weight_decay,
                         val_every=args.val_every, **common)
    result.pop("head")
    return result, source


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        result, source = _run(args)
    except (DataError, CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"dino-fast-linear: error: {exc}", file=sys.stderr)
        sys.exit(2)
    if result["mode"] == "fast":
        b, sec = result["best"], result["seconds"]
        print(f"linear (fast, {result['heads']} heads on cached features): picked on the {result['select_on']}: "
              f"{b['layout']}, lr {b['lr']:g}, wd {b['wd']:g} → val top-1 {b['val_top1']:.2f}%  "
              f"top-5 {b['val_top5']:.2f}%")
        print(f"(best val top-1 over the grid, as dinov2 reports: {result['best_val_top1_over_grid']:.2f}%; "
              f"features {sec['features']:.1f} s + heads {sec['heads']:.1f} s; {source})")
    else:
        print(f"linear ({result['layout']}, {args.epochs} epochs): best val top-1 {result['top1']:.2f}%  "
              f"top-5 {result['top5']:.2f}% (epoch {result['best_epoch']}); {result['seconds']:.1f} s; {source}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"source": source, **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
