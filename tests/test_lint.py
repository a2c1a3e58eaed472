"""`make demo` then `make test` on one checkout: the demo's output folders must not change what the linter reports.

ruff decides whether an import is first-party by looking for a folder of that name at the repo root; the demo
writes `runs/` and `data/`, and `tests/runs.py` is imported as `runs`. This lints a copy of the tracked files with
those folders present, as a checkout looks after `make demo`.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_lint_passes_with_the_demo_outputs_present(tmp_path):
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed (make setup installs it into .venv)")
    files = subprocess.run(["git", "ls-files", "*.py", "pyproject.toml"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, tmp_path / f)
    for folder in ("runs/demo/checkpoints", "data/demo"):  # what `make demo` leaves behind
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "metrics.jsonl").write_text("{}\n")
    proc = subprocess.run([ruff, "check", "--no-cache", "."], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
