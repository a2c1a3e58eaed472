"""Export to transformers and ONNX: trainer checkpoints → the CLI → ``ViTModel.from_pretrained`` / onnxruntime give the
CLS features of the teacher backbone's own forward; unconvertible ViTs, bad requests and missing packages are one
``error:`` line with exit 2. Needs the ``export`` extra (transformers, onnx, onnxscript, onnxruntime)."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import onnxruntime
import pytest
import timm
import timm.models.vision_transformer as timm_vit
import torch
from timm.layers import resample_abs_pos_embed
from transformers import ViTModel

from dino_fast.config import Config, save_config
from dino_fast.eval import export, hf_export
from dino_fast.models import build_student_teacher

# (arch, model.patch_size, model.depth, global crop size): two widths, patch sizes and depths.
SHAPES = [("vit_tiny_patch16_224", 8, 1, 32), ("vit_small_patch16_224", 16, 2, 64)]
# HF vs timm at another resolution: timm resamples the position grid with antialiased bicubic (PyTorch's aa kernel,
# a = -0.5), transformers with plain bicubic (a = -0.75). Measured max |hf - ours| / max |ours| at 1.5x the training
# size on these backbones: 3.3e-3 (ViT-Ti/8) and 4.1e-3 (ViT-S/16) over 5 batches; other sizes in docs/export.md.
HF_OTHER_RES_TOLERANCE = 1e-2


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((theirs - ours).abs().max() / ours.abs().max()).item()


def make_run(tmp_path: Path, arch: str, patch: int, depth: int, size: int) -> tuple[Path, torch.nn.Module]:
    """A run folder as the trainer writes it (config.yaml, checkpoints/step_*/teacher.pt, latest) and its backbone."""
    cfg = Config()
    cfg.model.arch, cfg.model.patch_size, cfg.model.depth = arch, patch, depth
    cfg.model.out_dim, cfg.model.head_hidden_dim, cfg.model.head_bottleneck_dim = 64, 32, 16
    cfg.data.global_crop_size = size
    torch.manual_seed(3)
    _, teacher = build_student_teacher(cfg.model, size)
    with torch.no_grad():  # away from the init: LayerNorm weights ≠ 1, biases ≠ 0, so a swapped key shows
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    torch.save(teacher.state_dict(), ckpt / "teacher.pt")
    save_config(cfg, ckpt / "config.yaml")
    (ckpt.parent / "latest").write_text(ckpt.name + "\n")
    return ckpt.parents[1], teacher.backbone.eval()


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of ``dino-fast-export args``."""
    try:
        export.main(args)
    except SystemExit as exc:
        return int(exc.code), capsys.readouterr().err
    return 0, capsys.readouterr().err


