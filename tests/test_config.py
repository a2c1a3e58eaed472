from pathlib import Path

import pytest
import yaml

from dino_fast.config import Config, ConfigError, from_dict, load_config, save_config, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "dino_fast" / "configs"


def test_defaults_are_the_reference_values():
    cfg = Config()
    assert cfg.model.out_dim == 65536 and cfg.model.drop_path_rate == 0.1
    assert cfg.data.batch_size_per_gpu == 64 and cfg.data.local_crops_number == 8
    assert cfg.data.global_crops_scale == (0.4, 1.0) and cfg.data.local_crops_scale == (0.05, 0.4)
    assert cfg.optim.lr == 0.0005 and cfg.optim.min_lr == 1e-6 and cfg.optim.warmup_epochs == 10
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.optim.clip_grad) == (0.04, 0.4, 3.0)
    assert cfg.dino.momentum_teacher == 0.996 and cfg.dino.student_temp == 0.1 and cfg.dino.center_momentum == 0.9


def test_overrides_are_type_checked_and_applied():
    cfg = load_config(None, ["optim.lr=1e-3", "data.local_crops_number=10", "model.norm_last_layer=false",
                             "data.global_crops_scale=[0.3, 1]", "optim.epochs=17"])
    assert cfg.optim.lr == 0.001 and cfg.data.local_crops_number == 10 and cfg.model.norm_last_layer is False
    assert cfg.data.global_crops_scale == (0.3, 1.0) and cfg.optim.epochs == 17


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.lrr=1", "optim.lrr"),
        ("nosection.x=1", "nosection.x"),
        ("data.batch_size_per_gpu=abc", "data.batch_size_per_gpu"),
        ("data.batch_size_per_gpu=1.5", "data.batch_size_per_gpu"),
        ("model.norm_last_layer=3", "model.norm_last_layer"),
        ("data.backend=pil", "data.backend"),
        ("deepspeed.zero_stage=3", "zero_stage"),
        ("optim=1", "optim"),
        ("optim.lr", "key=value"),
        ("data.blur_sigma=[2,0.1]", "data.blur_sigma"),
        ("data.blur_sigma=[0,1]", "data.blur_sigma"),
        ("data.solarize_p=[0,1.5,0]", "data.solarize_p are probabilities"),
        ("data.solarize_p=[0,0.2]", "data.solarize_p"),
        ("data.jitter_p=-0.1", "data.jitter_p"),
        ("data.jitter=[0.4,0.4,0.2,0.7]", "hue ≤ 0.5"),
        ("dino.sinkhorn_queue=-1", "dino.sinkhorn_queue must be ≥ 0"),
        ("dino.momentum_teacher_end=1.5", "dino.momentum_teacher_end must lie in"),
        ("dino.sinkhorn_queue=64", "dino.sinkhorn_queue needs dino.centering=sinkhorn_knopp"),
        ("dino.centering=sinkhorn_knopp dino.sinkhorn_queue=64 train.cuda_graph=true", "set dino.sinkhorn_queue=0"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(None, override.split(" "))


def test_recipes_load_and_hold_overrides_only():
    defaults = to_dict(Config())
    for recipe in CONFIGS.glob("*.yaml"):
        load_config(recipe)
        tree = yaml.safe_load(recipe.read_text())
        for section, values in tree.items():
            for key, value in values.items():
                default = defaults[section][key]
                assert value != default, f"{recipe.name}: {section}.{key}={value!r} repeats the default"
    paper = load_config(CONFIGS / "vit_s16_in1k.yaml")
    assert paper.data.local_crops_number == 10 and paper.dino.teacher_temp == 0.07 and paper.optim.epochs == 300
    assert paper.model.norm_last_layer is False and paper.dino.warmup_teacher_temp_epochs == 30


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "demo.yaml", ["optim.lr=0.01"])
    save_config(cfg, tmp_path / "c.yaml")
    again = from_dict(yaml.safe_load((tmp_path / "c.yaml").read_text()))
    assert again == cfg


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
