"""The packed multi-crop student (model.packed_crops) against the per-resolution one: same outputs and gradients in
fp32, far fewer aten ops, and a clear error for a backbone it cannot drive."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.bench_profile import METADATA_OPS
from dino_fast.config import load_config
from dino_fast.models import MultiCropWrapper, build_student_teacher


def _student_pair(drop_path: float = 0.0, depth: int = 2):
    cfg = load_config(None, ["model.arch=vit_tiny_patch16_224", "model.patch_size=8", f"model.depth={depth}",
                             "model.out_dim=128", "model.head_hidden_dim=64", "model.head_bottleneck_dim=32",
                             f"model.drop_path_rate={drop_path}"])
    torch.manual_seed(0)
    plain, _ = build_student_teacher(cfg.model, 32)
    packed = MultiCropWrapper(copy.deepcopy(plain.backbone), copy.deepcopy(plain.head), packed=True)
    return plain, packed


def _crops(b: int = 3, n_local: int = 3, g: int = 32, loc: int = 16, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return ([torch.randn(b, 3, g, g, generator=gen) for _ in range(2)]
            + [torch.randn(b, 3, loc, loc, generator=gen) for _ in range(n_local)])


def test_packed_student_equals_the_per_resolution_one_in_fp32():
    plain, packed = _student_pair()
    crops = _crops()
    # Non-uniform upstream gradient, so every output row matters.
    weights = torch.randn(len(crops) * 3, 128, generator=torch.Generator().manual_seed(1))
    outs, grads = {}, {}
    for name, model in (("plain", plain), ("packed", packed)):
        model.train()
        inputs = [c.clone().requires_grad_(True) for c in crops]
        out = model(inputs)
        (out * weights).sum().backward()
        outs[name] = out.detach()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        grads[name]["inputs"] = torch.cat([i.grad.flatten() for i in inputs])
    assert outs["packed"].shape == (len(crops) * 3, 128)  # [ncrops·B, K], crop order
    torch.testing.assert_close(outs["packed"], outs["plain"], rtol=1e-5, atol=1e-6)
    assert grads["packed"].keys() == grads["plain"].keys() and len(grads["plain"]) > 20
    for k, g in grads["plain"].items():  # fp32 sums in another order: within 1e-5 of each gradient's scale
        torch.testing.assert_close(grads["packed"][k], g, rtol=1e-5, atol=1e-5 * float(g.abs().max()), msg=k)
    # Row order: local crop 3's rows are the last B rows of both (a shuffled packing would mismatch above too).
    torch.testing.assert_close(packed([crops[-1]]), plain([crops[-1]]), rtol=1e-5, atol=1e-6)


def test_packed_drop_path_keeps_or_drops_whole_samples():
    """Drop-path on packed tokens draws per sample (as timm's DropPath on [B, T, D]), not per token: every token
    of a sample gets the same factor, 0 or 1/keep, and at rate 0.5 both occur."""
    from timm.layers import DropPath

    from dino_fast.packed import _drop_path

    shapes = [(6, 5), (10, 2)]  # 6 samples of 5 tokens, then 10 of 2
    token_sample = torch.cat([torch.arange(0, 6).repeat_interleave(5), torch.arange(6, 16).repeat_interleave(2)])
    drop = DropPath(0.5).train()
    torch.manual_seed(0)
    out = _drop_path(torch.ones(sum(n * t for n, t in shapes), 4), drop, token_sample, 16)
    per_sample = [out[token_sample == i] for i in range(16)]
    assert all(torch.all(rows == rows[0, 0]) for rows in per_sample)
    factors = {float(rows[0, 0]) for rows in per_sample}
    assert factors == {0.0, 2.0}
    assert _drop_path(torch.ones(3, 4), drop.eval(), token_sample, 16).eq(1).all()  # eval: no drop


class _AtenCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.removeprefix("aten::")
        if name not in METADATA_OPS:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def _forward_backward_ops(model: MultiCropWrapper, crops: list[torch.Tensor]) -> int:
    model.train()
    model.zero_grad(set_to_none=True)
    with _AtenCalls() as mode:
        model(crops).sum().backward()
    return sum(mode.calls.values())


def test_packed_student_runs_at_least_30_percent_fewer_aten_ops():
    """The per-token layers once instead of once per resolution: forward + backward of a 4-block student on the
    demo's 2 global + 4 local crops, counted below autograd (view/metadata ops left out, as bench_profile does)."""
    plain, packed = _student_pair(drop_path=0.1, depth=4)
    crops = _crops(b=2, n_local=4)
    n_plain, n_packed = _forward_backward_ops(plain, crops), _forward_backward_ops(packed, crops)
    print(f"aten ops forward+backward: per-resolution {n_plain}, packed {n_packed} "
          f"({100 * (1 - n_packed / n_plain):.0f}% fewer)")
    assert n_packed <= 0.7 * n_plain, (n_plain, n_packed)


def test_an_unpackable_backbone_is_a_clear_error():
    plain, _ = _student_pair()
    plain.backbone.global_pool = "avg"
    with pytest.raises(ValueError, match="model.packed_crops=false"):
        MultiCropWrapper(plain.backbone, plain.head, packed=True)
