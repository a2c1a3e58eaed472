"""Attention maps: the last block's attention against q·kᵀ softmax written out in float64, and it is the attention
that block uses (its output rebuilt from it); the 60%-mass masks against a plain sort-and-accumulate; the figure's
pixels; the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from dino_fast.eval import attention
from dino_fast.eval.attention import attention_figure, cls_attention, last_block_attention, load_image, mass_mask


def _tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2, patch_size=8,
                              img_size=32, dynamic_img_size=True, global_pool="token").eval()
    with torch.no_grad():  # sharper than the init's near-uniform attention, so the comparison has structure
        model.blocks[-1].attn.qkv.weight.mul_(8)
    return model


def _last_block_input(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.blocks[0](model._pos_embed(model.patch_embed(x)))


def _attention_case(*shape: int) -> tuple:
    """A tiny ViT, random images of ``shape``, its last block's attention as the module gives it, and that block."""
    model = _tiny_vit()
    x = torch.randn(*shape)
    return model, x, last_block_attention(model, x), model.blocks[-1]


def test_attention_equals_manual_qk_softmax_in_float64():
    model, x, got, blk = _attention_case(2, 3, 32, 40)
    with torch.no_grad():
        t = _last_block_input(model, x).double()
        t = F.layer_norm(t, (192,), blk.norm1.weight.double(), blk.norm1.bias.double(), blk.norm1.eps)
        qkv = t @ blk.attn.qkv.weight.double().T + blk.attn.qkv.bias.double()
        q, k = qkv[..., :192], qkv[..., 192:384]
        heads = 3
        q = q.reshape(2, -1, heads, 64).transpose(1, 2)
        k = k.reshape(2, -1, heads, 64).transpose(1, 2)
        want = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1)
    assert got.shape == (2, 3, 21, 21)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)
    assert want[:, :, 0, 1:].max() > 0.2  # a structured map, not the near-uniform 1/21


def test_it_is_the_attention_the_block_uses():
    model, x, a, blk = _attention_case(1, 3, 32, 32)
    with torch.no_grad():
        inp = _last_block_input(model, x)
        v = blk.attn.qkv(blk.norm1(inp))[..., 384:].reshape(1, -1, 3, 64).transpose(1, 2)
        mixed = (a @ v).transpose(1, 2).reshape(1, -1, 192)
        h = inp + blk.attn.proj(mixed)
        rebuilt = h + blk.mlp(blk.norm2(h))
        torch.testing.assert_close(rebuilt, blk(inp), rtol=0, atol=1e-5)
    cls = cls_attention(model, x)
    assert cls.shape == (1, 3, 4, 4)
    torch.testing.assert_close(cls.flatten(2), a[:, :, 0, 1:])


def _mask_by_hand(row: np.ndarray, mass: float) -> np.ndarray:
    keep = np.zeros(row.shape, bool)
    total, acc = row.sum(), 0.0
    for i in sorted(range(len(row)), key=lambda j: -row[j]):
        if acc >= mass * total:
            break
        keep[i] = True
        acc += row[i]
    return keep


@pytest.mark.parametrize("mass", [0.6, 0.3, 0.95])
def test_mass_mask_keeps_the_smallest_top_set_reaching_the_mass(mass):
    gen = torch.Generator().manual_seed(3)
    attn = torch.rand(4, 6, 7, generator=gen) ** 4  # heads × grid, skewed like attention
    keep = mass_mask(attn, mass)
    assert keep.shape == attn.shape and keep.dtype == torch.bool
    for h in range(4):
        row = attn[h].flatten().double().numpy()
        np.testing.assert_array_equal(keep[h].flatten().numpy(), _mask_by_hand(row, mass))
        kept = row[keep[h].flatten().numpy()]
        assert kept.sum() >= mass * row.sum() > kept.sum() - kept.min()


def test_figure_overlays_heat_maps_and_masks(tmp_path):
    model = _tiny_vit()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    x, pixels = load_image(tmp_path / "a.png", 32, 8)
    assert pixels.shape == (32, 32, 3) and x.shape == (3, 32, 32)  # 40×48 → 32×38 → centre crop 32×32
    fig = attention_figure(model, [str(tmp_path / "a.png")] * 2, size=32, min_side=64)
    assert fig.shape == (2 * 2 * 64, 4 * 64, 3) and fig.dtype == np.uint8  # 2 images × 2 rows; image + 3 heads
    a = cls_attention(model, x[None])[0]
    keep = mass_mask(a).numpy()
    big = np.asarray(Image.fromarray(pixels).resize((64, 64), Image.BICUBIC)).astype(float)
    np.testing.assert_array_equal(fig[:64, :64], big.astype(np.uint8))  # first tile: the image itself
    label_rows = np.zeros((64, 64), bool)
    label_rows[:14] = True  # the "x% of patches" text is drawn there
    for j in range(3):
        tile = fig[64:128, (j + 1) * 64:(j + 2) * 64].astype(float)
        inside = np.kron(keep[j], np.ones((16, 16), bool))
        np.testing.assert_allclose(tile[inside & ~label_rows], big[inside & ~label_rows], atol=0.51)
        np.testing.assert_allclose(tile[~inside & ~label_rows], 0.25 * big[~inside & ~label_rows], atol=0.51)
        assert 0 < keep[j].sum() < 16


def test_cli_writes_a_png_and_errors_exit_2(tmp_path, capsys):
    model = _tiny_vit()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 32), (40 * i, 90, 200 - 50 * i)).save(folder / f"{i}.jpg")
    attention.main(["--weights", str(tmp_path / "w.pth"), "--images", str(folder), "--size", "32", "--out",
                    str(tmp_path / "o.png"), "--device", "cpu", "--max-images", "2"])
    out = np.asarray(Image.open(tmp_path / "o.png"))
    assert out.shape == (2 * 2 * 128, 5 * 128, 3)  # 2 images; 32×40 upscaled ×4 → 128×160: image + 3 heads
    assert "2 image(s), 3 heads" in capsys.readouterr().out
    for args, text in ((["--images", str(tmp_path / "none")], "does not exist"),
                       (["--images", str(tmp_path / "w.pth")], "is not an image"),
                       (["--images", str(folder), "--mass", "0"], "--mass must be in (0, 1]")):
        with pytest.raises(SystemExit) as exc:
            attention.main(["--weights", str(tmp_path / "w.pth"), *args])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and text in err and "Traceback" not in err
