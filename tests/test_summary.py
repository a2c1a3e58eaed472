"""The end-of-run summary: numbers read back from a metrics file, the lines a newcomer reads, the plot it draws."""

import json
import math

from dino_fast.eval.summary import run_summary, summarise_run


def _records():
    rows = [{"step": 0, "epoch": 0, "knn_top1": 50.0, "knn_top5": 90.0}]
    rows += [{"step": s, "epoch": 0, "loss": 9.0 - s / 10, "teacher_entropy": 5.0 - s / 20} for s in range(1, 31)]
    rows.append({"step": 30, "epoch": 0, "knn_top1": 71.5, "knn_top5": 97.0})
    return rows


def test_run_summary_reads_start_and_end_windows():
    s = run_summary(_records(), out_dim=4096, window=10)
    assert s["steps"] == 30 and s["knn_start"] == 50.0 and s["knn_end"] == 71.5
    assert math.isclose(s["loss_start"], sum(9.0 - i / 10 for i in range(1, 11)) / 10)  # steps 1-10
    assert math.isclose(s["loss_end"], sum(9.0 - i / 10 for i in range(21, 31)) / 10)  # steps 21-30
    assert math.isclose(s["entropy_end"], sum(5.0 - i / 20 for i in range(21, 31)) / 10)
    assert math.isclose(s["ln_k"], math.log(4096))


def test_summarise_run_prints_the_learning_and_draws_the_plot(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    lines = summarise_run(run / "metrics.jsonl", out_dim=4096)
    text = "\n".join(lines)
    assert "50.00% at the start → 71.50% now (+21.50 points)" in text
    assert "8.45 → 6.45 nats" in text and "ln K = 8.32" in text
    assert (run / "metrics.png").stat().st_size > 10_000 and f"metrics plot: {run / 'metrics.png'}" in text


def test_summarise_run_without_metrics_says_so(tmp_path):
    assert summarise_run(tmp_path / "missing.jsonl", out_dim=16)[0].startswith("no summary: metrics file")
