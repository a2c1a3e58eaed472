"""Pretrained weights in every layout users have, built here (no download): each loads into the configured model
with the source's exact outputs, the reference checkpoint's teacher is the one used, a position embedding of
another grid is resampled, a file that does not fit is one line naming the mismatch, and model.pretrained
starts both student and teacher of a real (ZeRO-1) training run from the file."""

from __future__ import annotations

import argparse

import pytest
import timm
import torch
from safetensors.torch import save_file

from dino_fast.checkpoint import CheckpointError
from dino_fast.config import ConfigError, load_config
from dino_fast.eval import export, knn
from dino_fast.eval.weights import backbone_from_weights, init_from_pretrained, read_weights
from dino_fast.models import build_student_teacher
from dino_fast.train import train

from runs import ckpt_dir, run_main, student_state


def _vit(seed: int, *, dim_arch="vit_tiny_patch16_224", depth=1, patch=8, img=32, classes=0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(dim_arch, pretrained=False, num_classes=classes, depth=depth, patch_size=patch,
                             img_size=img, dynamic_img_size=True, global_pool="token").eval()


def _backbone_sd(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}


def _layouts(tmp_path, source: torch.nn.Module, other: torch.nn.Module) -> dict[str, object]:
    """Each accepted file layout holding ``source``'s backbone (``other`` plays the student / a distractor)."""
    sd = _backbone_sd(source)
    files = {}
    files["export"] = tmp_path / "export.safetensors"
    export.export_backbone(source, "vit_tiny_patch16_224", files["export"],
                           model_kwargs={"img_size": 32, "dynamic_img_size": True, "global_pool": "token",
                                         "patch_size": 8, "depth": 1})
    # timm: a classifier model's state dict (head.weight/bias = the classifier) as a hub .safetensors and a .pth,
    # and timm train.py's checkpoint (state_dict under "module." from DDP, arch, pickled argparse args).
    classifier = _vit(0, classes=5)
    classifier.load_state_dict({**sd, **{k: v for k, v in classifier.state_dict().items() if k.startswith("head.")}})
    files["timm_safetensors"] = tmp_path / "model.safetensors"
    save_file(classifier.state_dict(), str(files["timm_safetensors"]))
    files["timm_pth"] = tmp_path / "timm_state.pth"
    torch.save(classifier.state_dict(), files["timm_pth"])
    files["timm_train"] = tmp_path / "timm_train.pth.tar"
    torch.save({"epoch": 3, "arch": "vit_tiny_patch16_224", "version": 2, "metric": 71.2,
                "state_dict": {f"module.{k}": v for k, v in classifier.state_dict().items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
                "args": argparse.Namespace(model="vit_tiny_patch16_224", lr=0.1, epochs=3)}, files["timm_train"])
    # The reference repo's checkpoint.pth: DDP-wrapped MultiCropWrappers, teacher and student differ.
    dino_head = {"head.mlp.0.weight": torch.randn(32, 192), "head.last_layer.weight_g": torch.ones(64, 1),
                 "head.last_layer.weight_v": torch.randn(64, 32)}

    def wrap(d):
        return {f"module.backbone.{k}": v for k, v in d.items()} | {f"module.{k}": v for k, v in dino_head.items()}

    files["reference_checkpoint"] = tmp_path / "checkpoint.pth"
    torch.save({"teacher": {k.replace("module.", "", 1): v for k, v in wrap(sd).items()},  # teacher: no DDP
                "student": wrap(_backbone_sd(other)), "optimizer": {"state": {}, "param_groups": []}, "epoch": 10,
                "args": argparse.Namespace(arch="vit_tiny", patch_size=8, out_dim=64), "fp16_scaler": None,
                "dino_loss": {"center": torch.zeros(1, 64)}}, files["reference_checkpoint"])
    files["bare_backbone"] = tmp_path / "dino_vittiny8_pretrain.pth"
    torch.save(sd, files["bare_backbone"])
    return files


def _pretrained_student(path) -> tuple:
    """The tiny configured run (ViT-Tiny/8, depth 1, 32 px) with ``model.pretrained=path``: (config, student)."""
    cfg = load_config(None, ["model.arch=vit_tiny_patch16_224", "model.patch_size=8", "model.depth=1",
                             "model.out_dim=64", "data.global_crop_size=32", "logging.progress=none",
                             f"model.pretrained={path}"])
    wrapped, _ = build_student_teacher(cfg.model, 32)
    return cfg, wrapped


@pytest.mark.parametrize("layout", ["export", "timm_safetensors", "timm_pth", "timm_train", "reference_checkpoint",
                                    "bare_backbone"])
def test_every_layout_loads_with_the_sources_outputs(tmp_path, layout):
    source, student = _vit(1), _vit(2)
    path = _layouts(tmp_path, source, student)[layout]
    x = torch.randn(2, 3, 32, 32)
    # The eval CLIs' --weights: the model is built from the file alone (width → arch, patch, depth, grid).
    model, arch = backbone_from_weights(path)
    assert arch == "vit_tiny_patch16_224"
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
    # model.pretrained: into the configured student (a fresh init of other values).
    cfg, wrapped = _pretrained_student(path)
    init_from_pretrained(cfg, wrapped)
    got = wrapped.backbone.state_dict()
    for k, v in _backbone_sd(source).items():
        assert torch.equal(got[k], v), k


def test_reference_checkpoint_uses_the_teacher_and_drops_heads(tmp_path):
    source, student = _vit(1), _vit(2)
    w = read_weights(_layouts(tmp_path, source, student)["reference_checkpoint"])
    assert w.source == "'teacher'" and not any(k.startswith(("head.", "module.", "backbone.")) for k in w.state_dict)
    assert torch.equal(w.state_dict["cls_token"], source.cls_token) and not torch.equal(w.state_dict["cls_token"],
                                                                                          student.cls_token)


def test_position_embedding_of_another_grid_is_resampled_bicubic(tmp_path):
    """A backbone trained at 64 px (8×8 patches) loaded into a 32 px model (4×4): timm's bicubic, antialiased
    resampling of the grid part, the CLS position kept, written out here with torch's interpolate."""
    big = _vit(3, img=64)
    torch.save(_backbone_sd(big), tmp_path / "b.pth")
    cfg, wrapped = _pretrained_student(tmp_path / "b.pth")
    init_from_pretrained(cfg, wrapped)
    pe = big.pos_embed.detach()
    grid = pe[:, 1:].reshape(1, 8, 8, 192).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bicubic", antialias=True, align_corners=False)
    want = torch.cat([pe[:, :1], want.permute(0, 2, 3, 1).reshape(1, 16, 192)], dim=1)
    torch.testing.assert_close(wrapped.backbone.pos_embed.detach(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(wrapped.backbone.blocks[0].attn.qkv.weight, big.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("file_kwargs, expected", [
    (dict(dim_arch="vit_small_patch16_224"), "'cls_token' is [1, 1, 384] in the file, [1, 1, 192] in the model"),
    (dict(depth=2), "keys the model lacks ('blocks.1."),
    (dict(patch=16), "'patch_embed.proj.weight' is [192, 3, 16, 16] in the file, [192, 3, 8, 8] in the model"),
])
def test_a_file_that_does_not_fit_is_one_line_naming_the_mismatch(tmp_path, file_kwargs, expected):
    torch.save(_backbone_sd(_vit(4, **file_kwargs)), tmp_path / "w.pth")
    cfg, wrapped = _pretrained_student(tmp_path / "w.pth")
    with pytest.raises(ConfigError) as exc:
        init_from_pretrained(cfg, wrapped)
    msg = str(exc.value)
    assert expected in msg and "\n" not in msg
    s = {"dim_arch": "vit_tiny_patch16_224", "depth": 1, "patch": 8} | file_kwargs
    assert f"set model.arch={s['dim_arch']} model.patch_size={s['patch']} model.depth={s['depth']}" in msg


def test_unusable_files_are_clear_errors(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"definitely not a checkpoint")
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "resnet.pth")
    torch.save({"teacher": {"module.backbone.cls_token": torch.zeros(1, 1, 8)}, "extra": object}, tmp_path / "obj.pth")
    for name, text in (("junk.pth", "cannot read"), ("resnet.pth", "not a ViT backbone"), ("missing.pth", "does not "
                       "exist"), ("obj.pth", "cannot read")):
        with pytest.raises(CheckpointError, match=text):
            backbone_from_weights(tmp_path / name)


def test_clis_exit_2_without_traceback_on_a_mismatch(tmp_path, tiny_overrides, capsys):
    torch.save(_backbone_sd(_vit(4, dim_arch="vit_small_patch16_224", depth=1)), tmp_path / "s.pth")
    code, err = run_main(tiny_overrides + [f"model.pretrained={tmp_path / 's.pth'}"], capsys)
    assert code == 2 and "error: model.pretrained: " in err and "model.arch=vit_small" in err
    assert "does not fit the model: 'cls_token' is [1, 1, 384]" in err
    with pytest.raises(SystemExit) as exc:
        knn.main(["--weights", str(tmp_path / "s.pth"), "--arch", "vit_tiny_patch16_224", "--train", str(tmp_path),
                  "--val", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "dino-fast-knn: error:" in err and "[1, 1, 384] in the file" in err


def test_pretrained_starts_student_and_teacher_of_a_zero1_run(tmp_path, tiny_overrides):
    """Under ZeRO-1 DeepSpeed keeps its own fp32 copy of the weights: loading after it was built would be undone by
    the first step. Here cls_token is moved far from any init; after two small steps both networks are still next
    to the file's weights."""
    cfg0 = load_config(None, tiny_overrides)
    src, _ = build_student_teacher(cfg0.model, cfg0.data.global_crop_size)
    sd = _backbone_sd(src.backbone)
    sd["cls_token"] = sd["cls_token"] + 3.0
    torch.save(sd, tmp_path / "pre.pth")
    run = tmp_path / "run0"
    train(load_config(None, tiny_overrides + [f"model.pretrained={tmp_path / 'pre.pth'}", "deepspeed.zero_stage=1",
                                              "optim.max_steps=2", "optim.lr=0.0001", f"checkpoint.output_dir={run}"]))
    teacher = torch.load(ckpt_dir(run, 2) / "teacher.pt")
    student = student_state(ckpt_dir(run, 2))
    for k, v in sd.items():
        torch.testing.assert_close(teacher[f"backbone.{k}"], v, rtol=0, atol=2e-3, msg=k)
        torch.testing.assert_close(student[f"backbone.{k}"], v, rtol=0, atol=2e-3, msg=k)
    assert any(not torch.equal(student[f"backbone.{k}"], v) for k, v in sd.items())  # it did train


def _randomise_batchnorm(model: torch.nn.Module) -> None:
    """Running statistics and affine values away from their init, so eval-mode features depend on every buffer."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_released_resnet50_layout_loads_with_torchvisions_features(tmp_path):
    """The reference's dino_resnet50_pretrain.pth is a torchvision resnet50 state dict without ``fc`` (hubconf.py
    loads it into ``resnet50()`` with ``fc = Identity``). Built here from torchvision's own model: timm's resnet50 has
    the same keys, and loads the file strictly with torchvision's features; a classifier's fc.* is dropped."""
    import torchvision

    torch.manual_seed(5)
    tv = torchvision.models.resnet50()
    _randomise_batchnorm(tv)
    sd = {k: v.clone() for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    assert set(sd) == set(timm.create_model("resnet50", num_classes=0).state_dict())
    torch.save(sd, tmp_path / "dino_resnet50_pretrain.pth")
    torch.save(tv.state_dict(), tmp_path / "torchvision_classifier.pth")
    tv.fc = torch.nn.Identity()
    tv.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = tv(x)
        for name in ("dino_resnet50_pretrain.pth", "torchvision_classifier.pth"):
            model, arch = backbone_from_weights(tmp_path / name)
            assert arch == "resnet50" and model.num_features == 2048
            assert _relative(model(x), want) <= 1e-5
    cfg = load_config(None, ["model.arch=resnet50", "model.patch_size=0", "model.depth=0", "model.out_dim=64",
                             "logging.progress=none", f"model.pretrained={tmp_path / 'dino_resnet50_pretrain.pth'}"])
    student, _ = build_student_teacher(cfg.model, 224)
    init_from_pretrained(cfg, student)
    got = student.backbone.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())


def _official_xcit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's XCiT state dict in the official facebookresearch/xcit layout (xcit.py): the position encoder is
    ``pos_embeder``, a class-attention block holds one ``attn.qkv`` with rows [q; k; v]."""
    out = {}
    for k, v in sd.items():
        if ".attn.q." in k and k.startswith("cls_attn_blocks."):
            parts = [sd[k.replace(".attn.q.", f".attn.{n}.")] for n in "qkv"]
            out[k.replace(".attn.q.", ".attn.qkv.")] = torch.cat(parts)
        elif k.startswith("cls_attn_blocks.") and (".attn.k." in k or ".attn.v." in k):
            continue
        else:
            out[k.replace("pos_embed.", "pos_embeder.", 1) if k.startswith("pos_embed.") else k] = v.clone()
    return out


def test_released_xcit_layout_loads_with_timms_features(tmp_path):
    """The reference's dino_xcit_*_pretrain.pth are official-XCiT state dicts (num_classes=0, loaded strictly by
    hubconf.py); the reference's full checkpoint holds them under teacher/module.backbone. Both load into timm's XCiT
    with its features."""
    torch.manual_seed(6)
    source = timm.create_model("xcit_nano_12_p16_224", pretrained=False, num_classes=0, depth=2)
    _randomise_batchnorm(source)
    source.eval()
    official = _official_xcit(source.state_dict())
    assert {"pos_embeder.token_projection.weight", "cls_attn_blocks.0.attn.qkv.weight",
            "cls_attn_blocks.1.attn.qkv.bias"} <= set(official)
    assert not any(".attn.q." in k or k.startswith("pos_embed.") for k in official)
    torch.save(official, tmp_path / "dino_xcit_nano_pretrain.pth")
    torch.save({"teacher": {f"module.backbone.{k}": v for k, v in official.items()}, "epoch": 1},
               tmp_path / "checkpoint.pth")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = source(x)
        for name in ("dino_xcit_nano_pretrain.pth", "checkpoint.pth"):
            model, arch = backbone_from_weights(tmp_path / name)
            assert arch == "xcit_nano_12_p16_224"  # by its width; depth and patch from the file
            assert _relative(model(x), want) <= 1e-5
    cfg = load_config(None, ["model.arch=xcit_nano_12_p16_224", "model.patch_size=0", "model.depth=2",
                             "model.out_dim=64", "logging.progress=none",
                             f"model.pretrained={tmp_path / 'dino_xcit_nano_pretrain.pth'}"])
    student, _ = build_student_teacher(cfg.model, 224)
    init_from_pretrained(cfg, student)
    with torch.no_grad():
        assert _relative(student.backbone.eval()(x), want) <= 1e-5


def test_a_resnet_of_another_depth_is_one_line(tmp_path):
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), tmp_path / "r18.pth")
    cfg = load_config(None, ["model.arch=resnet50", "model.patch_size=0", "model.depth=0", "model.out_dim=64",
                             "logging.progress=none", f"model.pretrained={tmp_path / 'r18.pth'}"])
    student, _ = build_student_teacher(cfg.model, 224)
    with pytest.raises(ConfigError) as exc:
        init_from_pretrained(cfg, student)
    msg = str(exc.value)
    assert "\n" not in msg and "file: ResNet of 512 features, basic blocks [2, 2, 2, 2]" in msg
    assert "model: ResNet of 2048 features, bottleneck blocks [3, 4, 6, 3]" in msg and "set model.arch=resnet18" in msg
