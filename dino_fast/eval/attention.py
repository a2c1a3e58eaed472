"""DINO's attention maps: the last block's CLS self-attention per head, and the masks that keep 60% of its mass.

For an image of h × w patches, head j's map is softmax(q_cls · Kᵀ · d^-½) over the h·w patch tokens (the CLS
token's own entry dropped), as the reference's ``visualize_attention.py`` shows it. The mask keeps the patches
with the largest attention until their sum reaches ``mass`` (0.6) of the head's attention on patches; the figure
overlays both on the image: per image one row of heat maps (each head scaled to its own maximum) and one row of
masks (the rest of the image darkened).

CLI: ``dino-fast-attention --checkpoint RUN --images IMG_OR_DIR --out attention.png`` (or ``--weights FILE``).
During training ``eval.attention_every_epochs=N`` writes ``<output_dir>/attention/step_XXXXXXXX.png`` for
``eval.attention_images`` fixed held-out images.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from dino_fast.checkpoint import CheckpointError
from dino_fast.eval.weights import add_source_args, load_source
from pipelines.folder import DataError, list_images
from pipelines.spec import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD

# A perceptually ordered dark → bright map (anchors of matplotlib's "inferno"), interpolated linearly.
_CMAP = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float64)


def check_vit(backbone: nn.Module) -> None:
    """Raise ValueError (one line) unless ``backbone`` is a plain ViT: the maps are its CLS attention over patches."""
    from dino_fast.models import backbone_family

    family = backbone_family(backbone)
    if family != "vit":
        raise ValueError(f"attention maps need a ViT's CLS attention over its patch tokens; this backbone is "
                         f"{'a ResNet' if family == 'resnet' else 'an XCiT' if family == 'xcit' else 'not a ViT'} "
                         f"({type(backbone).__name__})")


@torch.no_grad()
def last_block_attention(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the last block of a timm ViT, all tokens: [B, 3, H, W] → [B, heads, T, T] (float32).

    The last block's input is captured from an eager ``forward_features`` (so a ``torch.compile``-d backbone's
    hooks still run); q and k are recomputed from its ``norm1``/``qkv`` (timm's fused attention never forms the
    matrix).
    """
    captured: dict[str, torch.Tensor] = {}
    block = backbone.blocks[-1]
    handle = block.register_forward_pre_hook(lambda _m, args: captured.setdefault("x", args[0]))
    try:
        backbone.forward_features(x)
    finally:
        handle.remove()
    attn = block.attn
    t = block.norm1(captured["x"])
    b, n, _ = t.shape
    qkv = attn.qkv(t).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)


def cls_attention(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The CLS token's attention on the patches, per head: [B, 3, H, W] → [B, heads, H/p, W/p]."""
    p = backbone.patch_embed.patch_size
    a = last_block_attention(backbone, x)[:, :, 0, backbone.num_prefix_tokens:]
    return a.reshape(*a.shape[:2], x.shape[-2] // p[0], x.shape[-1] // p[1])


def mass_mask(attn: torch.Tensor, mass: float = 0.6) -> torch.Tensor:
    """Keep the largest entries (last dims flattened per leading index) until they hold ``mass`` of the total.

    The reference's rule: an entry is kept when the attention of the entries larger than it sums to less than
    ``mass`` of the total, so the kept set is the smallest top set reaching ``mass``.
    """
    flat = attn.flatten(-2) if attn.dim() > 1 else attn
    val, idx = flat.sort(dim=-1, descending=True)
    val = val / val.sum(dim=-1, keepdim=True)
    keep_sorted = (val.cumsum(dim=-1) - val) < mass
    keep = torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)
    return keep.reshape(attn.shape)


def load_image(path: str | Path, size: int, patch: int) -> tuple[torch.Tensor, np.ndarray]:
    """Shorter side resized to ``size`` (bicubic), centre-cropped to multiples of ``patch``: (normalised [3, H, W],
    the same pixels as uint8 [H, W, 3])."""
    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except Exception as exc:  # PIL raises many types for unreadable files
        raise DataError(f"cannot read image '{path}' ({type(exc).__name__}): remove or replace it") from None
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(patch, round(w * s)), max(patch, round(h * s))), Image.BICUBIC)
    w, h = img.size
    cw, ch = w - w % patch, h - h % patch
    left, top = (w - cw) // 2, (h - ch) // 2
    pixels = np.array(img.crop((left, top, left + cw, top + ch)), dtype=np.uint8)
    x = (torch.from_numpy(pixels).float().permute(2, 0, 1) / 255.0 - torch.tensor(IMAGENET_MEAN)[:, None, None]) / (
        torch.tensor(IMAGENET_STD)[:, None, None])
    return x, pixels


def _colour(v: np.ndarray) -> np.ndarray:
    pos = np.clip(v, 0, 1) * (len(_CMAP) - 1)
    lo = np.minimum(pos.astype(int), len(_CMAP) - 2)
    frac = (pos - lo)[..., None]
    return _CMAP[lo] * (1 - frac) + _CMAP[lo + 1] * frac


