"""Backbone weights from the files users have: ``model.pretrained=`` for training, ``--weights`` for the eval CLIs.

Accepted layouts (all read on the CPU, no download):

- a ``.safetensors`` backbone written by ``dino-fast-export`` (its metadata names the arch and timm kwargs), or any
  timm ``.safetensors`` state dict (e.g. a hub ``model.safetensors``; a classifier ``head.*``/``fc.*`` is dropped);
- a timm checkpoint (``torch.save(model.state_dict())``, or timm's ``train.py`` file with ``state_dict``/``arch``);
- a checkpoint of the reference DINO repository: ``checkpoint.pth`` holding ``teacher``/``student`` state dicts
  with ``module.``/``backbone.`` prefixes (the teacher is used, as the reference's eval scripts do by default), or a
  bare backbone state dict (its released ``dino_vits16_pretrain.pth``, ``dino_resnet50_pretrain.pth`` and
  ``dino_xcit_*_pretrain.pth`` files);
- a dino_fast checkpoint folder or run folder (its ``teacher.pt``).

Three families (:data:`dino_fast.models.FAMILIES`), told apart by their keys:

- ViT: the reference's ViT uses timm's parameter names (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
  ``blocks.N.*``, ``norm``). A position embedding trained for another grid is resampled (bicubic, timm's
  ``resample_abs_pos_embed``).
- ResNet: torchvision's layout (``conv1``, ``bn1``, ``layerN.M.convK``/``bnK``, ``downsample.0/1``), which timm's
  ResNets share key for key; the released ResNet-50 file is that without ``fc``.
- XCiT: timm's layout, or the official one (facebookresearch/xcit, which the reference loads through torch.hub and
  whose ``_pretrain.pth`` files it releases). The official differs in two places, mapped here as timm's
  ``checkpoint_filter_fn`` does: the position encoder is ``pos_embeder.*`` (timm: ``pos_embed.*``), and the class
  attention blocks hold one ``attn.qkv`` (rows [q; k; v]) where timm has ``attn.q``/``attn.k``/``attn.v``.

After the prefixes are stripped (and an official XCiT renamed) every layout is a timm state dict, loaded strictly.
Anything that does not fit is a :class:`CheckpointError` whose one line names the first mismatching key, both
shapes and what to set.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from dino_fast.checkpoint import CheckpointError
from dino_fast.eval.export import read_checkpoint, read_metadata, split_state_dict, timm_kwargs
from dino_fast.models import arch_family, build_backbone

_PREFIXES = ("module.", "_orig_mod.", "backbone.")  # DDP/DeepSpeed, torch.compile, DINO's MultiCropWrapper
_SUBDICTS = ("teacher", "student", "state_dict", "model", "module")  # the first present one holds the weights
_CLASSIFIERS = ("head.", "fc.")  # DINO head or timm classifier; torchvision's ResNet classifier: not backbone
ARCH_BY_DIM = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 768: "vit_base_patch16_224",
               1024: "vit_large_patch16_224"}
# torchvision's ResNets by (bottleneck blocks, blocks per stage); a wider or grouped one needs --arch.
RESNET_BY_BLOCKS = {(False, (2, 2, 2, 2)): "resnet18", (False, (3, 4, 6, 3)): "resnet34",
                    (True, (3, 4, 6, 3)): "resnet50", (True, (3, 4, 23, 3)): "resnet101",
                    (True, (3, 8, 36, 3)): "resnet152"}
XCIT_SIZE_BY_DIM = {128: "nano", 192: "tiny", 384: "small", 512: "medium", 768: "large"}


@dataclass
class Weights:
    """A backbone state dict (timm names) read from a file, and what the file says about its model."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    arch: str | None = None  # named by the file (dino-fast-export metadata, timm's train checkpoint, run config)
    kwargs: dict[str, Any] = field(default_factory=dict)  # timm kwargs named by the file
    source: str = ""  # which part of the file was used, for messages

    def family(self) -> str:
        """"vit", "resnet" or "xcit", from the keys (XCiT's class-attention blocks, a ViT's CLS token and patch
        embedding, a ResNet's stem and first stage)."""
        sd = self.state_dict
        if "cls_token" in sd and any(k.startswith("cls_attn_blocks.") for k in sd):
            return "xcit"
        if "cls_token" in sd and "patch_embed.proj.weight" in sd:
            return "vit"
        if "conv1.weight" in sd and "layer1.0.conv1.weight" in sd:
            return "resnet"
        raise CheckpointError(f"'{self.path}' ({self.source}) is not a ViT backbone with a CLS token, a ResNet or an "
                              f"XCiT: no cls_token / patch_embed.proj.weight (ViT), conv1.weight / "
                              f"layer1.0.conv1.weight (ResNet) among its keys ({', '.join(list(sd)[:4])}, ...)")

    def shape(self) -> dict[str, Any]:
        """The family, the feature width and what the family's layout varies: a ViT's or XCiT's depth and patch
        size (and a ViT's position-embedding grid side, 0 when not square), a ResNet's blocks per stage."""
        sd, family = self.state_dict, self.family()
        if family == "resnet":
            blocks = tuple(1 + max((int(m.group(1)) for k in sd if (m := re.match(rf"layer{i}\.(\d+)\.", k))),
                                   default=-1) for i in (1, 2, 3, 4))
            last = f"layer4.{blocks[3] - 1}."
            bottleneck = f"{last}conv3.weight" in sd
            out = sd.get(f"{last}conv3.weight" if bottleneck else f"{last}conv2.weight")
            return {"family": family, "dim": int(out.shape[0]) if out is not None else 0, "blocks": blocks,
                    "bottleneck": bottleneck}
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
        depth = max(blocks, default=-1) + 1
        if family == "xcit":  # ConvPatchEmbed: four stride-2 convolutions for patch 16, three for 8
            patch = 16 if "patch_embed.proj.6.0.weight" in sd else 8
            return {"family": family, "dim": int(sd["cls_token"].shape[-1]), "depth": depth, "patch": patch}
        grid = 0
        if "pos_embed" in sd:
            side = math.isqrt(sd["pos_embed"].shape[1] - 1)
            grid = side if side * side == sd["pos_embed"].shape[1] - 1 else 0
        return {"family": family, "dim": int(sd["cls_token"].shape[-1]), "depth": depth,
                "patch": int(sd["patch_embed.proj.weight"].shape[-1]), "grid": grid}

    def guess_arch(self) -> str | None:
        """The timm arch the weights fit, from their shape (None when no standard one does)."""
        s = self.shape()
        if s["family"] == "resnet":
            return RESNET_BY_BLOCKS.get((s["bottleneck"], s["blocks"]))
        if s["family"] == "xcit":  # the width names the size; depth and patch are taken from the file
            size = XCIT_SIZE_BY_DIM.get(s["dim"], "?")
            names = [f"xcit_{size}_{d}_p{s['patch']}_224" for d in (s["depth"], 12, 24)]
            return next((a for a in names if timm.is_model(a)), None)
        return ARCH_BY_DIM.get(s["dim"])


