"""Convert a timm ViT backbone into a Hugging Face ``transformers`` ``ViTModel`` folder.

The folder holds ``config.json`` (a ``ViTConfig``) and ``model.safetensors`` in the hub's ViT key layout
(``embeddings.*``, ``encoder.layer.{i}.*``, ``layernorm.*``: what ``google/vit-*`` checkpoints use, so transformers
4.x loads it as is and 5.x through its built-in renaming). Load it with::

    ViTModel.from_pretrained(DIR, add_pooling_layer=False)  # last_hidden_state[:, 0] == our CLS feature

The two networks compute the same function once the weights are mapped, block by block (pre-norm ViT)::

    timm                                  transformers (hub layout)
    patch_embed.proj                      embeddings.patch_embeddings.projection
    cls_token, pos_embed                  embeddings.cls_token, embeddings.position_embeddings
    blocks.i.norm1 / norm2                encoder.layer.i.layernorm_before / layernorm_after
    blocks.i.attn.qkv  (rows [q; k; v])   encoder.layer.i.attention.attention.query / key / value
    blocks.i.attn.proj                    encoder.layer.i.attention.output.dense
    blocks.i.mlp.fc1 / fc2                encoder.layer.i.intermediate.dense / output.dense
    norm                                  layernorm

timm's backbone (``global_pool="token"``, ``num_classes=0``) returns token 0 after the final norm, which is
``last_hidden_state[:, 0]``. At another resolution both resample the position grid bicubically (align_corners=False)
but timm uses PyTorch's antialiased kernel (a = -0.5, as PIL) and transformers the plain one (a = -0.75), up- or
downsampling: the CLS features then differ by ~1e-3 to 2e-2 relative (measured 2e-3 to 4e-3 at 1.5x and 2x the
trained size, up to 2e-2 at half of it; ``docs/export.md``), and by 0 with timm's antialiasing switched off.

Variants ``ViTModel`` cannot express (layer scale, register tokens, qk-norm, pre-norm, gated or GLU MLPs, no class
token, ...) are refused by :func:`check_convertible` with a one-line :class:`CheckpointError`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from dino_fast.checkpoint import CheckpointError

HF_TOLERANCE = 1e-5  # max |hf - ours| / max |ours| at the training resolution, fp32


def _refuse(why: str) -> CheckpointError:
    return CheckpointError(f"cannot convert to a transformers ViTModel: the backbone {why}; "
                           f"export it with --format timm or --format onnx instead")


def hf_activation(act: nn.Module) -> str | None:
    """transformers' ``hidden_act`` name (a key of ``ACT2FN``) computing the same function as ``act``, or None."""
    from timm.layers.activations import GELU, GELUTanh, QuickGELU

    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}.get(act.approximate)
    return {GELU: "gelu", GELUTanh: "gelu_pytorch_tanh", QuickGELU: "quick_gelu"}.get(type(act))


def _is_plain_layernorm(m: nn.Module, dim: int) -> bool:
    return (isinstance(m, nn.LayerNorm) and m.normalized_shape == (dim,) and m.weight is not None
            and m.bias is not None)


def check_convertible(model: nn.Module) -> None:
    """Raise :class:`CheckpointError` naming the first feature of ``model`` that ``ViTModel`` lacks."""
    from timm.layers import Mlp, PatchEmbed
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if type(model) is not VisionTransformer or type(model.patch_embed) is not PatchEmbed:
        raise _refuse(f"is timm's {type(model).__name__}, not a plain VisionTransformer")
    dim = model.embed_dim
    checks = [
        (model.cls_token is None, "has no class token (class_token=False)"),
        (model.reg_token is not None, f"has {model.num_reg_tokens} register tokens (reg_tokens)"),
        (model.no_embed_class, "keeps the class token out of the position embedding (no_embed_class)"),
        (model.pos_embed is None, "has no learned position embedding"),
        (not isinstance(model.norm_pre, nn.Identity), "normalises the embeddings before the blocks (pre_norm)"),
        (not isinstance(model.patch_embed.norm, nn.Identity), "normalises the patch embedding (embed_norm_layer)"),
        (model.patch_embed.proj.bias is None, "has a patch embedding without bias"),
        (model.global_pool != "token" or model.attn_pool is not None,
         f"pools '{model.global_pool}', not the CLS token"),
        (not isinstance(model.fc_norm, nn.Identity) or not _is_plain_layernorm(model.norm, dim),
         "does not end in one LayerNorm over all tokens (final_norm/fc_norm)"),
        (not isinstance(model.head, nn.Identity), "has a classifier head (num_classes > 0)"),
        (len(set(model.patch_embed.patch_size)) != 1, f"has non-square patches {model.patch_embed.patch_size}"),
        (len(set(model.patch_embed.grid_size)) != 1, f"has a non-square position grid {model.patch_embed.grid_size}"),
    ]
    for i, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        checks += [
            (type(block) is not Block, f"has a {type(block).__name__} as block {i}"),
            (not isinstance(block.ls1, nn.Identity) or not isinstance(block.ls2, nn.Identity),
             f"uses layer scale in block {i} (init_values)"),
            (type(attn) is not Attention, f"has a {type(attn).__name__} attention in block {i}"),
            (type(mlp) is not Mlp, f"has a {type(mlp).__name__} MLP in block {i} (GLU/SwiGLU has no ViTModel form)"),
        ]
        if type(attn) is Attention:
            checks += [
                (not isinstance(attn.q_norm, nn.Identity), f"normalises queries and keys in block {i} (qk_norm)"),
                (not isinstance(attn.norm, nn.Identity) or attn.gate is not None,
                 f"normalises or gates the attention output in block {i}"),
                (attn.attn_dim != dim, f"has attention width {attn.attn_dim} != embed width {dim} in block {i}"),
                (attn.proj.bias is None, f"has an attention projection without bias in block {i}"),
            ]
        if type(mlp) is Mlp:
            act = mlp.act
            checks += [
                (hf_activation(act) is None, f"uses {type(act).__name__} in the MLP of block {i} (ViTModel "
                                             f"takes exact or tanh GELU, or quick GELU)"),
                (not isinstance(mlp.norm, nn.Identity), f"normalises inside the MLP of block {i} (scale_mlp_norm)"),
                (not isinstance(mlp.fc1, nn.Linear) or mlp.fc1.bias is None or mlp.fc2.bias is None,
                 f"has an MLP without biases in block {i}"),
            ]
        checks.append((not all(_is_plain_layernorm(n, dim) for n in (block.norm1, block.norm2)),
                       f"uses a norm other than LayerNorm in block {i}"))
    for bad, why in checks:
        if bad:
            raise _refuse(why)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    if len({m.eps for m in norms}) != 1:
        raise _refuse(f"mixes LayerNorm eps values {sorted({m.eps for m in norms})} (ViTModel has one)")
    if len({(b.attn.num_heads, b.mlp.fc1.out_features, hf_activation(b.mlp.act)) for b in model.blocks}) > 1:
        raise _refuse("has blocks of different head counts, MLP widths or activations")


