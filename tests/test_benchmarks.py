"""The train-step benchmark runs end to end (a smoke run, not a timing) and its results feed the summary table; the
step profile's numbers match independent counts; the summary keeps the newest row per piece and `make bench` writes
only into its untracked folder; the recipe check's rows and table (docs/small-data.md) match its results file."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import bench_profile, bench_train, run_all
from benchmarks.common import RESULTS_DIR, SCHEMA, Record, speedup
from benchmarks.research import recipe_check
from benchmarks.research.loss_parts import loss_parts
from benchmarks.steps import OursStep, ReferenceStep, bench_config, synthetic_crops
from dino_fast.config import ModelConfig
from dino_fast.loss import DINOLoss
from dino_fast.models import build_student_teacher


def flat(row: dict) -> dict:
    """A record row with its ``extra`` fields beside the schema's."""
    return {**row["extra"], **{k: v for k, v in row.items() if k != "extra"}}


def test_bench_train_quick_run_writes_results_the_summary_reads(tmp_path):
    out = tmp_path / "train.json"
    bench_train.main(["--quick", "--providers", "ours,reference", "--steps", "2", "--warmup", "1",
                      "--out", str(out)])
    payload = json.loads(out.read_text())
    by_provider = {r["provider"]: r for r in payload["rows"]}
    assert set(by_provider) == {"ours", "reference"} and all(r["error"] is None for r in by_provider.values())
    ours, ref = by_provider["ours"], by_provider["reference"]
    ours_speedup = speedup(ours, payload["rows"])
    ours, ref = flat(ours), flat(ref)
    assert ours["img_per_s"] > 0 and ref["img_per_s"] > 0
    assert abs(ours_speedup - ours["img_per_s"] / ref["img_per_s"]) < 1e-9
    assert ours["batch"] == 8 and ours["crops"] == "2x64+4x32"
    piece, ours_cell, ref_cell, ratio = run_all._describe(payload, by_provider["ours"])
    assert piece.startswith("train step vit_tiny_patch16_224 2x64+4x32 B=8 synthetic")
    assert ratio == f"{ours_speedup:.3g}×" and run_all._describe(payload, by_provider["reference"]) is None


def test_bench_train_quick_batch_sweep_of_the_new_variants(tmp_path):
    """The decision run's shape on CPU: a batch sweep over the packed and whole-step-graph variants and the
    reference; the graph is refused on CPU as one recorded error row, and the fastest-variant table is the maximum
    of our rows at each batch."""
    out = tmp_path / "sweep.json"
    bench_train.main(["--quick", "--batches", "4,8", "--providers", "ours,ours-packed,ours-graph,reference",
                      "--steps", "2", "--warmup", "1", "--out", str(out)])
    payload = json.loads(out.read_text())
    raw = {(r["provider"], r["extra"]["batch"]): r for r in payload["rows"]}
    rows = {key: flat(r) for key, r in raw.items()}
    assert set(rows) == {(p, b) for p in ("ours", "ours-packed", "ours-graph", "reference") for b in (4, 8)}
    for b in (4, 8):
        assert "needs a CUDA GPU" in rows["ours-graph", b]["error"]
        packed = rows["ours-packed", b]
        assert "packed crops" in packed["describe"] and packed["batch"] == b and packed["img_per_s"] > 0
        ratio = packed["img_per_s"] / rows["reference", b]["img_per_s"]
        assert speedup(raw["ours-packed", b], payload["rows"]) == pytest.approx(ratio)
    fastest = {f["batch"]: f for f in payload["fastest"]}
    assert set(fastest) == {4, 8}
    for b, f in fastest.items():
        ours = {p: rows[p, b]["img_per_s"] for p in ("ours", "ours-packed")}
        assert f["fastest"] == max(ours, key=ours.get) and f["img_per_s"] == max(ours.values())
        assert f["vs_reference"] == pytest.approx(f["img_per_s"] / rows["reference", b]["img_per_s"])


class _AtenCalls(TorchDispatchMode):
    """Counts the aten ops that reach the dispatcher's Python key (below autograd and every implicit decomposition)."""

    def __init__(self):
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


