"""The reference's other networks end to end on CPU: a ResNet (SGD with a BatchNorm head, and LARS) and an XCiT train
through the trainer, resume exactly, keep the teacher's BatchNorm in train mode on its own statistics (the EMA averages
parameters only), and evaluate (k-NN, linear probe, export) in eval mode; what a network lacks is one line, exit 2."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from dino_fast.checkpoint import CheckpointError, check_resumable
from dino_fast.config import ModelConfig, load_config, save_config
from dino_fast.eval import attention, export, knn, linear
from dino_fast.eval.weights import load_backbone_from_checkpoint
from dino_fast.models import DINOHead, MultiCropWrapper, arch_family, build_backbone, build_student_teacher
from dino_fast.ops import ema as ema_ops
from dino_fast.teacher import TeacherEMA
from dino_fast.train import train

from runs import ckpt_dir, latest_tag, run_main, student_state

RESNET = ["model.arch=resnet18", "model.patch_size=0", "model.depth=0", "model.drop_path_rate=0.0"]
NETS = {
    # The reference's ResNet-50 recipe at toy size: SGD, wd 1e-4 constant; with the reference's BatchNorm head.
    "resnet-sgd": RESNET + ["optim.name=sgd", "optim.lr=0.03", "optim.weight_decay=1e-4",
                            "optim.weight_decay_end=1e-4", "model.use_bn_in_head=true", "eval.knn_at_start=true"],
    "resnet-lars": RESNET + ["optim.name=lars", "optim.lr=0.3"],
    "xcit": ["model.arch=xcit_nano_12_p16_224", "model.patch_size=0", "model.depth=2"],
}


@pytest.fixture(scope="module")
def runs(tiny_image_root, tmp_path_factory):
    """Per network: a 4-step run (checkpoints at 2 and 4) and the same run stopped at 2 and resumed to 4."""
    from conftest import TINY_OVERRIDES

    root = tmp_path_factory.mktemp("nets")
    out = {}
    for name, net in NETS.items():
        base = TINY_OVERRIDES + [f"data.path={tiny_image_root / 'train'}", "checkpoint.every_steps=2"] + net
        straight, split = root / name / "straight", root / name / "split"
        train(load_config(None, base + [f"checkpoint.output_dir={straight}", "optim.max_steps=4"]))
        split_base = [o for o in base if o != "eval.knn_at_start=true"]
        train(load_config(None, split_base + [f"checkpoint.output_dir={split}", "optim.max_steps=2"]))
        train(load_config(None, split_base + [f"checkpoint.output_dir={split}", "optim.max_steps=4",
                                              "checkpoint.resume=auto"]))
        out[name] = (straight, split)
    return out


@pytest.mark.parametrize("name", list(NETS))
def test_trains_and_resumes_on_the_uninterrupted_trajectory(runs, name):
    straight, split = runs[name]
    losses = [json.loads(line)["loss"] for line in (straight / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 4 and all(0 < x < 20 for x in losses) and len(set(losses)) == 4
    assert latest_tag(split) == "step_00000004"
    a, b = ckpt_dir(straight, 4), ckpt_dir(split, 4)
    teacher_a, teacher_b = torch.load(a / "teacher.pt"), torch.load(b / "teacher.pt")
    student_a, student_b = student_state(a), student_state(b)
    for k in teacher_a:  # parameters and BatchNorm buffers
        torch.testing.assert_close(teacher_b[k], teacher_a[k], rtol=1e-6, atol=1e-7, msg=k)
        torch.testing.assert_close(student_b[k], student_a[k], rtol=1e-6, atol=1e-7, msg=k)
    first = torch.load(ckpt_dir(straight, 2) / "teacher.pt")
    assert any(not torch.equal(first[k], teacher_a[k]) for k in first if k.endswith("weight"))


@pytest.mark.parametrize("name", list(NETS))
def test_teacher_batchnorm_runs_on_its_own_batch_statistics(runs, name):
    """In train mode the teacher's BatchNorm counts one forward per step (the two global crops, one batch) and the
    student's two (globals, locals): 4 and 8 after 4 steps. The running means are the teacher's own (not averaged
    from the student's by the EMA, which would make them a mix of the student's). The k-NN at the start of the
    resnet-sgd run put the teacher in eval mode and back: it still counted all 4 steps."""
    teacher = torch.load(ckpt_dir(runs[name][0], 4) / "teacher.pt")
    student = student_state(ckpt_dir(runs[name][0], 4))
    counters = [k for k in teacher if k.endswith("num_batches_tracked")]
    assert counters, "these networks have BatchNorm"
    for k in counters:
        head = k.startswith("head.")  # the head runs once per step on all crops' features
        assert int(teacher[k]) == 4 and int(student[k]) == (4 if head else 8), k
    means = [k for k in teacher if k.endswith("running_mean")]
    assert all(not torch.equal(teacher[k], student[k]) for k in means)
    assert all(teacher[k].abs().sum() > 0 for k in means)
    assert any(k.startswith("head.mlp.1.") for k in counters) == (name == "resnet-sgd")  # use_bn_in_head


@pytest.mark.parametrize("name, state, decay", [("resnet-sgd", "momentum_buffer", 1e-4), ("resnet-lars", "mu", None)])
def test_the_configured_optimizer_ran_with_the_weight_decay_schedule(runs, name, state, decay):
    ds = torch.load(ckpt_dir(runs[name][0], 4) / "mp_rank_00_model_states.pt", map_location="cpu",
                    weights_only=False)
    opt = ds["optimizer"]
    assert all(set(s) == {state} for s in opt["state"].values())
    wd = [g["weight_decay"] for g in opt["param_groups"]]
    logged = json.loads((runs[name][0] / "metrics.jsonl").read_text().splitlines()[-1])["wd"]
    assert wd == [logged, 0.0] and (decay is None or logged == pytest.approx(decay))


def test_periodic_knn_uses_eval_mode_and_gives_train_mode_back(tiny_image_root, tmp_path):
    cfg = load_config(None, ["model.arch=resnet18", "model.out_dim=64", "model.head_hidden_dim=32",
                             "model.head_bottleneck_dim=16", "model.use_bn_in_head=true", "data.global_crop_size=32",
                             f"data.path={tiny_image_root / 'train'}", "data.num_workers=0", "eval.knn_k=5"])
    torch.manual_seed(0)
    _, teacher = build_student_teacher(cfg.model, 32)
    teacher.train()
    with torch.no_grad():  # running statistics far from a batch's, so eval and train mode give other features
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    buffers = {k: v.clone() for k, v in teacher.state_dict().items() if "running" in k or "num_batches" in k}
    evaluated = copy.deepcopy(teacher.backbone).eval()
    got = knn.periodic_knn(cfg, teacher, torch.device("cpu"), 0, 1)
    assert all(m.training for m in teacher.modules())
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in buffers.items())
    want = knn.evaluate_knn(evaluated, tiny_image_root / "train", tiny_image_root / "val", k_list=(5,), resize=37,
                            crop=32, batch_size=128, num_workers=0, progress=False)
    assert (got["knn_top1"], got["knn_top5"]) == want[5]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(teacher.backbone(x), evaluated(x), atol=1e-3)  # the mode matters here


@pytest.mark.parametrize("name", ["resnet-sgd", "xcit"])
def test_export_knn_and_linear_probe_work_for_the_network(runs, name, tiny_image_root, tmp_path, capsys):
    run = runs[name][0]
    backbone = load_backbone_from_checkpoint(run)
    assert not backbone.training
    out = tmp_path / "backbone.safetensors"
    export.main(["--checkpoint", str(run), "--out", str(out), "--head"])
    model, arch, _ = export.load_exported(out)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), backbone(x), rtol=0, atol=0)
        # The teacher's weights and running statistics, evaluated in eval mode (as the reference's eval scripts).
        sd = torch.load(ckpt_dir(run, 4) / "teacher.pt")
        fresh = build_backbone(arch, 32, depth=2 if name == "xcit" else 0)
        fresh.load_state_dict({k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")})
        torch.testing.assert_close(fresh.eval()(x), model(x), rtol=0, atol=0)
    head_file = out.with_name("backbone_head.safetensors")
    head_kwargs = json.loads(export.read_metadata(head_file)["dino_head_kwargs"])
    assert head_kwargs.get("use_bn", False) == (name == "resnet-sgd") and head_kwargs["in_dim"] == model.num_features
    DINOHead(**head_kwargs).load_state_dict(load_file(head_file))

    report = tmp_path / "knn.json"
    knn.main(["--checkpoint", str(run), "--train", str(tiny_image_root / "train"), "--val",
              str(tiny_image_root / "val"), "--resize", "32", "--crop", "32", "--k", "5", "--workers", "0",
              "--out", str(report)])
    assert 0 <= json.loads(report.read_text())["results"]["5"]["top1"] <= 100
    result = linear.linear_fast(backbone, tiny_image_root / "train", tiny_image_root / "val", lrs=(0.1,), wds=(0.0,),
                                epochs=2, batch_size=32, resize=32, crop=32, num_workers=0, progress=False)
    assert result["best"]["layout"] == "pooled" and result["heads"] == 1
    with torch.no_grad():
        torch.testing.assert_close(linear.block_features(backbone, x, *linear.default_layout(backbone)), backbone(x))
    with pytest.raises(ValueError, match="apply to ViTs"):
        linear.linear_full(backbone, tiny_image_root / "train", tiny_image_root / "val", n_last_blocks=4,
                           avgpool=False, num_workers=0)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        export.main(["--checkpoint", str(run), "--out", str(tmp_path / "hf"), "--format", "transformers"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "not a plain VisionTransformer" in err[0]
    image = next((tiny_image_root / "val").rglob("*.jpg"))
    with pytest.raises(SystemExit) as exc:
        attention.main(["--checkpoint", str(run), "--images", str(image), "--out", str(tmp_path / "a.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "attention maps need a ViT's CLS attention" in err[0]


def test_resnet_exports_to_onnx(runs, tmp_path, capsys):
    run = runs["resnet-lars"][0]
    export.main(["--checkpoint", str(run), "--out", str(tmp_path / "r.onnx"), "--format", "onnx"])
    assert "reloaded with onnx: max relative difference" in capsys.readouterr().out


@pytest.mark.parametrize("extra, expected", [
    (["model.arch=convnext_tiny"], "the trainer takes timm ViTs (vit_small_patch16_224, ...), ResNets"),
    (["model.arch=resnet18", "model.depth=0"], "model.patch_size applies to ViTs and XCiT, not to a ResNet"),
    (RESNET + ["model.packed_crops=true"], "model.packed_crops=true needs a timm VisionTransformer, got ResNet"),
    (["model.arch=xcit_nano_12_p16_224", "model.patch_size=0", "model.packed_crops=true"],
     "model.packed_crops=true needs a timm VisionTransformer, got Xcit"),
    (RESNET + ["eval.attention_every_epochs=1"], "eval.attention_every_epochs needs a ViT's CLS attention"),
    (RESNET + ["optim.name=lars", "deepspeed.zero_stage=1"], "optim.name=lars needs deepspeed.zero_stage=0"),
    (["optim.name=sgd", "train.cuda_graph=true"], "train.cuda_graph=true applies AdamW's decoupled weight decay"),
    (RESNET + ["train.cuda_graph=true"], "train.cuda_graph=true does not capture BatchNorm"),
    (["model.use_bn_in_head=true", "train.cuda_graph=true"], "train.cuda_graph=true does not capture BatchNorm"),
], ids=["unknown-family", "resnet-patch-size", "resnet-packed", "xcit-packed", "resnet-attention", "lars-zero",
        "graph-sgd", "graph-resnet", "graph-bn-head"])
def test_what_a_network_or_optimizer_lacks_is_one_line(tiny_overrides, capsys, extra, expected):
    code, err = run_main(tiny_overrides + extra, capsys)
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and expected in lines[0], err


def test_sgd_under_zero1_is_allowed_by_deepspeed():
    from dino_fast.engine import deepspeed_config

    cfg = load_config(None, ["optim.name=sgd", "deepspeed.zero_stage=1"])
    assert deepspeed_config(cfg, 1, "fp32")["zero_allow_untested_optimizer"] is True
    assert "zero_allow_untested_optimizer" not in deepspeed_config(load_config(None, []), 1, "fp32")


@pytest.mark.parametrize("key, value", [("optim.name", "lars"), ("model.use_bn_in_head", "true")])
def test_resume_refuses_another_optimizer_or_head(tmp_path, key, value):
    folder = tmp_path / "step_00000002"
    folder.mkdir()
    save_config(load_config(None, ["optim.name=sgd"]), folder / "config.yaml")
    torch.save({}, folder / "dino_state.pt")
    with pytest.raises(CheckpointError, match=rf"{key}=.*\(this run: "):
        check_resumable(folder, load_config(None, ["optim.name=sgd", f"{key}={value}"]), 1, 10)
    check_resumable(folder, load_config(None, ["optim.name=sgd"]), 1, 10)


def test_families_pool_their_features_at_every_crop_size():
    assert [arch_family(a) for a in ("vit_small_patch16_224", "resnet50", "xcit_small_12_p16_224")] == \
        ["vit", "resnet", "xcit"]
    with pytest.raises(ValueError, match="try xcit_small_12_p16_224"):
        arch_family("xcit_small_12_p16")  # the reference's (torch.hub) name
    torch.manual_seed(0)
    r50 = build_backbone("resnet50", 224)
    assert r50.num_features == 2048 and type(r50.fc) is torch.nn.Identity
    # torchvision's init (the reference's network): the last BatchNorm of a block is not zeroed as timm's default
    assert all(torch.equal(b.bn3.weight, torch.ones_like(b.bn3.weight)) for b in r50.layer1)
    r18 = build_backbone("resnet18", 32).eval()
    for size in (96, 32, 16):
        assert r18(torch.randn(2, 3, size, size)).shape == (2, 512)
    xcit = build_backbone("xcit_nano_12_p16_224", 32, depth=1).eval()
    for size in (224, 96, 32, 16):  # Fourier position encoding per grid: any multiple of the patch
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(xcit(x), xcit.forward_features(x)[:, 0])  # CLS after the final norm
    model = MultiCropWrapper(xcit, DINOHead(128, 50, hidden_dim=32, bottleneck_dim=16)).eval()
    crops = [torch.randn(3, 3, 32, 32) for _ in range(2)] + [torch.randn(3, 3, 16, 16) for _ in range(3)]
    with torch.no_grad():
        torch.testing.assert_close(model(crops), torch.cat([model.head(xcit(c)) for c in crops]), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("impl", ["foreach", "triton"])
def test_ema_averages_parameters_and_leaves_buffers(monkeypatch, impl):
    """Teacher ← m·teacher + (1 − m)·student for every parameter (float64 reference), BatchNorm buffers untouched,
    also with student convolution weights in channels_last (the fused path leaves them to the foreach lerp)."""
    monkeypatch.setattr(ema_ops, "BLOCK", 16384)  # fewer interpreted programs
    cfg = ModelConfig(arch="xcit_nano_12_p16_224", depth=1, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16,
                      use_bn_in_head=True)
    torch.manual_seed(0)
    student, teacher = build_student_teacher(cfg, 32)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for b in teacher.buffers():
            b.copy_(torch.randint(1, 5, b.shape) if b.dtype == torch.int64 else torch.rand_like(b))
    student.backbone.patch_embed.to(memory_format=torch.channels_last)
    assert not student.backbone.patch_embed.proj[0][0].weight.is_contiguous()
    buffers = {k: v.clone() for k, v in teacher.named_buffers()}
    ema = TeacherEMA(teacher, student, impl=impl)
    want = {n: p.detach().double() for n, p in teacher.named_parameters()}
    s_params = dict(student.named_parameters())
    for m in (0.9, 0.99):
        ema.update(m)
        want = {n: m * t + (1 - m) * s_params[n].detach().double() for n, t in want.items()}
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p.detach().double(), want[n], rtol=1e-6, atol=1e-7, msg=n)
    assert all(torch.equal(b, buffers[k]) for k, b in teacher.named_buffers())
    if impl == "triton":
        assert len(ema._strided[0]) == 4 and ema.flat is not None  # the four patch-embedding convolutions


def test_recipes_are_the_references_commands():
    """resnet50.yaml = README's `--arch resnet50 --optimizer sgd --lr 0.03 --weight_decay 1e-4 --weight_decay_end 1e-4
    --global_crops_scale 0.14 1 --local_crops_scale 0.05 0.14`; xcit_small.yaml = `--arch xcit_small_12_p16`."""
    from runs import REPO

    r50 = load_config(REPO / "dino_fast" / "configs" / "resnet50.yaml")
    assert (r50.model.arch, r50.optim.name, r50.optim.lr, r50.optim.weight_decay, r50.optim.weight_decay_end) == \
        ("resnet50", "sgd", 0.03, 1e-4, 1e-4)
    assert r50.data.global_crops_scale == (0.14, 1.0) and r50.data.local_crops_scale == (0.05, 0.14)
    assert r50.model.drop_path_rate == 0.0 and not r50.model.use_bn_in_head and r50.optim.epochs == 100
    xcit = load_config(REPO / "dino_fast" / "configs" / "xcit_small.yaml")
    assert arch_family(xcit.model.arch) == "xcit" and xcit.optim.name == "adamw" and xcit.model.drop_path_rate == 0.1
    assert timm_name_of_reference("xcit_small_12_p16") == xcit.model.arch


def timm_name_of_reference(name: str) -> str:
    """The reference's torch.hub XCiT name → timm's (what the one-line error suggests)."""
    with pytest.raises(ValueError) as exc:
        arch_family(name)
    return str(exc.value).rsplit("try ", 1)[1]
