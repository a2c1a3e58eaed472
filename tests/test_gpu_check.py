"""The GPU check rehearsed on CPU, so it cannot rot while no GPU is lent: both of its commands run every step at tiny
shapes and each step must end with its file under $OUT; the only errors allowed are the ones a CPU must give (the
whole-step CUDA graph, CUDA kernels, DALI's GPU graph). Then its parts: a cut-off run, the error chain, the
"does not fit" prediction and the reference files' check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

from benchmarks.bench_train import predicted_peak
from benchmarks.common import error_chain, error_text
from benchmarks.gpu import prep

from child_env import clean_env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu" / "gpu_check.sh"
NEEDS_CUDA = ("needs a CUDA GPU", "needs CUDA")  # the only errors a CPU rehearsal may record
FILES = {"decision": {"gpu_check.log", "summary.json", "gate.json", "decision_cpu.json", "memory_cpu.json",
                      "bench_ema_cpu.json", "cuda_tests.xml"},
         "data": {"gpu_check.log", "summary.json", "loaders.json", "train_ffcv.json", "dali_gpu.json"}}
STEPS = {"decision": ["env", "gate", "decision-s", "decision-b", "memory", "resnet", "ema", "cuda-tests", "compiled"],
         "data": ["ffcv-import", "loaders", "train-ffcv", "dali-gpu"]}


def rehearse(part: str, out: Path, **env: str) -> subprocess.CompletedProcess:
    env = clean_env(GPU_CHECK_REHEARSAL="1", OUT=str(out), PYTHON=sys.executable, TRITON_INTERPRET="1",
                    TORCH_EXTENSIONS_DIR=os.environ["TORCH_EXTENSIONS_DIR"], **env)
    return subprocess.run(["bash", str(SCRIPT), part], cwd=REPO, capture_output=True, text=True, timeout=400, env=env)


def rows(out: Path) -> list[dict]:
    found = []
    for f in out.glob("*.json"):
        d = json.loads(f.read_text())
        found += [{**r, "file": f.name} for r in d.get("rows", [])]
        found += [{"file": f.name, "provider": c["check"], "error": c["error"]} for c in d.get("checks", [])]
    return found


@pytest.mark.slow
@pytest.mark.parametrize("part", ["decision", "data"])
def test_every_step_of_the_gpu_check_runs_on_cpu_and_writes_its_file(part, tmp_path):
    proc = rehearse(part, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = {p.name for p in tmp_path.iterdir()}
    assert files == FILES[part] and len(files) <= 8  # the device tool returns at most 8 files
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(s["step"], s["rc"]) for s in summary["steps"]] == [(s, "0") for s in STEPS[part]]
    found = rows(tmp_path)
    assert found, "no result rows"
    unexpected = [f"{r['file']} {r['provider']}: {r['error']}" for r in found
                  if r["error"] and not any(n in r["error"] for n in NEEDS_CUDA)]
    assert unexpected == []
    if part == "decision":
        decision = json.loads((tmp_path / "decision_cpu.json").read_text())
        providers = {r["provider"] for r in decision["rows"]}
        assert {"ours", "ours-packed", "ours-graph", "ours-packed-graph", "reference", "ours-best"} <= providers
        assert {r["extra"]["batch"] for r in decision["rows"]} == {4, 8, 16}  # the parts appended, not replaced
        assert {r["provider"] for r in decision["rows"] if r["extra"]["arch"] == "resnet18"} == {"ours", "reference"}
        memory = json.loads((tmp_path / "memory_cpu.json").read_text())["rows"]
        archs = ("vit_small_patch16_224", "vit_base_patch16_224")  # the rehearsal's stand-ins for ViT-B and ViT-L
        assert {(r["extra"]["arch"], r["provider"]) for r in memory} == {(a, p) for a in archs
                                                                          for p in ("ours", "ours-ckpt")}
        gate = {c["check"]: c for c in json.loads((tmp_path / "gate.json").read_text())["checks"]}
        assert gate["packed = unpacked"]["ok"] and gate["EMA on device = float"]["ok"]
        assert "needs CUDA" in gate["graph = eager"]["error"]
        junit = ElementTree.parse(tmp_path / "cuda_tests.xml").getroot().find("testsuite")
        assert int(junit.get("tests")) > 10 and junit.get("tests") == junit.get("skipped")  # every one needs CUDA
    else:
        assert json.loads((tmp_path / "dali_gpu.json").read_text())["status"] == "no CUDA device"


@pytest.mark.slow
def test_a_run_cut_off_by_its_deadline_keeps_what_it_finished(tmp_path):
    proc = rehearse("decision", tmp_path, GPU_CHECK_DEADLINE="14")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    assert list(steps) == STEPS["decision"] and steps["env"]["rc"] == "0"
    assert steps["compiled"]["rc"] == "skipped"  # no step runs past the deadline
    assert sum(s["seconds"] for s in summary["steps"]) <= 14 + 2
    assert "the deadline is reached" in (tmp_path / "gpu_check.log").read_text()


def test_error_rows_keep_the_whole_chain_cause_first():
    def capture():
        raise RuntimeError("operation not permitted when stream is capturing\nCUDA details")

    try:
        try:
            capture()
        finally:
            raise RuntimeError("Capture invalidated")  # what torch.cuda.graph.__exit__ raises after it
    except RuntimeError as exc:
        chain, text = error_chain(exc), error_text(exc)
    assert [c["message"] for c in chain] == ["operation not permitted when stream is capturing", "Capture invalidated"]
    assert text.startswith("RuntimeError: operation not permitted when stream is capturing (at ")
    assert "test_gpu_check.py" in chain[0]["where"] and " → then RuntimeError: Capture invalidated" in text


def test_a_larger_batch_is_predicted_from_the_smaller_one():
    def row(batch, peak, static, error=None):
        return {"provider": "ours", "mode": "synthetic", "error": error, "peak_memory_bytes": peak,
                "extra": {"arch": "a", "batch": batch, "static_bytes": static}}

    rows = [row(64, 10 * 2**30, 2 * 2**30), row(128, 18 * 2**30, 2 * 2**30), row(256, None, None, "does not fit")]
    assert predicted_peak(rows, "ours", "a", 256, "synthetic") == 2 * 2**30 + 16 * 2**30 * 2  # from B=128
    assert predicted_peak(rows, "ours", "a", 64, "synthetic") is None  # nothing smaller: run it, an OOM is caught
    assert predicted_peak(rows, "reference", "a", 256, "synthetic") is None


def test_gpu_prep_checks_the_reference_files_against_their_sums(tmp_path, capsys):
    sums = prep.read_sums()
    assert set(sums) == {"main_dino.py", "utils.py", "vision_transformer.py"}
    assert all(len(d) == 64 for d in sums.values())
    assert len(prep.check_reference(tmp_path, sums)) == 3  # all missing
    (tmp_path / "utils.py").write_text("changed\n")
    fake = {"utils.py": "0" * 64, "main_dino.py": sums["main_dino.py"]}
    problems = prep.check_reference(tmp_path, fake)
    assert any("utils.py differs" in p for p in problems) and any("main_dino.py is missing" in p for p in problems)
    import hashlib

    good = {"utils.py": hashlib.sha256(b"changed\n").hexdigest()}
    assert prep.check_reference(tmp_path, good) == []
    real = REPO / ".reference" / "dino"
    if real.is_dir():  # filled by hand where it is used (git-ignored): the recorded sums are the real files'
        assert prep.check_reference(real, sums) == []
    assert prep.main(["--reference", str(tmp_path), "--no-carry-check"]) == 2
    assert "is missing" in capsys.readouterr().err
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".whl" / "deepspeed-0.19.8-py3-none-any.whl").write_bytes(b"\0" * (prep.CARRY_LIMIT + 1))
    assert prep.carry_bytes(tmp_path) == prep.CARRY_LIMIT + 1
    assert any("more than the device tool carries" in p for p in prep.check_carry(tmp_path))
