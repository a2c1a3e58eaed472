"""Does the demo recipe learn on data it was not tuned on? One 300-step CPU run per dataset, ``data.path`` changed only.

For each dataset (the tuning sets ``demo``, ``textures-hard`` and ``photos``, and the held-out sets of
:mod:`benchmarks.heldout_data`: ``glyphs``, ``shapes``, ``digits``, ...) this runs
``python -m dino_fast.train --config dino_fast/configs/demo.yaml data.path=<set> [extra overrides]`` and reports the
teacher's k-NN top-1 before → after, the loss and teacher entropy over the first and last 10 steps against ln K, the
collapse warnings printed, and the wall time; rows go to a JSON file (``--out``).

    python -m benchmarks.recipe_check --sets demo glyphs shapes --out benchmarks/results/recipe_check_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


TUNING_SETS = ("demo", "textures-hard", "photos")  # the recipe may be tuned on these; every other set is held out


def dataset_path(name: str, root: Path) -> str:
    """``demo`` (the embedded set), ``textures-hard`` (the demo's textures with wider nuisances: a second tuning
    set, since the demo set is saturated at ~98%), ``photos`` (grey patches of real photographs,
    :mod:`benchmarks.tuning_data`: a tuning set of another kind than textures) or a held-out set of
    :mod:`benchmarks.heldout_data`."""
    if name == "demo":
        return "demo"
    folder = root / name
    if not (folder / ".complete").exists():
        if name == "textures-hard":
            from pipelines.demo_data import generate as generate_textures

            generate_textures(folder, hard=True)
        elif name == "photos":
            from benchmarks.tuning_data import generate as generate_photos

            generate_photos(folder)
        else:
            from benchmarks.heldout_data import generate

            generate(name, folder)
        (folder / ".complete").write_text("ok\n")
    return str(folder / "train")


def replay_warnings(steps: list[dict], out_dim: int, warmup_steps: int) -> list[str]:
    """The collapse warnings the trainer's detector gives on these step records (the current detector's rule)."""
    from dino_fast.health import CollapseDetector

    detector = CollapseDetector(out_dim, warmup_steps=warmup_steps)
    found = (detector.update(r["step"], r["teacher_entropy"], r["loss"], r["teacher_batch_entropy"]) for r in steps)
    return [w for w in found if w]


def summarise(run: Path, out_dim: int, warmup_epochs: int) -> dict:
    """The run's end-of-run summary (:func:`dino_fast.eval.summary.run_summary`) under this file's row keys, with the
    collapse warnings the current detector gives on its steps."""
    from dino_fast.eval.plot import read_metrics
    from dino_fast.eval.summary import run_summary

    records = read_metrics(run / "metrics.jsonl")
    s = run_summary(records, out_dim)
    steps = [r for r in records if "loss" in r]
    warmup_steps = warmup_epochs * max(r["step"] for r in steps if r["epoch"] == 0)
    return {
        "steps": s["steps"], "knn_before": s["knn_start"], "knn_after": s["knn_end"],
        "loss_first10": s["loss_start"], "loss_last10": s["loss_end"],
        "entropy_first10": s["entropy_start"], "entropy_last10": s["entropy_end"], "ln_k": s["ln_k"],
        "collapse_warnings_replayed": replay_warnings(steps, out_dim, warmup_steps),
    }


def run_one(name: str, data_root: Path, out_root: Path, extra: list[str]) -> dict:
    run = out_root / name
    cmd = [sys.executable, "-m", "dino_fast.train", "--config", "dino_fast/configs/demo.yaml",
           f"data.path={dataset_path(name, data_root)}", f"checkpoint.output_dir={run}", "logging.progress=plain",
           "checkpoint.every_steps=0", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name}: trainer failed ({proc.returncode}): {proc.stderr[-2000:]}")
    from dino_fast.config import load_config

    cfg = load_config(REPO / "dino_fast/configs/demo.yaml", extra)
    role = "tuning" if name in TUNING_SETS else "held-out"
    row = {"dataset": name, "role": role, "overrides": extra, "wall_s": round(wall, 1),
           **summarise(run, cfg.model.out_dim, cfg.optim.warmup_epochs),
           "collapse_warnings": sum("collapse" in line for line in proc.stdout.splitlines() + proc.stderr.splitlines())}
    return row


def markdown_table(rows: list[dict]) -> str:
    """One line per dataset; per recipe, the random network's k-NN → the trained teacher's (the random network's score
    depends on the recipe's crop size, at which k-NN runs), the end loss against ln K and the collapse warnings. A
    run's step count is named where it is not the ~300 of the step budget (an epoch count of the past)."""
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    head = "| data set | steps (first recipe) | " + " | ".join(recipes) + " |"
    lines = [head, "|" + "---|" * (2 + len(recipes))]
    for name in dict.fromkeys(r["dataset"] for r in rows):
        mine = {r["recipe"]: r for r in rows if r["dataset"] == name}
        first = next(iter(mine.values()))
        cells = []
        for recipe in recipes:
            r = mine.get(recipe)
            if r is None:
                cells.append("not run")
                continue
            warned = r.get("collapse_warnings_replayed", [])
            gap = r["ln_k"] - r["loss_last10"]
            steps = f" in {r['steps']} steps" if abs(r["steps"] - 300) > 15 else ""  # not the ~300-step budget
            cells.append(f"{r['knn_before']:.2f}% → **{r['knn_after']:.2f}%** ({r['knn_after'] - r['knn_before']:+.2f}"
                         f"{steps}); loss {r['loss_last10']:.2f} (ln K {'−' if gap >= 0 else '+'} {abs(gap):.2f}); "
                         + ("collapse warning" if warned else "no warning"))
        label = f"{name} (tuning)" if name in TUNING_SETS else name
        lines.append(f"| {label} | {first['steps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=["demo", "glyphs", "shapes"])
    parser.add_argument("--data-root", default="data/heldout")
    parser.add_argument("--runs", default="runs/recipe_check")
    parser.add_argument("--out", default="")
    parser.add_argument("--replay", nargs="+", default=None, metavar="RUN",
                        help="only re-read finished run folders (<runs>/<set>) and print their rows")
    parser.add_argument("--table", default=None, metavar="JSON", help="print the Markdown table of a results file")
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides for every run (tuning only)")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text())["rows"]))
        return
    if args.replay:
        from dino_fast.config import load_config

        for folder in map(Path, args.replay):
            cfg = load_config(folder / "config.yaml")
            print(json.dumps({"run": str(folder), **summarise(folder, cfg.model.out_dim, cfg.optim.warmup_epochs)}))
        return
    rows = []
    for name in args.sets:
        row = run_one(name, Path(args.data_root), Path(args.runs), args.overrides)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
