"""Packed multi-crop forward: one backbone pass over the crops of every resolution (as dinov2's student does it).

A timm VisionTransformer embeds each resolution group on its own (patch embedding, position embedding resampled to
that grid, CLS token), then the tokens of all groups are concatenated into one [M, D] matrix. Everything that acts
per token (norms, qkv, the attention projection, the MLP, residuals, drop-path) runs once over that matrix, so its
matmuls get the rows of all crops and its launches are not repeated per resolution; only the attention itself
runs per group, on views of the qkv matrix. The CLS rows are taken out at the end (the final norm acts per token, so
only those rows need it) and go through the pooling-side layers (fc_norm, head) once.

Equal to the per-resolution forward up to float rounding (tests/test_packed.py). Drop-path draws one keep/drop per
sample and residual branch, as timm's DropPath, but in another order (block by block over all groups), so with
drop-path the two paths are equal in distribution, not draw for draw.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint


def check_packable(vit: nn.Module) -> None:
    """Raise ValueError (naming the key to change) unless ``vit`` is a timm ViT whose blocks this module can drive."""
    fix = "set model.packed_crops=false for this arch"
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"model.packed_crops=true needs a timm VisionTransformer, got {type(vit).__name__}; {fix}")
    if vit.global_pool != "token" or getattr(vit, "attn_pool", None) is not None:
        raise ValueError(f"model.packed_crops=true needs the CLS-token output (global_pool='token'); {fix}")
    for blk in vit.blocks:
        if type(blk) is not Block or not hasattr(blk.attn, "qkv"):
            raise ValueError(f"model.packed_crops=true drives timm's standard ViT Block, got {type(blk).__name__}; "
                             f"{fix}")


def _embed(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """[N, 3, S, S] → [N, T, D] tokens with CLS and position embedding, as forward_features before the blocks."""
    return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))


def _drop_path(branch: torch.Tensor, drop: nn.Module, token_sample: torch.Tensor | None, samples: int) -> torch.Tensor:
    """timm's per-sample drop-path on packed tokens: one keep/drop per sample, spread over that sample's tokens."""
    if not isinstance(drop, DropPath) or drop.drop_prob == 0.0 or not drop.training:
        return branch
    keep = 1.0 - drop.drop_prob
    mask = branch.new_empty(samples).bernoulli_(keep)
    if keep > 0.0 and drop.scale_by_keep:
        mask.div_(keep)
    return branch * mask[token_sample].unsqueeze(1)


def _attention(attn: nn.Module, x: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
    """timm's Attention on packed tokens [M, D]: qkv and the projection once, scaled dot-product per group."""
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x)
    outs = []
    for part, (n, t) in zip(qkv.split([n * t for n, t in shapes]), shapes):
        q, k, v = part.view(n, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
        outs.append(o.transpose(1, 2).reshape(n * t, -1))
    x = torch.cat(outs) if len(outs) > 1 else outs[0]
    x = getattr(attn, "norm", nn.Identity())(x)
    if gate is not None:
        x = x * gate
    return attn.proj_drop(attn.proj(x))


def _block(blk: Block, x: torch.Tensor, shapes: list[tuple[int, int]], token_sample: torch.Tensor | None,
           samples: int) -> torch.Tensor:
    x = x + _drop_path(blk.ls1(_attention(blk.attn, blk.norm1(x), shapes)), blk.drop_path1, token_sample, samples)
    return x + _drop_path(blk.ls2(blk.mlp(blk.norm2(x))), blk.drop_path2, token_sample, samples)


def packed_features(vit: VisionTransformer, groups: list[torch.Tensor]) -> torch.Tensor:
    """The backbone's output (CLS token after the final norm and fc_norm/head) for every image of every group.

    Shape: list of [N_g, 3, S_g, S_g] (one resolution per entry) → [Σ N_g, D], rows in group order.
    """
    tokens = [_embed(vit, g) for g in groups]
    shapes = [(t.shape[0], t.shape[1]) for t in tokens]
    dim = tokens[0].shape[-1]
    x = torch.cat([t.reshape(-1, dim) for t in tokens])
    samples = sum(n for n, _ in shapes)
    token_sample = None
    if vit.training and any(isinstance(m, DropPath) and m.drop_prob > 0 for m in vit.blocks.modules()):
        # Which sample each token belongs to (built once per pass, not per block; int repeats: no host sync).
        offsets = [sum(n for n, _ in shapes[:i]) for i in range(len(shapes))]
        token_sample = torch.cat([torch.arange(o, o + n, device=x.device).repeat_interleave(t)
                                  for o, (n, t) in zip(offsets, shapes)])
    checkpointed = getattr(vit, "grad_checkpointing", False) and torch.is_grad_enabled()
    for blk in vit.blocks:
        if checkpointed:  # model.grad_checkpointing: recompute the block in the backward (drop-path draws replayed)
            x = checkpoint(_block, blk, x, shapes, token_sample, samples, use_reentrant=False)
        else:
            x = _block(blk, x, shapes, token_sample, samples)
    starts = [sum(n * t for n, t in shapes[:i]) for i in range(len(shapes))]
    cls = torch.cat([x[s:s + n * t].view(n, t, dim)[:, 0] for s, (n, t) in zip(starts, shapes)])
    return vit.head(vit.head_drop(vit.fc_norm(vit.norm(cls))))