def test_bench_profile_quick_numbers_match_independent_counts(tmp_path):
    """The quick CPU profile of ours and the reference, checked against a dispatch-mode count of one step and the
    reference model's parameter count (its clip syncs once per parameter with a gradient).

    The two op counts see the same calls once views/metadata ops are left out (equal here). They
    differ only in names the test ignores: under a dispatch mode autograd accumulates some gradients out of place
    (``add`` instead of ``add_``, the sum is the same), and reshape and detach take other view ops."""
    out = tmp_path / "profile.json"
    bench_profile.main(["--quick", "--host-floor", "also", "--out", str(out)])
    payload = json.loads(out.read_text())
    by_provider = {r["provider"]: flat(r) for r in payload["rows"] if r["mode"] == "measured"}
    floor = {r["provider"]: flat(r) for r in payload["rows"] if r["mode"] == "host_floor"}
    # The host floor runs the same ops (that is what makes it the floor of this step), with less arithmetic.
    assert set(floor) == set(by_provider) and all(r["error"] is None and r["width"] == 48 for r in floor.values())
    for provider, r in floor.items():
        assert abs(r["aten_ops"] - by_provider[provider]["aten_ops"]) <= 0.01 * r["aten_ops"], provider
        assert r["batch"] == 1 and r["crops"] == "2x32+4x16"
    assert set(by_provider) == {"ours", "reference"} and all(r["error"] is None for r in by_provider.values())
    ours, ref = by_provider["ours"], by_provider["reference"]
    assert payload["method"] and payload["environment"]["device_type"] == "cpu"

    # Every train_step range appears once per profiled step; together they cover most of the step, never more.
    phases = ours["phases"]
    assert set(phases) == set(bench_profile.PHASES)
    assert all(p["ranges"] == ours["steps"] == 2 and p["host_ms"] > 0 for p in phases.values())
    phase_ms = sum(p["host_ms"] for p in phases.values())
    assert 0.5 * ours["host_ms_profiled"] < phase_ms <= ours["host_ms_profiled"] <= ours["wall_ms_profiled"]["median"]
    assert sum(p["aten_ops"] for p in phases.values()) <= ours["aten_ops"]

    # The same steps, counted independently: one step (after the bench's two warm-up steps) under a dispatch mode.
    device = torch.device("cpu")
    counts, steps = {}, {}
    for provider, cls in (("ours", OursStep), ("reference", ReferenceStep)):
        cfg = bench_config("vit_tiny_patch16_224", 8, 4, 64, 32, 4096, device,
                           ["model.depth=2", "model.patch_size=16"])
        step = steps[provider] = cls(cfg, device)
        crops = synthetic_crops(cfg, device)
        step(crops)
        step(crops)
        with _AtenCalls() as mode:
            step(crops)
        counts[provider] = mode.calls
    for provider, r in by_provider.items():
        calls = counts[provider]
        real = sum(n for name, n in calls.items()
                   if name.startswith("aten::") and name.removeprefix("aten::") not in bench_profile.METADATA_OPS)
        assert abs(r["aten_ops"] - real) <= 0.01 * real, (provider, r["aten_ops"], real)
        assert r["local_scalar_dense"] == r["host_syncs"] == calls["aten::_local_scalar_dense"]

    # The reference clips with one host sync per parameter that has a gradient; ours clips without any.
    student = steps["reference"].student
    with_grad = sum(p.grad is not None for p in student.parameters())
    assert with_grad == sum(p.requires_grad for p in student.parameters()) > 0
    assert ref["host_syncs"] >= with_grad
    assert ours["host_syncs"] <= ref["host_syncs"] - with_grad
    assert phases["dino:clip"]["host_syncs"] == 0
    # Ours' one sync per step is the health metrics' .tolist(), which on a CPU tensor dispatches no op.
    assert ours["host_syncs"] <= 1


