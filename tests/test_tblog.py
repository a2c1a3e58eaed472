"""logging.tensorboard=true in a real (tiny) training run: every number of metrics.jsonl, read back with
TensorBoard's own event reader, and the periodic attention PNG, the same pixels in the run folder and in TensorBoard."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dino_fast.config import load_config
from dino_fast.train import train


def test_tensorboard_holds_every_metric_and_the_attention_maps(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    train(load_config(None, tiny_overrides + [
        f"checkpoint.output_dir={run}", "optim.epochs=1", "logging.tensorboard=true", "eval.knn_every_epochs=1",
        "eval.knn_at_start=true", "eval.attention_every_epochs=1", "eval.attention_images=3"]))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 13))  # 96 images / batch 8

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    want: dict[str, dict[int, float]] = {}
    for r in records:
        for k, v in r.items():
            if k not in ("step", "time"):
                want.setdefault(k, {})[r["step"]] = v
    assert {"loss", "lr", "img_per_s", "teacher_entropy", "knn_top1", "knn_top5", "epoch"} <= set(want)
    assert set(acc.Tags()["scalars"]) == set(want)
    for tag, by_step in want.items():
        events = acc.Scalars(tag)
        assert {e.step for e in events} == set(by_step), tag
        for e in events:
            assert e.value == pytest.approx(by_step[e.step], rel=1e-6, abs=1e-6), (tag, e.step)
    assert [e.step for e in acc.Scalars("knn_top1")] == [0, 12]

    png = run / "attention" / "step_00000012.png"
    saved = np.asarray(Image.open(png).convert("RGB"))
    assert saved.shape == (3 * 2 * 128, 4 * 128, 3)  # 3 images × (heat row, mask row); image + 3 heads, 32→128 px
    (image,) = acc.Images("attention")
    assert image.step == 12 and (image.width, image.height) == (saved.shape[1], saved.shape[0])
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB")),
                                  saved)