def vit_config(model: nn.Module) -> dict:
    """The ``ViTConfig`` fields of a convertible backbone; ``image_size`` is its trained (global crop) size, so that
    ``position_embeddings`` keeps the trained grid (image_size / patch_size per side)."""
    block = model.blocks[0]
    patch = model.patch_embed.patch_size[0]
    return {"hidden_size": model.embed_dim, "num_hidden_layers": len(model.blocks),
            "num_attention_heads": block.attn.num_heads, "intermediate_size": block.mlp.fc1.out_features,
            "hidden_act": hf_activation(block.mlp.act), "layer_norm_eps": model.norm.eps,
            "image_size": model.patch_embed.img_size[0], "patch_size": patch,
            "num_channels": model.patch_embed.proj.in_channels,
            "qkv_bias": block.attn.qkv.bias is not None, "encoder_stride": patch,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "architectures": ["ViTModel"]}


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's weights under ViTModel's hub key names (fp32, contiguous); ``qkv`` split into q, k, v.

    Shape: ``blocks.i.attn.qkv.weight`` [3·D, D] = [W_q; W_k; W_v] → three [D, D] matrices (same for the bias).
    """
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    for i in range(len(model.blocks)):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for ours, theirs in names.items():
            for p in ("weight", "bias"):
                out[f"{dst}{theirs}.{p}"] = sd[f"{src}{ours}.{p}"]
        for p in ("weight", "bias"):
            if f"{src}attn.qkv.{p}" in sd:
                q, k, v = sd[f"{src}attn.qkv.{p}"].chunk(3, dim=0)
                out.update({f"{dst}attention.attention.query.{p}": q, f"{dst}attention.attention.key.{p}": k,
                            f"{dst}attention.attention.value.{p}": v})
    return {k: v.contiguous() for k, v in out.items()}


def load_vit_model(folder: str | Path) -> nn.Module:
    """``ViTModel.from_pretrained(folder, add_pooling_layer=False)`` from local files only, in eval mode; any
    missing, unexpected or mis-shaped weight is an error (the user's call would silently re-initialise it)."""
    from transformers import ViTModel
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per check is noise in the export's output
    try:
        model, info = ViTModel.from_pretrained(str(folder), add_pooling_layer=False, local_files_only=True,
                                               output_loading_info=True)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise CheckpointError(f"transformers did not load '{folder}' cleanly: {bad}")
    return model.eval()


def check_folder(folder: Path) -> None:
    """The output must be a new or empty folder: from_pretrained reads every weights file it finds there."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        kind = "folder exists and is not empty" if folder.is_dir() else "is an existing file, not a folder"
        raise CheckpointError(f"output '{folder}' {kind}; --format transformers writes a new folder")


def export_transformers(model: nn.Module, folder: str | Path, metadata: dict[str, str] | None = None) -> float:
    """Write ``config.json`` + ``model.safetensors`` into ``folder`` (created; must be empty), reload it with
    transformers and compare with ``model`` (fp32; put in eval mode) on random images at the trained size.

    Returns:
        max |hf - ours| / max |ours| of the CLS features; above :data:`HF_TOLERANCE` is an error.
    """
    from transformers import ViTConfig

    check_convertible(model)
    folder = Path(folder)
    check_folder(folder)
    config = vit_config(model)
    folder.mkdir(parents=True, exist_ok=True)
    ViTConfig(**config).save_pretrained(str(folder))
    save_file(hf_state_dict(model), str(folder / "model.safetensors"), metadata={"format": "pt", **(metadata or {})})

    size = config["image_size"]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.eval()(x)
        theirs = load_vit_model(folder)(pixel_values=x).last_hidden_state[:, 0]
    err = ((theirs - ours).abs().max() / ours.abs().max()).item()
    if not err <= HF_TOLERANCE:
        raise CheckpointError(f"the transformers ViTModel in '{folder}' differs from the backbone by {err:.2e} "
                              f"(> {HF_TOLERANCE:g} relative); please report this with the checkpoint's arch")
    return err
