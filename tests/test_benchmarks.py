"""The train-step benchmark runs end to end (a smoke run, not a timing) and its results feed the summary table."""

from __future__ import annotations

import json

from benchmarks import bench_train, run_all


def test_bench_train_quick_run_writes_results_the_summary_reads(tmp_path):
    out = tmp_path / "train.json"
    bench_train.main(["--quick", "--providers", "ours,reference", "--steps", "2", "--warmup", "1",
                      "--out", str(out)])
    payload = json.loads(out.read_text())
    by_provider = {r["provider"]: r for r in payload["results"]}
    assert set(by_provider) == {"ours", "reference"} and all("error" not in r for r in by_provider.values())
    ours, ref = by_provider["ours"], by_provider["reference"]
    assert ours["img_per_s"] > 0 and ref["img_per_s"] > 0
    assert abs(ours["speedup_vs_reference"] - ours["img_per_s"] / ref["img_per_s"]) < 1e-9
    assert ours["batch"] == 8 and ours["crops"] == "2x64+4x32"
    piece, ours_cell, ref_cell, ratio = run_all._describe(payload, ours)
    assert piece.startswith("train step vit_tiny_patch16_224 2x64+4x32 B=8 synthetic")
    assert ratio == f"{ours['speedup_vs_reference']:.2f}×" and run_all._describe(payload, ref) is None