def describe(shape: dict[str, Any]) -> str:
    """One phrase for a :meth:`Weights.shape` (or a model's): "width 384, 12 blocks, patch 16", ..."""
    if shape["family"] == "resnet":
        kind = "bottleneck" if shape["bottleneck"] else "basic"
        return f"ResNet of {shape['dim']} features, {kind} blocks {list(shape['blocks'])}"
    xcit = "XCiT of " if shape["family"] == "xcit" else ""
    return f"{xcit}width {shape['dim']}, {shape['depth']} blocks, patch {shape['patch']}"


def _model_shape(backbone: nn.Module, family: str) -> dict[str, Any]:
    if family == "resnet":
        stages = [backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4]
        return {"family": family, "dim": backbone.num_features, "blocks": tuple(len(s) for s in stages),
                "bottleneck": hasattr(stages[3][-1], "conv3")}
    patch = backbone.patch_embed.patch_size
    return {"family": family, "dim": backbone.embed_dim, "depth": len(backbone.blocks),
            "patch": patch if isinstance(patch, int) else patch[0]}


def _strip(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        while k.startswith(_PREFIXES):
            k = k.split(".", 1)[1]
        if not k.startswith(_CLASSIFIERS) and isinstance(v, torch.Tensor):  # a classifier is not backbone
            out[k] = v
    return out


def _official_xcit_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official XCiT layout → timm's (module docstring); a timm-layout state dict comes back unchanged."""
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"(cls_attn_blocks\.\d+\.attn\.)qkv\.(weight|bias)", k)
        if m:  # [3·C, ...] rows q, k, v → three [C, ...] tensors
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                out[f"{m.group(1)}{name}.{m.group(2)}"] = part.contiguous()
        elif k.startswith("pos_embeder."):
            out["pos_embed." + k[len("pos_embeder."):]] = v
        else:
            out[k] = v
    return out


def _torch_load(p: Path) -> Any:
    # weights_only: tensors and plain containers only. The reference's and timm's checkpoints also pickle their
    # argparse.Namespace of arguments, which is allowed by name; nothing else from the file is executed.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign or truncated files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read '{p}' as a torch checkpoint ({first[:200]}); give a state dict saved "
                              f"with torch.save, a .safetensors file or a dino_fast checkpoint folder") from None


