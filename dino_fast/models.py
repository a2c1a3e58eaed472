"""Student/teacher networks: a timm backbone (ViT, ResNet or XCiT), the DINO projection head, the multi-crop wrapper.

The three families the reference trains (``main_dino.py --arch``): ViTs, torchvision ResNets (here timm's, whose
parameter names are torchvision's) and XCiT. Every backbone returns one pooled feature per image: a ViT's or an
XCiT's CLS token after its final norm, a ResNet's global average pool (2048 for ResNet-50).
"""

from __future__ import annotations

import timm
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

# model.arch's families, by the timm module that defines the arch; everything else is tried as a ViT.
FAMILIES = {"vit": "timm ViTs (vit_small_patch16_224, ...)", "resnet": "ResNets (resnet50, resnet18, ...)",
            "xcit": "XCiT (xcit_small_12_p16_224, ...)"}
_FAMILY_BY_MODULE = {"timm.models.resnet": "resnet", "timm.models.xcit": "xcit"}
TAKES = f"the trainer takes {', '.join(FAMILIES.values())}"


class DINOHead(nn.Module):
    """MLP → L2-normalise → weight-normalised linear layer to K prototypes (Caron et al., 2021, DINO_SPEC "Head").

    MLP weights are truncated-normal (std 0.02) with zero biases; the last layer keeps PyTorch's default Linear
    init for its direction and a gain of 1, frozen when ``norm_last_layer`` (logits are then cosine similarities).
    ``use_bn`` (the reference's ``--use_bn_in_head``): Linear → BatchNorm1d → GELU for every hidden layer, BatchNorm
    at its default init (the reference's layout, ``vision_transformer.DINOHead``; none when ``nlayers`` is 1).

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
        use_bn: bool = False,
    ):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            def hidden(dim_in: int) -> list[nn.Module]:
                return [nn.Linear(dim_in, hidden_dim), *([nn.BatchNorm1d(hidden_dim)] if use_bn else []), nn.GELU()]

            layers = hidden(in_dim)
            for _ in range(nlayers - 2):
                layers += hidden(hidden_dim)
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


def arch_family(arch: str) -> str:
    """"vit", "resnet" or "xcit": the family of a timm arch name (by the module defining it; others count as "vit",
    which :func:`build_backbone` then checks). Raises ValueError for a name timm does not know."""
    if not timm.is_model(arch):
        hint = f"{arch}_224" if timm.is_model(f"{arch}_224") else "vit_small_patch16_224 or resnet50"
        raise ValueError(f"model.arch='{arch}' is not a timm model (Unknown model ({arch})); try {hint}")
    return _FAMILY_BY_MODULE.get(timm.models.model_entrypoint(arch).__module__, "vit")


def backbone_family(backbone: nn.Module) -> str:
    """The family of a built backbone: "vit" (a timm VisionTransformer), "resnet", "xcit", or "other"."""
    from timm.models.resnet import ResNet
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.xcit import Xcit

    for cls, family in ((VisionTransformer, "vit"), (ResNet, "resnet"), (Xcit, "xcit")):
        if isinstance(backbone, cls):
            return family
    return "other"


def timm_arch_kwargs(family: str, img_size: int, patch_size: int = 0, depth: int = 0) -> dict:
    """The ``timm.create_model`` kwargs (beyond ``num_classes=0``) that give a family's backbone its architecture;
    export writes them beside the weights. ViT: any input size that is a multiple of the patch size
    (``dynamic_img_size``: position embeddings resampled bicubically per size); XCiT: any size (its Fourier position
    encoding is computed per grid); ResNet: any size (global average pool).

    Raises:
        ValueError: ``model.patch_size``/``model.depth`` asked of a ResNet, or a patch size XCiT does not have.
    """
    if family == "resnet":
        if patch_size or depth:
            key = "model.patch_size" if patch_size else "model.depth"
            raise ValueError(f"{key} applies to ViTs and XCiT, not to a ResNet (its depth is in its arch name, e.g. "
                             f"resnet18, resnet50): set {key}=0")
        return {}
    if family == "xcit":
        if patch_size not in (0, 8, 16):
            raise ValueError(f"model.patch_size={patch_size}: XCiT's convolutional patch embedding has patch 8 or 16 "
                             f"(set model.patch_size=0 for the arch's own)")
        kwargs: dict = {"global_pool": "token"}
    else:
        kwargs = {"img_size": img_size, "dynamic_img_size": True, "global_pool": "token"}
    if patch_size:
        kwargs["patch_size"] = patch_size
    if depth:
        kwargs["depth"] = depth
    return kwargs


def build_backbone(arch: str, img_size: int, drop_path_rate: float = 0.0, patch_size: int = 0, depth: int = 0):
    """A timm backbone returning one pooled feature per image (``num_classes=0``; module docstring), in the family's
    layout (:func:`timm_arch_kwargs`). A ResNet starts as torchvision's (the reference's network) does: its last
    BatchNorm of each residual block at weight 1 (timm's default zeroes it, ``zero_init_last``).

    Raises:
        ValueError: one line naming the key to change (an unknown arch, a family the trainer cannot use, ...).
    """
    family = arch_family(arch)
    kwargs = dict(pretrained=False, num_classes=0, drop_path_rate=drop_path_rate,
                  **timm_arch_kwargs(family, img_size, patch_size, depth))
    if family == "resnet":
        kwargs["zero_init_last"] = False
    try:
        model = timm.create_model(arch, **kwargs)
    except (TypeError, AssertionError) as exc:  # another kind of network: a ViT argument it lacks or refuses
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"model.arch='{arch}' cannot be built as a ViT with a CLS token ({type(exc).__name__}: "
                         f"{first}); {TAKES}") from None
    if family == "vit" and (not hasattr(model, "patch_embed") or not hasattr(model, "cls_token")):
        raise ValueError(f"model.arch='{arch}' is not a ViT with a CLS token, a ResNet or an XCiT; {TAKES}")
    return model


class MultiCropWrapper(nn.Module):
    """Runs consecutive crops of equal resolution as one backbone batch, then the head once on all features.

    With ``packed`` (model.packed_crops) the groups of every resolution go through one packed backbone pass
    (:func:`dino_fast.packed.packed_features`: per-token layers once over all crops' tokens, attention per group)
    instead of one backbone pass each; ``packed_fn`` may be replaced by a compiled version of it. With
    ``channels_last`` (a convnet on a GPU, :func:`place_on_device`) each group is converted to that memory format.

    Shape: list of [B, 3, S_i, S_i] → [len(crops)·B, out_dim], rows in crop order. With ``return_backbone`` also
    the backbone's features [len(crops)·B, D] (for a regulariser on them, e.g. KoLeo): ``(features, logits)``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, packed: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.packed = packed
        self.channels_last = False
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
        if self.channels_last:
            groups = [g.contiguous(memory_format=torch.channels_last) for g in groups]
        if self.packed and len(groups) > 1:
            features = self.packed_fn(self.backbone, groups)
        else:
            features = torch.cat([self.backbone(g) for g in groups])
        logits = self.head(features)
        return (features, logits) if return_backbone else logits


def build_student_teacher(model_cfg, img_size: int) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student (with drop-path) and teacher (none, same weights, no gradients, fp32) from a ModelConfig."""
    use_bn = getattr(model_cfg, "use_bn_in_head", False)

    def build(drop_path: float, norm_last_layer: bool, packed: bool) -> MultiCropWrapper:
        backbone = build_backbone(model_cfg.arch, img_size, drop_path, model_cfg.patch_size, model_cfg.depth)
        head = DINOHead(backbone.num_features, model_cfg.out_dim, norm_last_layer, model_cfg.head_nlayers,
                        model_cfg.head_hidden_dim, model_cfg.head_bottleneck_dim, use_bn=use_bn)
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


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` holds a BatchNorm layer (a ResNet, XCiT's patch embedding and LPI, a BN head)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def place_on_device(student: MultiCropWrapper, teacher: MultiCropWrapper, device: torch.device,
                    world: int) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """What the reference does to networks with BatchNorm, and the memory format convnets run fastest in.

    - Several ranks on GPUs: every BatchNorm of student and teacher becomes a SyncBatchNorm (statistics over the
      global batch, as ``main_dino.py`` converts them). Not on CPUs: SyncBatchNorm raises there as soon as a process
      group exists, so a multi-rank CPU run normalises with per-rank statistics (docs/networks.md).
    - A ResNet on a GPU: weights and input crops in ``channels_last`` (NHWC), the layout cuDNN's bf16 convolutions use.

    Returns the (same, converted in place) student and teacher. The caller sets the teacher's mode: the reference
    never puts it in eval mode, so with BatchNorm it normalises with its own batch statistics and updates its own
    running statistics (the EMA averages parameters only).
    """
    if device.type == "cuda" and world > 1 and has_batchnorm(student):
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    if device.type == "cuda" and backbone_family(student.backbone) == "resnet":
        for model in (student, teacher):
            model.to(memory_format=torch.channels_last)
            model.channels_last = True
    return student, teacher
