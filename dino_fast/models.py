"""Student/teacher networks: a timm ViT backbone, the DINO projection head, and the multi-crop wrapper."""

from __future__ import annotations

import timm
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """MLP → L2-normalise → weight-normalised linear layer to K prototypes (Caron et al., 2021, DINO_SPEC "Head").

    MLP weights are truncated-normal (std 0.02) with zero biases; the last layer keeps PyTorch's default Linear
    init for its direction and a gain of 1, frozen when ``norm_last_layer`` (logits are then cosine similarities).

    Shape: [N, in_dim] → [N, out_dim].
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # Built after the MLP init on purpose: the last layer keeps the default Linear init.
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        gain.data.fill_(1.0)
        gain.requires_grad = not norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = nn.functional.normalize(x, dim=-1, p=2, eps=1e-12)
        return self.last_layer(x)


def build_backbone(arch: str, img_size: int, drop_path_rate: float = 0.0, patch_size: int = 0, depth: int = 0):
    """A timm ViT returning the CLS token after the final norm (``num_classes=0``), any input size that is a
    multiple of the patch size (``dynamic_img_size``: position embeddings resampled bicubically per size)."""
    kwargs = dict(pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, dynamic_img_size=True,
                  img_size=img_size, global_pool="token")
    if patch_size:
        kwargs["patch_size"] = patch_size
    if depth:
        kwargs["depth"] = depth
    try:
        model = timm.create_model(arch, **kwargs)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise ValueError(f"model.arch='{arch}' is not a timm model ({exc}); try vit_small_patch16_224") from None
    if not hasattr(model, "patch_embed") or not hasattr(model, "cls_token"):
        raise ValueError(f"model.arch='{arch}' is not a ViT with a CLS token; DINO here needs a timm VisionTransformer")
    return model


class MultiCropWrapper(nn.Module):
    """Runs consecutive crops of equal resolution as one backbone batch, then the head once on all features.

    With ``packed`` (model.packed_crops) the groups of every resolution go through one packed backbone pass
    (:func:`dino_fast.packed.packed_features`: per-token layers once over all crops' tokens, attention per group)
    instead of one backbone pass each; ``packed_fn`` may be replaced by a compiled version of it.

    Shape: list of [B, 3, S_i, S_i] → [len(crops)·B, out_dim], rows in crop order. With ``return_backbone`` also
    the backbone's CLS features [len(crops)·B, D] (for a regulariser on them, e.g. KoLeo): ``(features, logits)``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, packed: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.packed = packed
        if packed:
            from dino_fast.packed import check_packable, packed_features

            check_packable(backbone)
            self.packed_fn = packed_features

    def forward(self, crops: list[torch.Tensor] | torch.Tensor,
                return_backbone: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        groups = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            groups.append(torch.cat(crops[start:end]) if end - start > 1 else crops[start])
            start = end
        if self.packed and len(groups) > 1:
            features = self.packed_fn(self.backbone, groups)
        else:
            features = torch.cat([self.backbone(g) for g in groups])
        logits = self.head(features)
        return (features, logits) if return_backbone else logits


def build_student_teacher(model_cfg, img_size: int) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student (with drop-path) and teacher (none, same weights, no gradients, fp32) from a ModelConfig."""

    def build(drop_path: float, norm_last_layer: bool, packed: bool) -> MultiCropWrapper:
        backbone = build_backbone(model_cfg.arch, img_size, drop_path, model_cfg.patch_size, model_cfg.depth)
        head = DINOHead(backbone.num_features, model_cfg.out_dim, norm_last_layer, model_cfg.head_nlayers,
                        model_cfg.head_hidden_dim, model_cfg.head_bottleneck_dim)
        return MultiCropWrapper(backbone, head, packed)

    # The teacher sees the two global crops only (one resolution): nothing to pack.
    student = build(model_cfg.drop_path_rate, model_cfg.norm_last_layer, getattr(model_cfg, "packed_crops", False))
    if getattr(model_cfg, "grad_checkpointing", False):  # timm's flag; the packed pass reads it too
        student.backbone.set_grad_checkpointing(True)
    teacher = build(0.0, True, False)
    teacher.load_state_dict(student.state_dict())
    teacher.float()
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher
