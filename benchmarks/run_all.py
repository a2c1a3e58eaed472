"""Every benchmark of the project in one run (``make bench``), then one summary of all results files.

Runs bench_loss, bench_ema, bench_loaders and bench_train (``--quick`` on a CPU, full on a GPU) as separate
processes, so one failing benchmark does not lose the others; then reads every record in ``benchmarks/results/``
(the JSON files of ``benchmarks.common.SCHEMA``) and writes ``benchmarks/results/summary.md``: each headline row
against its baseline row measured in the same run (throughput ratio, ``benchmarks.common.speedup``), per device,
with the date; a PNG chart of the speed-ups; and the README's "Performance" section with the same table.

    python -m benchmarks.run_all            # run, then summarise
    python -m benchmarks.run_all --summary  # only summarise the results already there
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.common import SCHEMA, baseline_row, fmt, throughput

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parents[1] / "README.md"
BENCHES = ("bench_loss", "bench_ema", "bench_loaders", "bench_train")
START, END = "<!-- performance:start -->", "<!-- performance:end -->"


def run_benchmarks(quick: bool) -> dict[str, int]:
    codes = {}
    for name in BENCHES:
        cmd = [sys.executable, "-m", f"benchmarks.{name}"] + (["--quick"] if quick else [])
        print(f"=== {' '.join(cmd)}", flush=True)
        codes[name] = subprocess.run(cmd).returncode
    return codes


def summary_rows() -> list[tuple[str, str, str, str, str, str]]:
    """(device, date, piece, ours, reference, ratio) for every headline row of every results file."""
    rows = []
    for path in sorted(RESULTS.glob("*.json")):
        d = json.loads(path.read_text())
        if d.get("schema") != SCHEMA:  # other JSON kept there (recipe_check, dali_gpu_check) is not a record
            continue
        for r in d["rows"]:
            cells = _describe(d, r)
            if cells is not None:
                rows.append((r["device"], str(r["date"])[:10], *cells))
    return rows


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


def markdown(rows) -> str:
    lines = ["| device | date | piece | ours | reference | ours / reference |", "|---|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines)


def chart(rows, path: Path) -> None:
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


def update_readme(table: str) -> None:
    text = README.read_text()
    if START not in text or END not in text:
        return
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{table}\n{END}{tail}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--summary", action="store_true", help="only summarise existing results")
    p.add_argument("--quick", action="store_true", help="quick mode even on a GPU")
    args = p.parse_args(argv)
    codes = {} if args.summary else run_benchmarks(args.quick or not torch.cuda.is_available())
    rows = summary_rows()
    table = markdown(rows)
    (RESULTS / "summary.md").write_text(table + "\n")
    if rows:
        chart(rows, RESULTS / "summary.png")
    update_readme(table)
    print(table)
    failed = [n for n, c in codes.items() if c]
    if failed:
        raise SystemExit(f"benchmarks that failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