def test_bench_profile_device_timeline_arithmetic():
    """The CUDA half of the analysis on a hand-made two-step timeline of real FunctionEvents (µs): overlapping
    kernels count once, the GPU-side copy of a record_function range is not a kernel, kernels count in the phase
    their launching op started in (here on another thread, as backward kernels do), the idle gap after a sync."""
    def ev(name, start, end, thread=1, device=DeviceType.CPU, annotation=False):
        return FunctionEvent(id=0, name=name, thread=thread, start_us=start, end_us=end, device_type=device,
                             is_user_annotation=annotation)

    gpu = DeviceType.CUDA
    loss_op, bwd_op = ev("aten::mm", 6, 8), ev("aten::mm", 112, 114, thread=2)
    loss_op.append_kernel("gemm", 0, 35.0)
    bwd_op.append_kernel("gemm_bwd", 0, 130.0)
    events = [
        ev("bench:step", 0, 60), ev("dino:loss", 5, 55), loss_op, ev("cudaLaunchKernel", 7, 7.5),
        ev("cudaLaunchKernel", 7.5, 8), ev("cudaStreamSynchronize", 40, 50),
        ev("bench:step", 100, 160), ev("dino:backward", 101, 150), bwd_op, ev("cudaLaunchKernel", 113, 114),
        ev("bench:drain", 160, 250),
        ev("gemm", 10, 30, device=gpu), ev("gemm", 20, 45, device=gpu), ev("Memcpy DtoH (Device -> Pinned)", 45, 47,
                                                                           device=gpu),
        ev("softmax", 55, 90, device=gpu), ev("dino:loss", 10, 90, device=gpu, annotation=True),
        ev("add", 95, 105, device=gpu),  # runs across the step boundary
        ev("gemm_bwd", 110, 240, device=gpu),
    ]
    r = bench_profile.analyse(events, 2, device_trace=True, with_phases=True)
    ms = lambda us: pytest.approx(us / 1e3)  # noqa: E731
    # step 1: window [0, 100), busy ∪(10–45, 45–47, 55–90, 95–100) = 77; step 2: [100, 250), ∪(100–105, 110–240) = 135.
    assert r["gpu_busy_ms"] == ms((77 + 135) / 2)
    assert r["gpu_idle_share"] == pytest.approx(((1 - 77 / 100) + (1 - 135 / 150)) / 2)
    assert r["wall_ms_profiled"]["mean"] == ms(250 / 2) and r["host_ms_profiled"] == ms(60)
    assert r["device_kernels"] == (4 + 1) / 2 and r["d2h_copies"] == 0.5 and r["kernel_launch_calls"] == 1.5
    assert r["host_syncs"] == 0.5 and r["sync_wait_ms"] == ms(10 / 2) and r["idle_after_sync_ms"] == ms(5 / 2)
    assert r["device_ms_sum"] == ms((35 + 130) / 2)
    assert r["top_kernels"][0] == ["gemm_bwd", ms(130 / 2), 0.5]
    ph = r["phases"]
    assert ph["dino:loss"]["device_ms"] == ms(35 / 2) and ph["dino:backward"]["device_ms"] == ms(130 / 2)
    assert ph["dino:loss"]["host_ms"] == ms(50 / 2) and ph["dino:loss"]["host_syncs"] == 0.5
    assert ph["dino:backward"]["kernels"] == 0.5 and ph["dino:clip"]["ranges"] == 0 and ph["dino:clip"]["host_ms"] == 0


def test_readme_recipe_table_and_demo_numbers_match_the_results_file():
    """docs/small-data.md's recipe table is the one recipe_check prints from its results file, and the numbers the
    README's introduction gives for `make demo` are the current recipe's demo row (first recipe of the file)."""
    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text()
    docs = (repo / "docs/small-data.md").read_text()
    payload = json.loads((repo / "benchmarks/results/recipe_check_cpu.json").read_text())
    assert payload["schema"] == SCHEMA and all(r["name"] == recipe_check.NAME for r in payload["rows"])
    rows = payload["rows"]
    block = docs.split(recipe_check.START + "\n")[1].split("\n" + recipe_check.END)[0]
    assert block == recipe_check.markdown_table(rows)
    demo = next(r for r in rows if r["mode"] == "demo")["extra"]
    intro = " ".join(readme.split("## Training")[0].split())
    assert f"{demo['knn_before']:.2f}% for the random network → {demo['knn_after']:.2f}% after" in intro
    assert f"the loss from {demo['loss_first10']:.2f} to {demo['loss_last10']:.2f} nats" in intro


def _record(path: Path, date: str, ours_ms: float, reference_ms: float = 10.0) -> None:
    """A results file with one headline row (ours) and its baseline (reference), measured on ``date``."""
    row = {"name": "DINO loss", "shape": "B=8", "mode": "fwd+bwd", "peak_memory_bytes": None, "device": "cpu",
           "commit": None, "date": date, "error": None, "extra": {}}
    path.write_text(json.dumps({"schema": SCHEMA, "benchmark": "dino_loss", "rows": [
        {**row, "provider": "reference", "p20_ms": reference_ms, "p50_ms": reference_ms, "p80_ms": reference_ms,
         "baseline": None, "headline": False},
        {**row, "provider": "ours", "p20_ms": ours_ms, "p50_ms": ours_ms, "p80_ms": ours_ms,
         "baseline": {"provider": "reference", "mode": "fwd+bwd"}, "headline": True}]}))