@pytest.mark.parametrize("arch,patch,depth,size", SHAPES)
def test_transformers_vit_model_gives_the_backbone_cls_feature(tmp_path, capsys, monkeypatch, arch, patch, depth,
                                                                size):
    run, backbone = make_run(tmp_path, arch, patch, depth, size)
    out = tmp_path / "hf"
    assert run_cli(["--checkpoint", str(run), "--format", "transformers", "--out", str(out)], capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert (config["image_size"], config["patch_size"], config["num_hidden_layers"]) == (size, patch, depth)
    assert config["hidden_size"] == backbone.embed_dim and config["layer_norm_eps"] == 1e-6
    assert config["hidden_act"] == "gelu"

    hf = ViTModel.from_pretrained(out, add_pooling_layer=False, local_files_only=True).eval()
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        assert rel_err(backbone(x), hf(pixel_values=x).last_hidden_state[:, 0]) <= 1e-5
        # The plain call (with its freshly initialised pooler) gives the same sequence output.
        plain = ViTModel.from_pretrained(out, local_files_only=True).eval()
        assert rel_err(backbone(x), plain(pixel_values=x).last_hidden_state[:, 0]) <= 1e-5

        big = torch.randn(2, 3, size * 3 // 2, size * 3 // 2)
        theirs = hf(pixel_values=big, interpolate_pos_encoding=True).last_hidden_state[:, 0]
        assert rel_err(backbone(big), theirs) <= HF_OTHER_RES_TOLERANCE
        # ... and the whole difference is the resampling: with timm's antialiasing off the two agree again.
        monkeypatch.setattr(timm_vit, "resample_abs_pos_embed",
                            functools.partial(resample_abs_pos_embed, antialias=False))
        assert rel_err(backbone(big), theirs) <= 1e-5


def test_onnx_graph_gives_the_backbone_feature_at_any_batch_size(tmp_path, capsys):
    arch, patch, depth, size = SHAPES[1]
    run, backbone = make_run(tmp_path, arch, patch, depth, size)
    out = tmp_path / "onnx" / "vit.onnx"
    assert run_cli(["--checkpoint", str(run), "--format", "onnx", "--out", str(out)], capsys)[0] == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape[1:], outp.name, outp.shape[1:]) == ("pixel_values", [3, size, size], "features",
                                                                    [backbone.embed_dim])
    assert isinstance(inp.shape[0], str)  # a named (dynamic) batch dimension
    for batch in (2, 5):
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            ours = backbone(x)
        theirs = session.run(["features"], {"pixel_values": x.numpy()})[0]
        assert theirs.shape == (batch, backbone.embed_dim)
        assert rel_err(ours, torch.from_numpy(theirs)) <= 1e-4


@pytest.mark.parametrize("variant,why", [({"init_values": 1e-5}, "layer scale"), ({"reg_tokens": 4}, "4 register")])
def test_vit_variants_without_a_vit_model_form_are_refused(tmp_path, variant, why):
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, depth=1, img_size=32,
                              dynamic_img_size=True, **variant).eval()
    with pytest.raises(export.CheckpointError, match=f"cannot convert to a transformers ViTModel.*{why}"):
        hf_export.export_transformers(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_cli_refuses_a_registers_checkpoint_in_one_line(tmp_path, capsys):
    run, _ = make_run(tmp_path, "vit_small_patch14_reg4_dinov2", 0, 1, 28)
    code, err = run_cli(["--checkpoint", str(run), "--format", "transformers", "--out", str(tmp_path / "hf")], capsys)
    assert code == 2 and err.count("\n") == 1 and "register tokens" in err and "--format onnx" in err


def test_bad_requests_are_one_line_exit_2(tmp_path, capsys):
    run, _ = make_run(tmp_path, *SHAPES[0])
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("")
    cases = {
        ("--format", "keras", "--out", str(tmp_path / "k")): "--format 'keras' is not one of timm, transformers, onnx",
        ("--format", "transformers", "--out", str(full)): "exists and is not empty",
        ("--format", "onnx", "--out", str(tmp_path / "vit")): "must end in .onnx",
        ("--format", "onnx", "--out", str(tmp_path / "v.onnx"), "--head"): "--head writes the DINO head",
        ("--out", str(tmp_path / "vit.bin")): "must end in .safetensors",
    }
    for args, message in cases.items():
        code, err = run_cli(["--checkpoint", str(run), *args], capsys)
        assert (code, err.count("\n")) == (2, 1) and err.startswith("dino-fast-export: error: ") and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "run"]


def test_missing_packages_name_the_extra_and_timm_needs_none_of_them(tmp_path, capsys, monkeypatch):
    run, backbone = make_run(tmp_path, *SHAPES[0])
    for name in ("transformers", "onnx", "onnxscript", "onnxruntime"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    for fmt, name, out in (("transformers", "transformers", "hf"), ("onnx", "onnx", "v.onnx")):
        code, err = run_cli(["--checkpoint", str(run), "--format", fmt, "--out", str(tmp_path / out)], capsys)
        assert code == 2 and err == (f"dino-fast-export: error: --format {fmt} needs the '{name}' package: "
                                     f"pip install -e \".[export]\"\n")
    # The default timm export imports none of them.
    assert run_cli(["--checkpoint", str(run), "--out", str(tmp_path / "vit.safetensors")], capsys)[0] == 0
    model, _, _ = export.load_exported(tmp_path / "vit.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), backbone(x), atol=0, rtol=0)
