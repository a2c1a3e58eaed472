"""Export a trained backbone for timm, Hugging Face ``transformers`` or ONNX, and read dino_fast checkpoints.

``dino-fast-export --checkpoint RUN --out OUT [--format timm|transformers|onnx] [--which student] [--head]``:

- ``timm`` (default): a ``.safetensors`` file with the timm backbone's state dict (a ``VisionTransformer``'s
  ``cls_token``, ``pos_embed``, ``patch_embed.*``, ``blocks.*``, ``norm.*``; a ResNet's or an XCiT's own keys; no
  classifier) and, in its metadata, the arch and the timm kwargs the model was built with (for a ViT ``img_size`` =
  the global crop size, so ``pos_embed`` keeps its trained grid, ``dynamic_img_size``, and any
  ``patch_size``/``depth`` override; ``dino_fast.models.timm_arch_kwargs``). ``--head`` also writes the DINO head.
  Loads strictly (no missing or unexpected keys) with::

    timm.create_model(arch, pretrained=True, num_classes=0, **timm_kwargs,
                      pretrained_cfg_overlay=dict(file=PATH, custom_load=False, num_classes=0, ...))

  (timm reads a ``file`` overlay with safetensors when the name ends in ``.safetensors``). The ``...`` also sets
  DINO's eval preprocessing (ImageNet mean/std, bicubic, crop_pct 0.875) so that
  ``timm.data.resolve_data_config(model=m)`` gives the k-NN transform. The CLI prints the exact call.
- ``transformers``: a new folder with ``config.json`` + ``model.safetensors`` (:mod:`dino_fast.eval.hf_export`);
  ``ViTModel.from_pretrained(DIR, add_pooling_layer=False)``, feature = ``last_hidden_state[:, 0]``. ViTs only (a
  ResNet or an XCiT is refused in one line: use the timm or ONNX format).
- ``onnx``: one ``.onnx`` file (:mod:`dino_fast.eval.onnx_export`), ``pixel_values`` [batch, 3, S, S] →
  ``features`` [batch, D], S = the global crop size; ``onnxruntime.InferenceSession(FILE)``.

The last two need the ``export`` extra (``pip install -e ".[export]"``); they are imported only when asked for, and
each export is reloaded with its library and compared with the backbone before the command reports success.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dino_fast import __version__
from dino_fast.checkpoint import CheckpointError
from dino_fast.config import Config, ConfigError, from_dict
from dino_fast.eval import hf_export, onnx_export
from dino_fast.models import arch_family, timm_arch_kwargs
from pipelines.spec import IMAGENET_MEAN, IMAGENET_STD

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DeepSpeed/DDP and torch.compile wrappers
EVAL_CROP_PCT = 224 / 256  # DINO's k-NN/linear eval: resize 256 → center crop 224
FORMATS = ("timm", "transformers", "onnx")
# What each format imports beyond the base install (the ``export`` extra).
FORMAT_PACKAGES = {"timm": (), "transformers": ("transformers",), "onnx": ("onnx", "onnxscript", "onnxruntime")}


@dataclass
class Checkpoint:
    path: Path  # the weights file that was read
    state_dict: dict[str, torch.Tensor]  # MultiCropWrapper keys: backbone.*, head.*
    config: Config  # the run config saved with it


def _find_config(folder: Path) -> Path:
    # Checkpoints hold their own config.yaml; the run folder two levels up holds one too (<run>/checkpoints/<tag>).
    for d in (folder, folder.parent, folder.parent.parent):
        if (d / "config.yaml").is_file():
            return d / "config.yaml"
    raise CheckpointError(f"no config.yaml in '{folder}' or the run folder above it: the model arch is unknown "
                          f"(export from a dino_fast checkpoint folder, or use --weights FILE --arch ARCH)")


def _checkpoint_folder(path: Path, which: str) -> Path:
    """A checkpoint folder → itself; a run folder or its ``checkpoints/`` → the latest checkpoint."""
    if _weights_file(path, which) is not None:
        return path
    for root in (path / "checkpoints", path):
        marker = root / "latest"
        if marker.is_file() and (root / marker.read_text().strip()).is_dir():
            return root / marker.read_text().strip()
    raise CheckpointError(f"'{path}' is not a dino_fast checkpoint: expected teacher.pt (a checkpoint folder) or "
                          f"checkpoints/latest (a run folder)")


def _weights_file(folder: Path, which: str) -> Path | None:
    if which == "teacher":
        f = folder / "teacher.pt"
        return f if f.is_file() else None
    # The student lives in DeepSpeed's model-states file (named with a ZeRO prefix under ZeRO-3).
    found = sorted(folder.glob("*mp_rank_00_model_states.pt"))
    return found[0] if found else None


def read_checkpoint(path: str | Path, which: str = "teacher") -> Checkpoint:
    """Read the ``teacher`` or ``student`` MultiCropWrapper state dict and the run config of a checkpoint.

    ``path`` may be a checkpoint folder (``teacher.pt`` + ``config.yaml``), a run folder (its
    ``checkpoints/latest`` is used) or a ``.pt`` state-dict file next to a ``config.yaml``.
    """
    if which not in ("teacher", "student"):
        raise CheckpointError(f"which='{which}' must be teacher or student")
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint path '{p}' does not exist")
    if p.is_file():
        folder, weights = p.parent, p
    else:
        folder = _checkpoint_folder(p, which)
        weights = _weights_file(folder, which)
        if weights is None:
            raise CheckpointError(f"checkpoint '{folder}' has no {which} weights "
                                  f"({'teacher.pt' if which == 'teacher' else 'mp_rank_00_model_states.pt'})")
    try:
        cfg = from_dict(yaml.safe_load(_find_config(folder).read_text()) or {})
    except (ConfigError, yaml.YAMLError) as exc:
        raise CheckpointError(f"cannot read the run config of '{folder}': {exc}") from None
    try:
        # DeepSpeed's model-states file pickles non-tensor objects; it is the user's own checkpoint, and DeepSpeed
        # itself reads it the same way. Our teacher.pt is plain tensors.
        obj = torch.load(weights, map_location="cpu", weights_only=weights.name == "teacher.pt")
    except Exception as exc:  # torch raises several types for truncated / foreign files
        raise CheckpointError(f"cannot read '{weights}' ({type(exc).__name__}: {exc})") from None
    for key in ("module", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    return Checkpoint(weights, _strip_wrappers(obj), cfg)


def _strip_wrappers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        while k.startswith(_WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def split_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """MultiCropWrapper state dict → (backbone state dict, head state dict); a bare backbone → (it, {})."""
    sd = _strip_wrappers(sd)
    if not any(k.startswith("backbone.") for k in sd):
        return sd, {}
    backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    head = {k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")}
    return backbone, head


def timm_kwargs(cfg: Config) -> dict[str, Any]:
    """The ``timm.create_model`` kwargs that rebuild the run's backbone (those of ``models.build_backbone``)."""
    m = cfg.model
    try:
        return timm_arch_kwargs(arch_family(m.arch), cfg.data.global_crop_size, m.patch_size, m.depth)
    except ValueError as exc:  # a config no training run could have written
        raise CheckpointError(f"the run config names a model the trainer cannot build: {exc}") from None