def test_summary_keeps_the_newest_row_per_piece_and_device(tmp_path):
    """A piece measured again replaces its older row, whichever file sorts first; another device keeps its own."""
    _record(tmp_path / "a_new.json", "2026-11-28T10:00:00+00:00", ours_ms=2.0)
    _record(tmp_path / "b_old.json", "2026-11-27T10:00:00+00:00", ours_ms=5.0)
    rows = run_all.summary_rows(tmp_path)
    assert [(r[1], r[3], r[5]) for r in rows] == [("2026-11-28", "2 ms", "5×")]
    gpu = json.loads((tmp_path / "b_old.json").read_text())
    for r in gpu["rows"]:
        r["device"] = "gpu"
    (tmp_path / "c_gpu.json").write_text(json.dumps(gpu))
    assert [(r[0], r[1]) for r in run_all.summary_rows(tmp_path)] == [("cpu", "2026-11-28"), ("gpu", "2026-11-27")]
    # The tracked results: one row per piece and device, e.g. the CPU train step with the torch loader, measured on
    # 2026-11-27 and again on 2026-11-28, keeps the second.
    tracked = run_all.summary_rows(RESULTS_DIR)
    assert len({(r[0], r[2]) for r in tracked}) == len(tracked)
    step = [r for r in tracked if r[2] == "train step vit_tiny_patch16_224 2x64+4x32 B=8 torch"]
    assert [r[1] for r in step] == ["2026-11-28"]


@pytest.mark.slow
def test_make_bench_writes_only_into_its_untracked_folder(tmp_path, monkeypatch, capsys):
    """`make bench` (run_all's default) measures into benchmarks/results/local/, which git ignores, and prints the
    table; no tracked file (the README, the tracked results) changes. One quick benchmark stands for all six."""
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.delenv("OUT", raising=False)
    assert run_all.LOCAL == RESULTS_DIR / "local"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(run_all.LOCAL / "x.json")], cwd=repo)
    assert ignored.returncode == 0, "benchmarks/results/local/ must be git-ignored"
    tracked = subprocess.run(["git", "ls-files", "README.md", "benchmarks/results"], cwd=repo, capture_output=True,
                             text=True, check=True).stdout.split()

    def contents() -> dict[str, bytes]:
        return {f: (repo / f).read_bytes() for f in tracked if (repo / f).exists()}

    before = contents()
    monkeypatch.setattr(run_all, "LOCAL", tmp_path / "local")
    monkeypatch.setattr(run_all, "BENCHES", ("bench_augment",))
    run_all.main(["--quick"])
    assert contents() == before
    record = json.loads((tmp_path / "local" / "augment_cpu.json").read_text())
    assert record["schema"] == SCHEMA and (tmp_path / "local" / "summary.md").exists()
    assert "photometric augmentation" in capsys.readouterr().out


def test_recipe_check_records_a_failed_run_as_an_error_row(tmp_path):
    """A run whose trainer fails is a row of the record schema with its error (the other sets still run), and the
    table says so in its cell."""
    record = Record("recipe_check", torch.device("cpu"), str(tmp_path / "recipe.json"))
    row = recipe_check.run_one(record, "broken", "demo", tmp_path / "data", tmp_path / "runs", ["no_such.key=1"])
    assert row["error"] and "no_such" in row["error"] and row["p50_ms"] is None
    assert (row["name"], row["provider"], row["mode"]) == ("recipe", "broken", "demo")
    assert row["extra"]["overrides"] == ["no_such.key=1"] and row["extra"]["role"] == "tuning"
    assert "| demo (tuning) | - | failed" in recipe_check.markdown_table(record.rows)


def test_loss_parts_mean_is_the_dino_loss_and_a_student_equal_to_its_teacher_sits_on_the_floor():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="vit_tiny_patch16_224", depth=1, patch_size=8, out_dim=96, head_hidden_dim=32,
                      head_bottleneck_dim=16, drop_path_rate=0.0)
    student, teacher = build_student_teacher(cfg, img_size=32)
    student.eval()
    crops = [torch.randn(6, 3, 32, 32) for _ in range(2)] + [torch.randn(6, 3, 16, 16) for _ in range(3)]
    parts = loss_parts(student, teacher, crops, teacher_temp=0.02, student_temp=0.1)
    # The student starts as the teacher: on the teacher's own crop it is exactly the floor.
    assert parts["same_crop"] == pytest.approx(parts["floor"], abs=1e-5)
    assert parts["teacher_entropy"] < parts["floor"]  # Gibbs: H(q) ≤ H(q, p), equal only for p = q
    with torch.no_grad():
        student.head.mlp[0].weight.mul_(1.5)  # now another network than the teacher
        loss = DINOLoss(96, ncrops=5, student_temp=0.1, impl="eager", centering="sinkhorn_knopp")
        expected = loss(student(crops), teacher(crops[:2]), teacher_temp=0.02).item()
    parts = loss_parts(student, teacher, crops, teacher_temp=0.02, student_temp=0.1)
    assert parts["loss"] == pytest.approx(expected, rel=1e-5)
    # 2 global pairs and 2 × 3 local pairs, the loss their mean
    assert parts["loss"] == pytest.approx((2 * parts["global_pairs"] + 6 * parts["local_pairs"]) / 8, rel=1e-6)
    assert parts["same_crop"] != pytest.approx(parts["floor"], abs=1e-3)
