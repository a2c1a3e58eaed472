"""Export round trips: backbone → safetensors → plain ``timm.create_model`` (strict) with equal outputs; a trainer
checkpoint folder → the CLI → timm and the DINO head; k-NN through --checkpoint equals k-NN through --weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from dino_fast.config import Config, save_config
from dino_fast.eval import export, knn, weights
from dino_fast.models import DINOHead, build_student_teacher


def _tiny_backbone() -> torch.nn.Module:
    torch.manual_seed(1)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2, img_size=32,
                             dynamic_img_size=True, global_pool="token").eval()


def test_export_backbone_loads_in_timm_with_equal_outputs(tmp_path):
    source = _tiny_backbone()
    kwargs = {"img_size": 32, "dynamic_img_size": True, "global_pool": "token", "depth": 2}
    path = tmp_path / "vit.safetensors"
    call = export.export_backbone(source, "vit_tiny_patch16_224", path, model_kwargs=kwargs)
    assert "pretrained_cfg_overlay=dict(file=" in call and "depth=2" in call and "img_size=32" in call

    # The documented user path: timm loads the file strictly (missing/unexpected keys would raise).
    # custom_load=False: timm 1.0.29 marks this arch's default weights as a JAX .npz with a custom loader.
    loaded = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0, depth=2, img_size=32,
                               dynamic_img_size=True,
                               pretrained_cfg_overlay=dict(file=str(path), custom_load=False, num_classes=0)).eval()
    result = loaded.load_state_dict(load_file(path), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
        # dynamic_img_size survives: a 48 px input (local-crop-like size) runs and matches too.
        x48 = torch.randn(2, 3, 48, 48)
        assert torch.equal(loaded(x48), source(x48))
    meta = export.read_metadata(path)
    assert meta["arch"] == "vit_tiny_patch16_224" and json.loads(meta["timm_kwargs"]) == kwargs

    # The printed call is valid Python that rebuilds the same model.
    rebuilt = eval(call, {"timm": timm}).eval()  # noqa: S307 - our own generated text
    with torch.no_grad():
        assert torch.equal(rebuilt(x), source(x))
    cfg = timm.data.resolve_data_config(model=rebuilt)
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["interpolation"] == "bicubic"


def test_export_backbone_rejects_mismatched_arch_and_suffix(tmp_path):
    source = _tiny_backbone()
    with pytest.raises(export.CheckpointError, match="do not fit timm 'vit_small_patch16_224'"):
        export.export_backbone(source, "vit_small_patch16_224", tmp_path / "x.safetensors",
                               model_kwargs={"img_size": 32, "depth": 2})
    with pytest.raises(export.CheckpointError, match=".safetensors"):
        export.export_backbone(source, "vit_tiny_patch16_224", tmp_path / "x.pt", model_kwargs={})
    assert not list(tmp_path.iterdir())


def make_run(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A run folder in the trainer's layout: <run>/config.yaml, checkpoints/step_*/{teacher.pt,config.yaml}, latest."""
    cfg = Config()
    cfg.model.arch, cfg.model.patch_size, cfg.model.depth = "vit_tiny_patch16_224", 8, 2
    cfg.model.out_dim, cfg.model.head_hidden_dim, cfg.model.head_bottleneck_dim = 64, 32, 16
    cfg.data.global_crop_size = 32
    torch.manual_seed(2)
    _, teacher = build_student_teacher(cfg.model, cfg.data.global_crop_size)
    with torch.no_grad():  # make the teacher differ from any fresh init
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    torch.save(teacher.state_dict(), ckpt / "teacher.pt")
    save_config(cfg, ckpt / "config.yaml")
    save_config(cfg, run / "config.yaml")
    (run / "checkpoints" / "latest").write_text("step_00000002\n")
    return run, teacher.eval()


def test_export_cli_from_run_folder_with_head(tmp_path, capsys):
    run, teacher = make_run(tmp_path)
    out = tmp_path / "out" / "teacher.safetensors"
    export.main(["--checkpoint", str(run), "--out", str(out), "--head"])
    printed = capsys.readouterr().out
    assert "timm.create_model('vit_tiny_patch16_224', pretrained=True" in printed and "patch_size=8" in printed

    model, arch, kwargs = export.load_exported(out)
    assert arch == "vit_tiny_patch16_224" and kwargs["patch_size"] == 8 and kwargs["img_size"] == 32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), teacher.backbone(x), atol=0, rtol=0)

    head_path = out.with_name("teacher_head.safetensors")
    head_kwargs = json.loads(export.read_metadata(head_path)["dino_head_kwargs"])
    head = DINOHead(**head_kwargs)
    head.load_state_dict(load_file(head_path), strict=True)
    feats = torch.randn(4, head_kwargs["in_dim"])
    with torch.no_grad():
        torch.testing.assert_close(head(feats), teacher.head(feats), atol=0, rtol=0)


def test_export_cli_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        export.main(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "a.safetensors")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        export.main(["--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "a.safetensors")])
    assert exc.value.code == 2 and "not a dino_fast checkpoint" in capsys.readouterr().err


def test_knn_cli_checkpoint_and_exported_weights_agree(tmp_path):
    run, teacher = make_run(tmp_path)
    exported = tmp_path / "w.safetensors"
    export.main(["--checkpoint", str(run / "checkpoints" / "step_00000002"), "--out", str(exported)])
    for split, n in (("train", 4), ("val", 2)):
        for ci, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
            (tmp_path / split / str(ci)).mkdir(parents=True)
            for i in range(n):
                shade = tuple(min(255, c + 9 * i + 4 * (split == "val")) for c in colour)
                Image.new("RGB", (40, 36), shade).save(tmp_path / split / str(ci) / f"{i}.png")
    common = ["--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"), "--k", "1", "3", "20",
              "--resize", "32", "--crop", "32", "--workers", "0", "--device", "cpu"]
    knn.main(["--checkpoint", str(run), "--out", str(tmp_path / "a.json"), *common])
    knn.main(["--weights", str(exported), "--out", str(tmp_path / "b.json"), *common])
    a = json.loads((tmp_path / "a.json").read_text())["results"]
    b = json.loads((tmp_path / "b.json").read_text())["results"]
    assert a == b and set(a) == {"1", "3", "20"}
    assert a["1"]["top1"] == 100.0  # near shades of one colour are nearest neighbours
    # The checkpoint loader builds the same network as the teacher it was saved from.
    backbone = weights.load_backbone_from_checkpoint(run)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), teacher.backbone(x), atol=0, rtol=0)
