"""Does the demo recipe learn on data it was not tuned on? One 300-step CPU run per dataset, ``data.path`` changed only.

For each dataset (the tuning sets ``demo``, ``textures-hard`` and ``photos``, and the held-out sets of
:mod:`benchmarks.research.heldout_data`: ``glyphs``, ``shapes``, ``digits``, ...) this runs
``python -m dino_fast.train --config dino_fast/configs/demo.yaml data.path=<set> [extra overrides]`` and records
one row per run on the benchmarks' schema (:class:`benchmarks.common.Record`): name ``recipe``, provider the recipe
(``--recipe``), mode the data set, shape the step count, no timing; ``extra`` holds the teacher's k-NN top-1 before
→ after, the loss and teacher entropy over the first and last 10 steps against ln K, the collapse warnings printed
and replayed, and the wall time. A run that fails is a row with its ``error``, and the other sets still run.
Results go to ``--out`` (default ``benchmarks/results/local/``, untracked); ``--docs`` writes the table into
docs/small-data.md (the tracked ``benchmarks/results/recipe_check_cpu.json`` holds several recipes' runs).

    python -m benchmarks.research.recipe_check --sets demo glyphs shapes --recipe "demo.yaml"
    python -m benchmarks.research.recipe_check --table benchmarks/results/recipe_check_cpu.json --docs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, Record, error_text, write_between_markers
from benchmarks.research.heldout_data import KINDS

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "small-data.md"
START, END = "<!-- recipe-check:start -->", "<!-- recipe-check:end -->"
NAME = "recipe"  # the record's rows: provider = the recipe, mode = the data set, shape = the steps run

TUNING_SETS = ("demo", "textures-hard", "photos")  # the recipe may be tuned on these; every other set is held out


def dataset_path(name: str, root: Path) -> str:
    """``demo`` (the embedded set), ``textures-hard`` (the demo's textures with wider nuisances: a second tuning
    set, since the demo set is saturated at ~98%), ``photos`` (grey patches of real photographs,
    :mod:`benchmarks.research.tuning_data`: a tuning set of another kind than textures) or a held-out set of
    :mod:`benchmarks.research.heldout_data`."""
    if name == "demo":
        return "demo"
    folder = root / name
    if not (folder / ".complete").exists():
        if name == "textures-hard":
            from pipelines.demo_data import generate as generate_textures

            generate_textures(folder, hard=True)
        elif name == "photos":
            from benchmarks.research.tuning_data import generate as generate_photos

            generate_photos(folder)
        else:
            from benchmarks.research.heldout_data import generate

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


def run_one(record: Record, recipe: str, name: str, data_root: Path, out_root: Path, extra: list[str]) -> dict:
    run = out_root / name
    facts = {"role": "tuning" if name in TUNING_SETS else "held-out", "overrides": extra, "run": str(run)}
    t0 = time.perf_counter()
    try:
        cmd = [sys.executable, "-m", "dino_fast.train", "--config", "dino_fast/configs/demo.yaml",
               f"data.path={dataset_path(name, data_root)}", f"checkpoint.output_dir={run}",
               "logging.progress=plain", "checkpoint.every_steps=0", *extra]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ})
        if proc.returncode != 0:
            raise RuntimeError(f"the trainer exited with {proc.returncode}: {proc.stderr.strip()[-1500:]}")
        from dino_fast.config import load_config

        cfg = load_config(REPO / "dino_fast/configs/demo.yaml", extra)
        summary = summarise(run, cfg.model.out_dim, cfg.optim.warmup_epochs)
    except Exception as exc:  # one failing set must not lose the others' rows
        return record.add(NAME, recipe, name, "", error=error_text(exc), wall_s=round(time.perf_counter() - t0, 1),
                          **facts)
    printed = sum("collapse" in line for line in proc.stdout.splitlines() + proc.stderr.splitlines())
    return record.add(NAME, recipe, name, f"{summary['steps']} steps", wall_s=round(time.perf_counter() - t0, 1),
                      **summary, collapse_warnings=printed, **facts)


def markdown_table(rows: list[dict]) -> str:
    """One line per dataset; per recipe, the random network's k-NN → the trained teacher's (the random network's score
    depends on the recipe's crop size, at which k-NN runs), the end loss against ln K and the collapse warnings. A
    run's step count is named where it is not the ~300 of the step budget (an epoch count of the past)."""
    recipes = list(dict.fromkeys(r["provider"] for r in rows))
    head = "| data set | steps (first recipe) | " + " | ".join(recipes) + " |"
    lines = [head, "|" + "---|" * (2 + len(recipes))]
    for name in dict.fromkeys(r["mode"] for r in rows):
        mine = {r["provider"]: r for r in rows if r["mode"] == name}
        first = next(iter(mine.values()))
        cells = [_cell(mine.get(recipe)) for recipe in recipes]
        label = f"{name} (tuning)" if name in TUNING_SETS else name
        lines.append(f"| {label} | {first['extra'].get('steps', '-')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(row: dict | None) -> str:
    if row is None:
        return "not run"
    if row["error"] is not None:
        return "failed (its error is in the results file)"
    r = row["extra"]
    steps = f" in {r['steps']} steps" if abs(r["steps"] - 300) > 15 else ""  # not the ~300-step budget
    if "loss_last10" in r:
        gap = r["ln_k"] - r["loss_last10"]
        loss = f"loss {r['loss_last10']:.2f} (ln K {'−' if gap >= 0 else '+'} {abs(gap):.2f})"
    else:  # a few lever runs of recipe_tuning_cpu.json kept only ln K − loss (their run folders were lost)
        gap = r["ln_k_minus_loss_last10"]
        loss = f"loss ln K {'−' if gap >= 0 else '+'} {abs(gap):.2f}"
    warned = r.get("collapse_warnings_replayed")
    warning = "collapse warning" if warned else "no warning" if warned is not None else "warnings not kept"
    return (f"{r['knn_before']:.2f}% → **{r['knn_after']:.2f}%** ({r['knn_after'] - r['knn_before']:+.2f}{steps}); "
            f"{loss}; {warning}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=["demo", "glyphs", "shapes"], choices=TUNING_SETS + KINDS)
    parser.add_argument("--recipe", default=None, help="the recipe's name in the rows (default: demo.yaml + overrides)")
    parser.add_argument("--data-root", default="data/heldout")
    parser.add_argument("--runs", default="runs/recipe_check")
    parser.add_argument("--out", default=str(RESULTS_DIR / "local" / "recipe_check_cpu.json"))
    parser.add_argument("--replay", nargs="+", default=None, metavar="RUN",
                        help="only re-read finished run folders (<runs>/<set>) and print their rows")
    parser.add_argument("--table", default=None, metavar="JSON", help="print the Markdown table of a results file")
    parser.add_argument("--docs", action="store_true", help="also write the table into docs/small-data.md")
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides for every run (tuning only)")
    args = parser.parse_args(argv)
    if args.replay:
        from dino_fast.config import load_config

        for folder in map(Path, args.replay):
            cfg = load_config(folder / "config.yaml")
            print(json.dumps({"run": str(folder), **summarise(folder, cfg.model.out_dim, cfg.optim.warmup_epochs)}))
        return
    if args.table:
        rows = json.loads(Path(args.table).read_text())["rows"]
    else:
        recipe = args.recipe or " ".join(["demo.yaml", *args.overrides])
        record = Record("recipe_check", torch.device("cpu"), args.out, overrides=args.overrides)
        for name in args.sets:
            row = run_one(record, recipe, name, Path(args.data_root), Path(args.runs), args.overrides)
            print(json.dumps(row), flush=True)
            record.write()  # after every set: a run cut off keeps the finished ones
        print(f"wrote {record.path}")
        rows = record.rows
    table = markdown_table(rows)
    print(table)
    if args.docs:
        write_between_markers(DOCS, START, END, table)


if __name__ == "__main__":
    main()
