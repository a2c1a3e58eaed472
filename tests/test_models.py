import math

import pytest
import torch

from dino_fast.config import ModelConfig
from dino_fast.models import DINOHead, MultiCropWrapper, build_backbone, build_student_teacher


def test_head_shapes_init_and_norm_last_layer_flag():
    torch.manual_seed(0)
    head = DINOHead(384, 1000, norm_last_layer=True, nlayers=3, hidden_dim=2048, bottleneck_dim=256)
    x = torch.randn(5, 384)
    assert head(x).shape == (5, 1000)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(2048, 384), (2048, 2048), (256, 2048)]
    w = linears[1].weight
    assert abs(w.std().item() - 0.02) < 0.002 and w.abs().max() <= 2  # trunc_normal_(std=.02), cut at ±2 as timm
    assert all(torch.all(m.bias == 0) for m in linears)
    gain = head.last_layer.parametrizations.weight.original0
    assert gain.shape == (1000, 1) and torch.all(gain == 1) and not gain.requires_grad
    # With a gain of 1 the logits are cosine similarities of the normalised bottleneck and the prototype rows.
    assert head(x).abs().max() <= 1 + 1e-5
    bound = 1 / math.sqrt(256)  # PyTorch's default Linear init is kaiming-uniform: |w| ≤ 1/sqrt(fan_in)
    assert head.last_layer.parametrizations.weight.original1.abs().max() <= bound
    assert DINOHead(16, 10, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


def test_backbone_returns_normed_cls_token_at_any_multiple_of_patch_size():
    bb = build_backbone("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=2).eval()
    for size in (64, 32, 96):
        assert bb(torch.randn(2, 3, size, size)).shape == (2, 192)
    x = torch.randn(2, 3, 32, 32)
    tokens = bb.forward_features(x)  # after the final norm
    torch.testing.assert_close(bb(x), tokens[:, 0])
    assert bb.norm.eps == 1e-6
    with pytest.raises(ValueError, match="not a timm model"):
        build_backbone("vit_nonexistent_model", img_size=32)


def test_multicrop_wrapper_equals_per_crop_forwards():
    torch.manual_seed(0)
    model = MultiCropWrapper(build_backbone("vit_tiny_patch16_224", 32, patch_size=8, depth=2),
                             DINOHead(192, 50, hidden_dim=32, bottleneck_dim=16)).eval()
    crops = [torch.randn(3, 3, 32, 32) for _ in range(2)] + [torch.randn(3, 3, 16, 16) for _ in range(4)]
    batched = model(crops)
    separate = torch.cat([model.head(model.backbone(c)) for c in crops])
    assert batched.shape == (18, 50)
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-5)


def test_teacher_starts_as_student_without_drop_path_or_grads():
    cfg = ModelConfig(arch="vit_tiny_patch16_224", depth=2, patch_size=8, out_dim=64, head_hidden_dim=32,
                      head_bottleneck_dim=16, drop_path_rate=0.2, norm_last_layer=False)
    student, teacher = build_student_teacher(cfg, img_size=32)
    s_state, t_state = student.state_dict(), teacher.state_dict()
    assert s_state.keys() == t_state.keys()
    assert all(torch.equal(s_state[k], t_state[k]) for k in s_state)
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in teacher.parameters())
    assert student.backbone.blocks[1].drop_path1.drop_prob > 0
    assert all(isinstance(b.drop_path1, torch.nn.Identity) for b in teacher.backbone.blocks)
    assert student.head.last_layer.parametrizations.weight.original0.requires_grad


def test_bn_head_has_the_references_layout():
    """model.use_bn_in_head: vision_transformer.DINOHead(use_bn=True): Linear → BatchNorm1d → GELU per hidden layer,
    the Linear layers initialised as without BatchNorm (same draws), none with a single layer."""
    torch.manual_seed(0)
    plain = DINOHead(16, 10, nlayers=3, hidden_dim=8, bottleneck_dim=4)
    torch.manual_seed(0)
    bn = DINOHead(16, 10, nlayers=3, hidden_dim=8, bottleneck_dim=4, use_bn=True)
    assert [type(m).__name__ for m in bn.mlp] == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU",
                                                  "Linear"]
    assert torch.equal(bn.mlp[0].weight, plain.mlp[0].weight) and torch.equal(bn.mlp[3].weight, plain.mlp[2].weight)
    assert torch.equal(bn.mlp[1].weight, torch.ones(8)) and torch.equal(bn.mlp[1].bias, torch.zeros(8))
    assert isinstance(DINOHead(16, 10, nlayers=1, use_bn=True).mlp, torch.nn.Linear)  # the reference: no BN then
