"""optim.total_steps: a step budget that becomes whole epochs of the data at hand, and eval.knn_at_end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dino_fast.config import ConfigError, load_config, with_step_budget
from dino_fast.train import train

DEMO = Path(__file__).resolve().parents[1] / "dino_fast" / "configs" / "demo.yaml"


@pytest.mark.parametrize(("images", "batch", "epochs"),
                         [(2400, 32, 4), (2400, 64, 8), (1437, 64, 14), (500, 32, 20), (9000, 32, 1)])
def test_the_budget_becomes_the_nearest_whole_number_of_epochs(images, batch, epochs):
    cfg = load_config(None, ["optim.total_steps=300", "optim.warmup_epochs=1", f"data.batch_size_per_gpu={batch}"])
    steps_per_epoch = images // batch  # the loaders drop the last partial batch
    resolved = with_step_budget(cfg, steps_per_epoch)
    assert resolved.optim.epochs == epochs
    assert abs(resolved.optim.epochs * steps_per_epoch - 300) <= steps_per_epoch / 2  # the nearest whole epochs
    assert cfg.optim.epochs == 100 and resolved.optim.lr == cfg.optim.lr  # a copy; nothing else changes


def test_no_budget_keeps_the_epochs_and_a_budget_under_half_an_epoch_says_what_to_set():
    cfg = load_config(None, ["optim.epochs=7", "optim.warmup_epochs=1"])
    assert with_step_budget(cfg, 10).optim.epochs == 7
    with pytest.raises(ConfigError, match=r"is 3 epoch\(s\) of this data .* fewer than the warm-up's 10"):
        with_step_budget(load_config(None, ["optim.total_steps=300"]), 100)  # the default 10 warm-up epochs
    with pytest.raises(ConfigError, match=r"optim.total_steps=300 is less than half an epoch .*optim.max_steps=300"):
        with_step_budget(load_config(None, ["optim.total_steps=300"]), 1000)


def test_epochs_on_the_command_line_of_a_budget_recipe_is_an_error_that_says_what_to_add():
    with pytest.raises(ConfigError, match="add optim.total_steps=0 to train optim.epochs epochs"):
        load_config(DEMO, ["optim.epochs=2"])
    assert load_config(DEMO, ["optim.epochs=2", "optim.total_steps=0"]).optim.epochs == 2
    assert load_config(DEMO, ["optim.total_steps=100"]).optim.total_steps == 100


def test_a_run_with_a_budget_trains_that_many_steps_and_measures_the_end(tiny_overrides, tmp_path):
    # 96 images, batch 8: 12 steps an epoch; 36 steps = 3 epochs (the recipe's optim.epochs=2 is replaced).
    cfg = load_config(None, tiny_overrides + ["optim.total_steps=36", "eval.knn_at_start=true", "eval.knn_at_end=true",
                                              "eval.knn_every_epochs=0", "checkpoint.every_steps=0"])
    train(cfg)
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 37))
    assert [r["step"] for r in records if "knn_top1" in r] == [0, 36]
    assert load_config(run / "config.yaml").optim.epochs == 3  # the resolved run config is what was saved
