"""Plot a run's metrics (``<run>/metrics.jsonl``, one JSON object per step) into one PNG of panels over steps.

Panels: loss, k-NN accuracy, throughput, teacher entropy, learning rate; a panel whose keys appear in no record is
left out. Several runs can be overlaid (one line per run).

CLI: ``dino-fast-plot RUN_OR_JSONL [MORE ...] [--out metrics.png]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# (panel title, y label, [(metrics key, line label)]) in display order.
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("loss", "loss (nats)", [("loss", "loss")]),
    ("k-NN accuracy", "%", [("knn_top1", "top-1"), ("knn_top5", "top-5")]),
    ("throughput", "img/s", [("img_per_s", "img/s"), ("img_per_s_avg", "img/s (avg)")]),
    ("teacher entropy", "nats", [("teacher_entropy", "per image"), ("teacher_batch_entropy", "batch")]),
    ("learning rate", "lr", [("lr", "lr")]),
]


class MetricsFileError(ValueError):
    """A metrics path a user gave is missing or holds no readable records."""


def metrics_path(path: str | Path) -> Path:
    """A run folder → its ``metrics.jsonl``; a file → itself."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        raise MetricsFileError(f"metrics file '{p}' does not exist: give a run folder or its metrics.jsonl")
    return p


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a JSON-lines file with a ``step``; a half-written last line (run in progress) is skipped."""
    p = metrics_path(path)
    records = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # e.g. the line the trainer is writing right now
        if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
            records.append(rec)
    if not records:
        raise MetricsFileError(f"'{p}' holds no JSON records with a 'step' key")
    return records


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def plot_metrics(runs: dict[str, list[dict]], out: str | Path, title: str | None = None) -> list[str]:
    """Draw the panels that have data for ``runs`` ({label: records}) into a PNG at ``out``.

    Returns:
        the titles of the panels drawn, in order.
    """
    import matplotlib  # here, not at import: reading metrics (the trainer's end-of-run summary) needs no matplotlib

    matplotlib.use("Agg")  # files only: no display on servers, and no GUI toolkit import
    import matplotlib.pyplot as plt

    present = [(t, yl, keys) for t, yl, keys in PANELS
               if any(_series(recs, key)[0] for recs in runs.values() for key, _ in keys)]
    if not present:
        raise MetricsFileError("no plottable keys (loss, knn_top1, img_per_s, teacher_entropy, lr) in the metrics")
    cols = min(2, len(present))
    rows = (len(present) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.6 * rows), squeeze=False)
    for ax, (panel, ylabel, keys) in zip(axes.flat, present):
        for run_i, (run, recs) in enumerate(runs.items()):
            for key_i, (key, label) in enumerate(keys):
                xs, ys = _series(recs, key)
                if not xs:
                    continue
                name = label if len(runs) == 1 else f"{run}: {label}"
                # One colour per run when overlaying, one line style per key; k-NN is measured rarely, so
                # markers keep single evaluations visible.
                colour = f"C{run_i if len(runs) > 1 else key_i}"
                ax.plot(xs, ys, color=colour, linestyle=("-", "--", ":")[key_i % 3],
                        marker="o" if key.startswith("knn") else None, markersize=3, label=name)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if panel == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if len(ax.get_lines()) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(present):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [p[0] for p in present]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dino-fast-plot", description="Plot dino_fast metrics.jsonl files to a PNG.")
    p.add_argument("runs", nargs="+", help="run folders or metrics.jsonl files (several are overlaid)")
    p.add_argument("--out", default=None, help="PNG path (default: <first run>/metrics.png)")
    p.add_argument("--title", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        paths = [metrics_path(r) for r in args.runs]
        runs = {}
        for p in paths:
            label = p.parent.name if p.name == "metrics.jsonl" else p.stem
            while label in runs:  # two runs with the same folder name stay distinguishable
                label += "'"
            runs[label] = read_metrics(p)
        out = Path(args.out) if args.out else paths[0].parent / "metrics.png"
        panels = plot_metrics(runs, out, args.title)
    except MetricsFileError as exc:
        print(f"dino-fast-plot: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out} ({', '.join(panels)})")


if __name__ == "__main__":
    main()