def render(pixels: np.ndarray, attn: np.ndarray, mask: np.ndarray, scale: int) -> np.ndarray:
    """Two rows for one image: [image, heat map per head] over [image, mask per head]; uint8 [2·H·s, (1+heads)·W·s, 3].

    Shapes: pixels [H, W, 3] uint8, attn and mask [heads, H/p, W/p].
    """
    img = np.asarray(Image.fromarray(pixels).resize((pixels.shape[1] * scale, pixels.shape[0] * scale),
                                                    Image.BICUBIC), dtype=np.float64)
    h, w = img.shape[:2]

    def up(m: np.ndarray) -> np.ndarray:  # patch grid → pixels, nearest (one block per patch)
        return np.repeat(np.repeat(m, h // m.shape[0], axis=0), w // m.shape[1], axis=1)

    heats, masks = [img], [img]
    for a, k in zip(attn, mask):
        heats.append(0.45 * img + 0.55 * _colour(up(a / max(float(a.max()), 1e-12))))
        masks.append(np.where(up(k)[..., None], img, 0.25 * img))
    grid = np.concatenate([np.concatenate(heats, axis=1), np.concatenate(masks, axis=1)], axis=0)
    out = Image.fromarray(np.clip(grid, 0, 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for j in range(len(attn)):
        draw.text(((j + 1) * w + 3, 2), f"head {j + 1}", fill=(255, 255, 255))
        draw.text(((j + 1) * w + 3, h + 2), f"{mask[j].mean():.0%} of patches", fill=(255, 255, 255))
    return np.asarray(out)


def attention_figure(backbone: nn.Module, files: list[str], *, size: int, mass: float = 0.6,
                     device: torch.device | str = "cpu", min_side: int = 128) -> np.ndarray:
    """The figure for several images (two rows each, stacked; narrower rows padded black) as uint8 [H, W, 3].

    Images are upscaled by a whole factor to at least ``min_side`` px so that a 64 px image stays readable.
    """
    check_vit(backbone)
    was_training = backbone.training
    backbone.eval()
    patch = backbone.patch_embed.patch_size[0]
    dtype = next(backbone.parameters()).dtype
    rows = []
    try:
        for f in files:
            x, pixels = load_image(f, size, patch)
            a = cls_attention(backbone, x[None].to(device, dtype))[0].cpu()
            scale = max(1, math.ceil(min_side / min(pixels.shape[:2])))
            rows.append(render(pixels, a.numpy(), mass_mask(a, mass).numpy(), scale))
    finally:
        backbone.train(was_training)
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)


def evenly_spaced(files: list[str], n: int) -> list[str]:
    """``n`` files spread over the (class-sorted) list: the same images every time, several classes."""
    if len(files) <= n:
        return list(files)
    return [files[round(i * (len(files) - 1) / max(n - 1, 1))] for i in range(n)]


def periodic_attention(cfg, teacher: nn.Module, out_dir: Path, step: int, device: torch.device,
                       metrics=None) -> Path:
    """``eval.attention_every_epochs``: the teacher's maps of ``eval.attention_images`` fixed held-out images (the
    train split without one) → ``<out_dir>/attention/step_XXXXXXXX.png``, and to TensorBoard when it is on."""
    from pipelines.build import resolve_data_path

    try:
        folder = resolve_data_path(cfg.data, "val")
    except DataError:
        folder = resolve_data_path(cfg.data, "train")
    files = evenly_spaced(list_images(folder).files, cfg.eval.attention_images)
    figure = attention_figure(teacher.backbone, files, size=cfg.data.global_crop_size, device=device)
    path = Path(out_dir) / "attention" / f"step_{step:08d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(figure).save(path, optimize=True)
    if hasattr(metrics, "add_image"):
        metrics.add_image("attention", figure, step)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dino-fast-attention", description=__doc__.split("\n\n")[0])
    add_source_args(p)
    p.add_argument("--images", required=True, help="an image, or a folder (flat or class sub-folders)")
    p.add_argument("--out", default="attention.png", help="output PNG")
    p.add_argument("--size", type=int, default=224, help="shorter side the image is resized to (bicubic)")
    p.add_argument("--max-images", type=int, default=8, help="from a folder: this many, evenly spaced")
    p.add_argument("--mass", type=float, default=0.6, help="share of the attention the masks keep")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if not 0 < args.mass <= 1 or args.size < 1 or args.max_images < 1:
            raise ValueError("--mass must be in (0, 1], --size and --max-images ≥ 1")
        src = Path(args.images)
        if not src.exists():
            raise DataError(f"--images path '{src}' does not exist")
        if src.is_file() and src.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(f"--images '{src}' is not an image ({', '.join(IMAGE_EXTENSIONS)})")
        files = [str(src)] if src.is_file() else evenly_spaced(list_images(src).files, args.max_images)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        backbone, source = load_source(args)
        figure = attention_figure(backbone.to(device), files, size=args.size, mass=args.mass, device=device)
    except (DataError, CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"dino-fast-attention: error: {exc}", file=sys.stderr)
        sys.exit(2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(figure).save(out, optimize=True)
    print(f"wrote {out} ({figure.shape[1]}×{figure.shape[0]} px: {len(files)} image(s), "
          f"{backbone.blocks[-1].attn.num_heads} heads; {source})")


if __name__ == "__main__":
    main()
