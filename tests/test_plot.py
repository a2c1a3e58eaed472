"""dino-fast-plot: a PNG from a synthetic metrics.jsonl, panels chosen by the keys present, clear CLI errors."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from dino_fast.eval import plot


def _write_metrics(path, steps=30, with_entropy=True):
    lines = []
    for s in range(1, steps + 1):
        rec = {"step": s, "epoch": s // 10, "loss": 8.0 * math.exp(-s / 10) + 1, "lr": 1e-3 * min(1, s / 5),
               "img_per_s": 100 + s, "img_per_s_avg": 95 + s}
        if with_entropy:
            rec["teacher_entropy"] = 5.0 - s / 10
        if s % 10 == 0:
            rec["knn_top1"], rec["knn_top5"] = 20.0 + s, 60.0 + s
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + '\n{"step": 31, "loss": 1.2')  # the line being written when we read
    return path


def test_plot_cli_writes_png_with_all_panels(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    _write_metrics(run / "metrics.jsonl")
    plot.main([str(run)])
    out = run / "metrics.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as im:
        im.load()  # decodes the whole file: a truncated PNG fails here
        assert im.size[0] > 600 and im.size[1] > 600
    assert "loss, k-NN accuracy, throughput, teacher entropy, learning rate" in capsys.readouterr().out


def test_panels_follow_the_keys_present(tmp_path):
    records = plot.read_metrics(_write_metrics(tmp_path / "m.jsonl", with_entropy=False))
    assert len(records) == 30  # the half-written last line is skipped
    panels = plot.plot_metrics({"a": records}, tmp_path / "a.png")
    assert panels == ["loss", "k-NN accuracy", "throughput", "learning rate"]
    only_loss = [{"step": r["step"], "loss": r["loss"]} for r in records]
    assert plot.plot_metrics({"a": only_loss, "b": records[:10]}, tmp_path / "b.png")[0] == "loss"
    with Image.open(tmp_path / "b.png") as im:
        im.load()


def test_plot_cli_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        plot.main([str(tmp_path / "nope")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"no_step": 1}\n')
    with pytest.raises(SystemExit) as exc:
        plot.main([str(tmp_path)])
    assert exc.value.code == 2 and "no JSON records" in capsys.readouterr().err
