"""The end-of-run summary: what the run learnt, in a few lines a newcomer can read, and the metrics plot.

Read from ``metrics.jsonl`` (the whole file, so a resumed run is summarised from its first step): the teacher's
k-NN top-1 on the held-out split at the first and last measurement, the DINO loss and the teacher's entropy over
the first and last 10 steps against ln K (where a head that learnt nothing sits), and the path of the PNG that
:mod:`dino_fast.eval.plot` draws.
"""

from __future__ import annotations

import math
from pathlib import Path


def _mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return sum(values) / len(values) if values else math.nan


def run_summary(records: list[dict], out_dim: int, window: int = 10) -> dict[str, float | None]:
    """Start/end numbers of a run from its metrics records (steps carry ``loss``, evaluations ``knn_top1``)."""
    steps = [r for r in records if "loss" in r]
    knn = [r["knn_top1"] for r in records if "knn_top1" in r]
    return {
        "steps": steps[-1]["step"] if steps else 0,
        "knn_start": knn[0] if knn else None, "knn_end": knn[-1] if len(knn) > 1 else None,
        "loss_start": _mean(steps[:window], "loss"), "loss_end": _mean(steps[-window:], "loss"),
        "entropy_start": _mean(steps[:window], "teacher_entropy"),
        "entropy_end": _mean(steps[-window:], "teacher_entropy"),
        "ln_k": math.log(out_dim),
    }


def summary_lines(s: dict[str, float | None], plot: Path | None, plot_note: str = "") -> list[str]:
    lines = []
    if s["knn_start"] is not None and s["knn_end"] is not None:
        lines.append(f"k-NN top-1 (teacher, held-out split): {s['knn_start']:.2f}% at the start → {s['knn_end']:.2f}% "
                     f"now ({s['knn_end'] - s['knn_start']:+.2f} points)")
    elif s["knn_start"] is not None:
        lines.append(f"k-NN top-1 (teacher, held-out split): {s['knn_start']:.2f}% (measured once)")
    n = 10
    lines.append(f"DINO loss (mean of {n} steps): {s['loss_start']:.2f} → {s['loss_end']:.2f} nats; teacher entropy "
                 f"{s['entropy_start']:.2f} → {s['entropy_end']:.2f} nats (ln K = {s['ln_k']:.2f}: a head that "
                 f"learnt nothing sits there)")
    if plot is not None:
        lines.append(f"metrics plot: {plot} (redraw with: dino-fast-plot {plot.parent})")
    elif plot_note:
        lines.append(plot_note)
    return lines


def summarise_run(metrics_file: Path, out_dim: int, plot: bool = True) -> list[str]:
    """The summary lines of the run whose metrics are in ``metrics_file``; draws ``metrics.png`` beside it."""
    from dino_fast.eval.plot import MetricsFileError, plot_metrics, read_metrics

    try:
        records = read_metrics(metrics_file)
    except MetricsFileError as exc:
        return [f"no summary: {exc}"]
    png, note = None, ""
    if plot:
        try:
            png = metrics_file.parent / "metrics.png"
            plot_metrics({metrics_file.parent.name: records}, png)
        except ImportError:  # matplotlib is optional (the dev extra)
            png = None
            note = "no metrics plot: matplotlib is not installed (pip install matplotlib; then dino-fast-plot)"
    return summary_lines(run_summary(records, out_dim), png, note)
