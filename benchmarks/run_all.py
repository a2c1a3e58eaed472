"""Every benchmark of the project in one run (``make bench``), then one summary of all results files.

Runs bench_loss, bench_ema, bench_loaders and bench_train (``--quick`` on a CPU, full on a GPU) as separate
processes, so one failing benchmark does not lose the others; then reads every ``benchmarks/results/*.json``,
writes ``benchmarks/results/summary.md`` (ours vs the reference, piece by piece, per device, with the date), a PNG
chart of the speed-ups, and replaces the README's "Performance" section with the same table.

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


def _env(d: dict) -> dict:
    return d.get("environment") or d.get("env") or {}


def summary_rows() -> list[tuple[str, str, str, str, str, str]]:
    """(device, date, piece, ours, reference, ratio) for every results file."""
    rows = []
    for path in sorted(RESULTS.glob("*.json")):
        d = json.loads(path.read_text())
        env = _env(d)
        device, date = env.get("device", "?"), str(env.get("date", "?"))[:10]
        for r in d.get("results") or [{}]:  # a benchmark of one measurement has no list
            piece = _describe(d, r)
            if piece is None:
                continue
            rows.append((device, date, *piece))
    return rows


def _describe(d: dict, r: dict) -> tuple[str, str, str, str] | None:
    bench = d.get("benchmark", "")
    if "loss" in bench and r.get("provider") == "ours" and "speedup_full_vs_reference" in r:
        ref = r["full"]["median_ms"] * r["speedup_full_vs_reference"]
        return (f"DINO loss fwd+bwd B={r['B']} {r['ncrops']} crops K={r['K']} {r['dtype']}",
                f"{r['full']['median_ms']:.3g} ms", f"{ref:.3g} ms", f"{r['speedup_full_vs_reference']:.1f}×")
    if "ema" in bench and str(r.get("provider", "")).startswith("ours-flat"):
        ms = r["timing"]["median_ms"]
        return (f"teacher EMA {r['param_set']} ({r['student_dtype']} student)", f"{ms:.3g} ms "
                f"({r['pct_of_copy_bw']:.0f}% of copy bw)", f"{ms * r['speedup_vs_reference']:.3g} ms",
                f"{r['speedup_vs_reference']:.1f}×")
    if "loader" in bench and r.get("status") == "ok" and r.get("backend") != "torch":
        return (f"loader {r['backend']} {r['config']}", f"{r['img_per_s']:.0f} img/s", "torch/PIL baseline",
                f"{r['vs_torch']:.2f}×")
    if bench == "augment" and "speedup_vs_one_reference_core" in d:
        ref = 1e3 / d["reference_ms_per_img_one_core"]
        return (f"photometric augmentation, batched on the device, {d['crops']} B={d['batch']}",
                f"{d['img_per_s']:.0f} img/s", f"{ref:.1f} img/s (PIL, 1 core)",
                f"{d['speedup_vs_one_reference_core']:.0f}×")
    if bench == "train_step" and str(r.get("provider", "")).startswith("ours") and "speedup_vs_reference" in r:
        ref = r["img_per_s"] / r["speedup_vs_reference"]
        mfu = f", MFU {100 * r['mfu']:.0f}%" if r.get("mfu") else ""
        compiled = {"ours-compiled": ", compiled", "ours-cudagraphs": ", compiled + CUDA graphs",
                    "ours-graph": ", whole-step CUDA graph", "ours-packed": ", packed crops",
                    "ours-packed-graph": ", packed crops + whole-step graph",
                    "ours-best": ", compiled + packed + whole-step graph"}.get(r["provider"], "")
        piece = f"train step {r['arch']} {r['crops']} B={r['batch']} {r['mode']}{compiled}"
        if "speedup_vs_reference_torch_loader" in r:  # our loader vs the reference's: the end-to-end comparison
            ratio = r["speedup_vs_reference_torch_loader"]
            return (piece, f"{r['img_per_s']:.0f} img/s{mfu}",
                    f"{r['img_per_s'] / ratio:.0f} img/s (torch/PIL loader)", f"{ratio:.2f}×")
        return (piece, f"{r['img_per_s']:.0f} img/s{mfu}", f"{ref:.0f} img/s", f"{r['speedup_vs_reference']:.2f}×")
    return None


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
