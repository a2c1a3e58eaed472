"""Every benchmark of the project in one run (``make bench``), then one summary table; or the README's table.

``make bench`` runs bench_loss, bench_ema, bench_loaders, bench_train (a ViT's step, then ResNet-50's),
bench_augment and bench_profile (``--quick`` on a CPU, full on a GPU) as separate processes, so one failing
benchmark does not lose the others.
Their records (the JSON files of ``benchmarks.common.SCHEMA``) go to ``benchmarks/results/local/`` (untracked; or
``$OUT``, or ``--out-dir``), and the summary of that folder is printed and written there (``summary.md``,
``summary.png``): each headline row against its baseline row measured in the same run (throughput ratio,
``benchmarks.common.speedup``), per device, with the date. No tracked file changes.

``make bench-readme`` (``--readme``, the maintainer's) measures nothing: it summarises the tracked
``benchmarks/results/*.json`` and rewrites the README's table between its performance markers, and the
``summary.md`` / ``summary.png`` beside those results. Every table keeps one row per piece and device, the newest
run by the row's date: a piece measured again replaces its older row instead of adding one.

    python -m benchmarks.run_all             # run, then summarise the local results
    python -m benchmarks.run_all --summary   # only summarise the local results already there
    python -m benchmarks.run_all --readme    # the README's table from the tracked results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, SCHEMA, baseline_row, fmt, throughput, write_between_markers

LOCAL = RESULTS_DIR / "local"  # git-ignored: what `make bench` measures on the user's machine
README = Path(__file__).resolve().parents[1] / "README.md"
BENCHES = ("bench_loss", "bench_ema", "bench_loaders", "bench_train", "bench_augment", "bench_profile")
# The paper's ResNet-50 recipe's step (SGD, no drop-path) against the reference step, a second bench_train run: at
# 2x224+10x96, B=64 on a GPU; on a CPU at 2x96+4x48, B=8 (bench_train's --quick shapes are a ViT's).
RESNET50 = ["--archs", "resnet50", "--providers", "ours,reference", "--set", "optim.name=sgd",
            "model.drop_path_rate=0", "--name", "train_resnet50"]
RESNET50_QUICK = ["--batch", "8", "--locals", "4", "--global-size", "96", "--local-size", "48", "--steps", "5",
                  "--warmup", "2"]
START, END = "<!-- performance:start -->", "<!-- performance:end -->"
Row = tuple[str, str, str, str, str, str]  # device, date, piece, ours, reference, ratio


def run_benchmarks(quick: bool, out_dir: Path) -> dict[str, int]:
    """Each benchmark in its own process; every one writes its record into ``out_dir`` (``$OUT`` is the folder
    ``benchmarks.common.results_path`` writes to when a benchmark is given no ``--out``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = {name: [f"benchmarks.{name}", *(["--quick"] if quick else [])] for name in BENCHES}
    runs["bench_train resnet50"] = ["benchmarks.bench_train", *RESNET50, *(RESNET50_QUICK if quick else [])]
    codes = {}
    for name, args in runs.items():
        cmd = [sys.executable, "-m", *args]
        print(f"=== {' '.join(cmd)}", flush=True)
        codes[name] = subprocess.run(cmd, env={**os.environ, "OUT": str(out_dir)}).returncode
    return codes


def summary_rows(folder: Path) -> list[Row]:
    """One table row per piece and device, from the newest headline row (by its date) of all records in ``folder``;
    the pieces keep the order in which the files first name them."""
    newest: dict[tuple[str, str], tuple[str, Row]] = {}
    for path in sorted(folder.glob("*.json")):
        d = json.loads(path.read_text())
        if d.get("schema") != SCHEMA:  # other JSON kept there (dali_gpu_check's) is not a record
            continue
        for r in d["rows"]:
            cells = _describe(d, r)
            if cells is None:
                continue
            key, date = (r["device"], cells[0]), str(r["date"] or "")
            if key not in newest or date >= newest[key][0]:  # equal dates: the later row of the later file
                newest[key] = (date, (r["device"], date[:10], *cells))
    return [row for _, row in newest.values()]


def _describe(d: dict, r: dict) -> tuple[str, str, str, str] | None:
    """(piece, ours, reference, ratio) of a headline row against its baseline in the same file, else None."""
    base = baseline_row(r, d["rows"]) if r["headline"] and r["error"] is None else None
    if base is None:
        return None
    piece = " ".join(x for x in (r["name"], r["shape"], r["mode"]) if x)
    if r["provider"] != "ours":
        piece += f", {r['provider']}"
    x = r["extra"]
    ours = _value(r) + (f" ({x['pct_of_copy_bw']:.0f}% of copy bw)" if x.get("pct_of_copy_bw") else "") + (
        f", MFU {100 * x['mfu']:.0f}%" if x.get("mfu") else "")
    label = [base["provider"]] if base["provider"] != "reference" or base["mode"] != r["mode"] else []
    label += [base["mode"]] if base["mode"] != r["mode"] else []
    reference = _value(base) + (f" ({', '.join(label)})" if label else "")
    return piece, ours, reference, f"{throughput(r) / throughput(base):.3g}×"


def _value(r: dict) -> str:
    return f"{fmt(throughput(r))} img/s" if "images" in r["extra"] else f"{fmt(r['p50_ms'])} ms"


def markdown(rows: list[Row]) -> str:
    lines = ["| device | date | piece | ours | reference | ours / reference |", "|---|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines)


def chart(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r[2]} [{r[0].replace('NVIDIA ', '')}]" for r in rows]
    ratios = [float(r[5].rstrip("×")) for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.2))
    ax.barh(range(len(rows)), ratios, color=["tab:green" if x >= 1 else "tab:red" for x in ratios])
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up over the reference algorithm (log scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarise(folder: Path) -> str:
    """The table of ``folder``'s records, also written there as ``summary.md`` (and ``summary.png``)."""
    rows = summary_rows(folder)
    table = markdown(rows)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.md").write_text(table + "\n")
    if rows:
        chart(rows, folder / "summary.png")
    return table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--summary", action="store_true", help="only summarise the results already in --out-dir")
    p.add_argument("--quick", action="store_true", help="quick mode even on a GPU")
    p.add_argument("--out-dir", default=os.environ.get("OUT") or str(LOCAL),
                   help="where the records and the summary go (default: $OUT, else benchmarks/results/local/)")
    p.add_argument("--readme", action="store_true",
                   help="measure nothing: the README's table (and results/summary.*) from the tracked results")
    args = p.parse_args(argv)
    if args.readme:
        table = summarise(RESULTS_DIR)
        write_between_markers(README, START, END, table)
        print(table)
        return
    out_dir = Path(args.out_dir)
    codes = {} if args.summary else run_benchmarks(args.quick or not torch.cuda.is_available(), out_dir)
    print(summarise(out_dir))
    print(f"results in {out_dir}/")
    failed = [n for n, c in codes.items() if c]
    if failed:
        raise SystemExit(f"benchmarks that failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
