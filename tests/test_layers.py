"""The data path reads in one direction: ``pipelines`` (folder → loader → crops, conversion, progress) never
imports ``dino_fast`` (step → loss → EMA → checkpoint, evaluation), which builds on it."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_pipelines_never_import_the_trainer_package():
    files = sorted((REPO / "pipelines").rglob("*.py"))
    assert len(files) >= 10  # the package is there
    upward = {str(f.relative_to(REPO)): sorted(imported_packages(f) & {"dino_fast", "benchmarks"}) for f in files}
    assert {name: pkgs for name, pkgs in upward.items() if pkgs} == {}


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from dino_fast.config import Config\n    import benchmarks.common\n")
    assert imported_packages(probe) == {"dino_fast", "benchmarks"}
