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


def imported_modules(path: Path) -> set[str]:
    """Dotted names of what a file imports; ``from a.b import c`` counts as both ``a.b`` and ``a.b.c`` (c may be a
    module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


TRAINER = ("dino_fast.train", "dino_fast.engine", "dino_fast.report", "dino_fast.errors")


def _rooms() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(the training core, the evaluation/hand-off package): each module → the dino_fast modules it imports."""
    core, evaluation = {}, {}
    for f in sorted((REPO / "dino_fast").rglob("*.py")):
        name = module_name(f)
        imports = {m for m in imported_modules(f) if m.startswith("dino_fast")}
        if name.startswith("dino_fast.eval"):
            evaluation[name] = imports
        elif name not in TRAINER and name != "dino_fast":
            core[name] = imports
    return core, evaluation


def test_the_core_imports_neither_the_evaluation_package_nor_the_trainer():
    core, evaluation = _rooms()
    assert {"dino_fast.config", "dino_fast.step", "dino_fast.loss.dino", "dino_fast.ops.dino_loss"} <= set(core)
    assert {"dino_fast.eval.knn", "dino_fast.eval.export", "dino_fast.eval.weights"} <= set(evaluation)
    upward = {name: sorted(m for m in imports if m.startswith(("dino_fast.eval", *TRAINER)))
              for name, imports in core.items()}
    assert {name: m for name, m in upward.items() if m} == {}
    trainer = {name: sorted(m for m in imports if m.startswith(TRAINER)) for name, imports in evaluation.items()}
    assert {name: m for name, m in trainer.items() if m} == {}


def test_no_two_modules_of_the_package_import_each_other():
    graph = {module_name(f): {m for m in imported_modules(f) if m.startswith("dino_fast")}
             for f in (REPO / "dino_fast").rglob("*.py")}
    circles = sorted((a, b) for a, deps in graph.items() for b in deps
                     if a < b and b in graph and a in graph[b] and a != "dino_fast" and b != "dino_fast")
    assert circles == []