def read_weights(path: str | Path) -> Weights:
    """Read any accepted layout (module docstring) into a backbone state dict with timm ViT names."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"weights file '{p}' does not exist")
    if p.is_dir():  # a dino_fast checkpoint or run folder
        ckpt = read_checkpoint(p, "teacher")
        backbone, _ = split_state_dict(ckpt.state_dict)
        return Weights(p, _strip(backbone), ckpt.config.model.arch, timm_kwargs(ckpt.config),
                       f"dino_fast teacher {ckpt.path.parent.name}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd, meta = load_file(str(p)), read_metadata(p)
        except Exception as exc:  # safetensors raises its own error types for other files
            raise CheckpointError(f"'{p}' is not a readable safetensors file ({exc})") from None
        kwargs = json.loads(meta["timm_kwargs"]) if "timm_kwargs" in meta else {}
        return Weights(p, _strip(sd), meta.get("arch"), kwargs, "safetensors")
    obj = _torch_load(p)
    if not isinstance(obj, dict):
        raise CheckpointError(f"'{p}' holds a {type(obj).__name__}, not a state dict")
    arch = obj.get("arch") if isinstance(obj.get("arch"), str) else None  # timm's train.py checkpoints name it
    source = "state dict"
    for key in _SUBDICTS:
        if isinstance(obj.get(key), dict):
            obj, source = obj[key], f"'{key}'"
            break
    sd = _strip(obj)
    if not sd:
        raise CheckpointError(f"'{p}' holds no tensors under {', '.join(_SUBDICTS)} or at its top level")
    if any(k.startswith("pos_embeder.") or re.fullmatch(r"cls_attn_blocks\.\d+\.attn\.qkv\.weight", k) for k in sd):
        sd, source = _official_xcit_to_timm(sd), f"{source}, official XCiT layout"
    return Weights(p, sd, arch, {}, source)


def _first_mismatch(model_sd: dict[str, torch.Tensor], file_sd: dict[str, torch.Tensor]) -> str:
    for k, v in model_sd.items():
        if k not in file_sd:
            return f"the file has no '{k}'"
        if tuple(file_sd[k].shape) != tuple(v.shape):
            return f"'{k}' is {list(file_sd[k].shape)} in the file, {list(v.shape)} in the model"
    extra = [k for k in file_sd if k not in model_sd]
    return f"the file has keys the model lacks ('{extra[0]}'{f' and {len(extra) - 1} more' if len(extra) > 1 else ''})"


def load_into(backbone: nn.Module, weights: Weights, hint: str) -> None:
    """Load ``weights`` strictly into a timm ``backbone`` of their family, resampling a ViT's ``pos_embed`` to the
    model's grid.

    Raises:
        CheckpointError: one line naming the first mismatching key, both shapes, both models' shapes and ``hint``.
    """
    from timm.layers import resample_abs_pos_embed

    from dino_fast.models import backbone_family

    sd = dict(weights.state_dict)
    model_sd = backbone.state_dict()
    got = weights.shape()
    pe, want = sd.get("pos_embed"), model_sd.get("pos_embed")
    prefix = getattr(backbone, "num_prefix_tokens", 1)
    if (got["family"] == "vit" and isinstance(pe, torch.Tensor) and isinstance(want, torch.Tensor)
            and pe.shape != want.shape and pe.shape[-1] == want.shape[-1]):
        grid = got["grid"]
        new = backbone.patch_embed.grid_size
        if grid and prefix == 1 and math.prod(new) + 1 == want.shape[1]:
            sd["pos_embed"] = resample_abs_pos_embed(pe.float(), list(new), [grid, grid], num_prefix_tokens=1)
    if set(sd) != set(model_sd) or any(sd[k].shape != v.shape for k, v in model_sd.items()):
        mismatch = _first_mismatch(model_sd, sd)
        family = backbone_family(backbone)
        have = describe(_model_shape(backbone, family)) if family != "other" else type(backbone).__name__
        raise CheckpointError(
            f"'{weights.path}' ({weights.source}) does not fit the model: {mismatch} (file: {describe(got)}; "
            f"model: {have}); {hint}")
    backbone.load_state_dict({k: v.to(model_sd[k].dtype) for k, v in sd.items()}, strict=True)


def _train_hint(w: Weights) -> str:
    s = w.shape()
    arch = w.arch or w.guess_arch()
    if s["family"] == "resnet":
        return f"set model.arch={arch or 'the torchvision ResNet of these weights'} to match it"
    arch = arch or f"a timm {'XCiT' if s['family'] == 'xcit' else 'ViT'} of width {s['dim']}"
    return f"set model.arch={arch} model.patch_size={s['patch']} model.depth={s['depth']} to match it"


def init_from_pretrained(cfg, student: nn.Module) -> None:
    """``model.pretrained=FILE``: load the file's backbone into the student (the trainer copies it to the teacher).

    Called before DeepSpeed wraps the student, so its optimizer's master weights start from these values. The DINO
    head stays freshly initialised. A resumed run takes its weights from the checkpoint instead.

    Raises:
        ConfigError: the file is unreadable or does not fit the configured model (one line, says what to set).
    """
    if not cfg.model.pretrained:
        return
    from dino_fast.config import ConfigError

    try:
        weights = read_weights(cfg.model.pretrained)
        load_into(student.backbone, weights, _train_hint(weights))
    except CheckpointError as exc:  # a config value that does not fit: the trainer's exit code 2, key named
        raise ConfigError(f"model.pretrained: {exc}") from None
    from dino_fast.dist import rank

    if rank() == 0 and cfg.logging.progress != "none":
        print(f"dino_fast: backbone initialised from {weights.path} ({weights.source}, {describe(weights.shape())}); "
              f"DINO head freshly initialised", flush=True)


def backbone_from_weights(path: str | Path, arch: str | None = None) -> tuple[nn.Module, str]:
    """Build a timm backbone that fits a weights file and load it (the eval CLIs' ``--weights``); (eval-mode model,
    arch).

    The file decides its family, a ViT's or XCiT's patch size and depth and a ViT's position-embedding grid;
    ``arch`` (else the one the file names, else the standard arch of the file's shape) decides the rest (heads, MLP
    ratio, a ResNet's width).
    """

    w = read_weights(path)
    s = w.shape()
    arch = arch or w.arch or w.guess_arch()
    if arch is None:
        example = {"resnet": "resnet50", "xcit": "xcit_small_12_p16_224"}.get(s["family"], "vit_small_patch16_224")
        raise CheckpointError(f"'{w.path}' ({describe(s)}) is no standard {s['family']} shape; pass --arch (e.g. "
                              f"{example})")
    try:
        same = arch_family(arch) == s["family"] != "resnet"  # patch and depth from the file (its family's keys)
        img = int(w.kwargs.get("img_size") or (s.get("grid", 0) * s.get("patch", 0)) or 224)
        backbone = build_backbone(arch, img, 0.0, s["patch"] if same else 0, s["depth"] if same else 0)
    except ValueError as exc:
        raise CheckpointError(f"--arch: {exc}") from None
    width = {"vit": f"a ViT of width {s['dim']} (e.g. {ARCH_BY_DIM.get(s['dim'], '?')})",
             "xcit": f"an XCiT of width {s['dim']}", "resnet": f"a ResNet of {s['dim']} features"}[s["family"]]
    load_into(backbone, w, f"pass --arch with {width}")
    return backbone.eval(), arch


def load_backbone_from_checkpoint(ckpt_dir: str | Path, which: str = "teacher") -> nn.Module:
    """The ``teacher`` (or ``student``) backbone of a dino_fast checkpoint (a checkpoint folder, a run folder →
    its latest checkpoint), built from the run config saved with it; returned on the CPU in eval mode."""
    ckpt = read_checkpoint(ckpt_dir, which)
    backbone_sd, _ = split_state_dict(ckpt.state_dict)
    m = ckpt.config.model
    backbone = build_backbone(m.arch, ckpt.config.data.global_crop_size, 0.0, m.patch_size, m.depth)
    try:
        backbone.load_state_dict(backbone_sd, strict=True)
    except RuntimeError as exc:  # missing/unexpected keys or shape mismatches
        raise CheckpointError(f"{which} weights in '{ckpt.path}' do not match model.arch={m.arch} from its config: "
                              f"{str(exc).splitlines()[0]} ...") from None
    return backbone.eval()


def add_source_args(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint`` (a dino_fast checkpoint or run folder) or ``--weights`` (any accepted file), ``--arch``,
    ``--which``, and the ``--device`` the evaluation CLIs run on."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint folder (teacher.pt + config.yaml) or a run folder (its latest)")
    src.add_argument("--weights", help="backbone file: .safetensors from dino-fast-export or timm, a timm or "
                                       "reference-DINO .pth, or a bare backbone state dict")
    parser.add_argument("--arch", help="timm arch for --weights (default: named by the file, else by its width)")
    parser.add_argument("--which", choices=("teacher", "student"), default="teacher", help="with --checkpoint")
    parser.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")


def load_source(args: argparse.Namespace) -> tuple[nn.Module, str]:
    """The backbone named by :func:`add_source_args`' arguments, on the CPU in eval mode, and a description."""
    if args.checkpoint:
        return load_backbone_from_checkpoint(args.checkpoint, args.which), args.checkpoint
    backbone, arch = backbone_from_weights(args.weights, args.arch)
    return backbone, f"{args.weights} ({arch})"