def pretrained_overlay(path: str | Path, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``pretrained_cfg_overlay`` for timm: the weights file, no classifier, and DINO's eval preprocessing.

    ``custom_load=False`` matters: some timm versions (1.0.29 for ``vit_tiny_patch16_224``) mark the arch's
    default weights as a JAX ``.npz`` needing ``model.load_pretrained``, which then rejects a safetensors file.
    """
    size = int(model_kwargs.get("img_size", 224))
    return {"file": str(path), "custom_load": False, "num_classes": 0, "input_size": (3, size, size),
            "crop_pct": EVAL_CROP_PCT, "interpolation": "bicubic", "mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def timm_create_call(arch: str, path: str | Path, model_kwargs: dict[str, Any]) -> str:
    """The ``timm.create_model(...)`` line that loads an exported file, as text to print for the user."""
    kwargs = ", ".join(f"{k}={v!r}" for k, v in model_kwargs.items())
    overlay = ", ".join(f"{k}={v!r}" for k, v in pretrained_overlay(Path(path).resolve(), model_kwargs).items())
    return (f"timm.create_model({arch!r}, pretrained=True, num_classes=0, {kwargs}, "
            f"pretrained_cfg_overlay=dict({overlay}))")


def _check_suffix(path: Path) -> None:
    if path.suffix != ".safetensors":
        raise CheckpointError(f"output '{path}' must end in .safetensors (timm picks the loader by the suffix)")


def build_reference(backbone_sd: dict[str, torch.Tensor], arch: str, model_kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model(arch, num_classes=0, **model_kwargs)`` (fp32, eval mode) with the weights loaded strictly,
    so that a wrong arch or kwargs is an error here rather than in the user's loading call."""
    reference = timm.create_model(arch, pretrained=False, num_classes=0, **model_kwargs)
    try:
        reference.load_state_dict(backbone_sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the weights do not fit timm '{arch}' with {model_kwargs}: "
                              f"{str(exc).splitlines()[0]} ...") from None
    return reference.float().eval()


def export_backbone(state_dict_or_module: dict[str, torch.Tensor] | nn.Module, arch: str, path: str | Path, *,
                    model_kwargs: dict[str, Any], metadata: dict[str, str] | None = None) -> str:
    """Write a backbone (a module, a backbone state dict, or a MultiCropWrapper state dict) as timm safetensors.

    The weights are first loaded strictly into ``timm.create_model(arch, num_classes=0, **model_kwargs)``, so a
    wrong arch or kwargs is an error here rather than in the user's ``create_model`` call.

    Returns:
        the ``timm.create_model(...)`` call that loads the file.
    """
    path = Path(path)
    _check_suffix(path)
    sd = state_dict_or_module.state_dict() if isinstance(state_dict_or_module, nn.Module) else state_dict_or_module
    sd, _ = split_state_dict(sd)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    build_reference(sd, arch, model_kwargs)
    meta = {"format": "pt", "arch": arch, "timm_kwargs": json.dumps(model_kwargs), "producer": f"dino_fast "
            f"{__version__}", **(metadata or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=meta)
    return timm_create_call(arch, path, model_kwargs)


def export_head(head_state_dict: dict[str, torch.Tensor], path: str | Path, cfg: Config, in_dim: int) -> None:
    """Write the DINO head (loadable into ``dino_fast.models.DINOHead`` built from the metadata's arguments)."""
    path = Path(path)
    _check_suffix(path)
    m = cfg.model
    args = {"in_dim": in_dim, "out_dim": m.out_dim, "norm_last_layer": m.norm_last_layer, "nlayers": m.head_nlayers,
            "hidden_dim": m.head_hidden_dim, "bottleneck_dim": m.head_bottleneck_dim}
    if m.use_bn_in_head:
        args["use_bn"] = True
    sd = {k: v.detach().to("cpu").contiguous() for k, v in head_state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"format": "pt", "dino_head_kwargs": json.dumps(args),
                                       "producer": f"dino_fast {__version__}"})


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (empty if it has none)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_exported(path: str | Path, arch: str | None = None) -> tuple[nn.Module, str, dict[str, Any]]:
    """Load an exported backbone through timm exactly as a user would; returns (model in eval mode, arch, kwargs).

    The arch and kwargs come from the file's metadata; ``arch`` overrides it (and is required for files written
    by other tools, which are then built with ``dynamic_img_size=True``).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"weights file '{p}' does not exist")
    _check_suffix(p)
    try:
        meta = read_metadata(p)
    except Exception as exc:  # safetensors raises its own error types for non-safetensors files
        raise CheckpointError(f"'{p}' is not a readable safetensors file ({exc})") from None
    kwargs = json.loads(meta["timm_kwargs"]) if "timm_kwargs" in meta else {"dynamic_img_size": True}
    arch = arch or meta.get("arch")
    if not arch:
        raise CheckpointError(f"'{p}' does not name its model; pass --arch (e.g. vit_small_patch16_224)")
    try:
        model = timm.create_model(arch, pretrained=True, num_classes=0, **kwargs,
                                  pretrained_cfg_overlay=pretrained_overlay(p.resolve(), kwargs))
    except RuntimeError as exc:  # unknown arch, or strict loading found missing/unexpected keys
        raise CheckpointError(f"cannot load '{p}' as timm '{arch}' {kwargs}: {str(exc).splitlines()[0]}") from None
    return model.eval(), arch, kwargs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dino-fast-export",
                                description="Export a dino_fast backbone for timm, transformers or ONNX.")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, run folder (its latest), or teacher.pt")
    p.add_argument("--which", choices=("teacher", "student"), default="teacher")
    p.add_argument("--out", required=True,
                   help="timm: a .safetensors file; transformers: a new folder; onnx: a .onnx file")
    # Checked in main rather than with argparse choices: a bad value is then one 'error:' line, exit 2.
    p.add_argument("--format", default="timm", metavar="{" + ",".join(FORMATS) + "}", help="default: timm")
    p.add_argument("--head", nargs="?", const="", default=None,
                   help="also export the DINO head (to this file; default <out>_head.safetensors); timm format only")
    return p.parse_args(argv)


def check_request(fmt: str, out: Path, head: str | None) -> None:
    """Refuse a bad format, flag or output path, or a missing package, before any checkpoint is read."""
    if fmt not in FORMATS:
        raise ValueError(f"--format '{fmt}' is not one of {', '.join(FORMATS)}")
    if head is not None and fmt != "timm":
        raise ValueError(f"--head writes the DINO head beside a timm export; drop it or use --format timm, "
                         f"not {fmt}")
    {"timm": _check_suffix, "transformers": hf_export.check_folder, "onnx": onnx_export.check_path}[fmt](out)
    for name in FORMAT_PACKAGES[fmt]:
        try:
            importlib.import_module(name)
        except ImportError:
            raise ValueError(f"--format {fmt} needs the '{name}' package: pip install -e \".[export]\"") from None


def _export_timm(ckpt: Checkpoint, out: Path, head: str | None, which: str) -> list[str]:
    backbone_sd, head_sd = split_state_dict(ckpt.state_dict)
    call = export_backbone(backbone_sd, ckpt.config.model.arch, out, model_kwargs=timm_kwargs(ckpt.config),
                           metadata={"source": str(ckpt.path), "which": which})
    lines = []
    if head is not None:
        if not head_sd:
            raise CheckpointError(f"'{ckpt.path}' holds no head.* weights to export")
        head_path = Path(head) if head else out.with_name(out.stem + "_head.safetensors")
        first = head_sd.get("mlp.0.weight", head_sd.get("mlp.weight"))  # the head's first Linear: [hidden, in_dim]
        export_head(head_sd, head_path, ckpt.config, int(first.shape[1]))
        lines.append(f"exported DINO head → {head_path} (DINOHead kwargs in its metadata 'dino_head_kwargs')")
    return [*lines, "load it with:\n  import timm\n  model = " + call]


def _export_converted(fmt: str, ckpt: Checkpoint, out: Path, which: str) -> list[str]:
    """transformers or ONNX: rebuild the timm backbone, convert it, and reload the result to compare."""
    arch, kwargs, size = ckpt.config.model.arch, timm_kwargs(ckpt.config), ckpt.config.data.global_crop_size
    model = build_reference(split_state_dict(ckpt.state_dict)[0], arch, kwargs)
    meta = {"source": str(ckpt.path), "which": which, "arch": arch, "timm_kwargs": json.dumps(kwargs),
            "producer": f"dino_fast {__version__}"}
    if fmt == "transformers":
        err = hf_export.export_transformers(model, out, meta)
        load = (f"  from transformers import ViTModel\n  model = ViTModel.from_pretrained({str(out.resolve())!r}, "
                f"add_pooling_layer=False)\n  features = model(pixel_values=x).last_hidden_state[:, 0]")
    else:
        err = onnx_export.export_onnx(model, out, size, meta)
        load = (f"  import onnxruntime\n  session = onnxruntime.InferenceSession({str(out.resolve())!r})\n"
                f"  features = session.run(['features'], {{'pixel_values': x}})[0]")
    return [f"reloaded with {fmt}: max relative difference to the backbone {err:.1e} at {size} px",
            f"load it with (x: float32 [batch, 3, {size}, {size}], ImageNet mean/std normalised):\n{load}"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    try:
        check_request(args.format, out, args.head)
        ckpt = read_checkpoint(args.checkpoint, args.which)
        if args.format == "timm":
            lines = _export_timm(ckpt, out, args.head, args.which)
        else:
            lines = _export_converted(args.format, ckpt, out, args.which)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"dino-fast-export: error: {exc}", file=sys.stderr)
        sys.exit(2)
    n_params = sum(v.numel() for v in split_state_dict(ckpt.state_dict)[0].values())
    print(f"exported {args.which} backbone of {ckpt.path} ({ckpt.config.model.arch}, {n_params / 1e6:.2f} M params) "
          f"→ {args.out} ({args.format})")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
