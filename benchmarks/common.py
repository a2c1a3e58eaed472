"""Shared benchmark plumbing: timing (p20 / p50 / p80), peak memory, copy bandwidth, device facts, the results record.

Timing: ``warmup`` untimed calls, then ``iters`` timed calls, each bracketed by ``torch.cuda.Event`` pairs on CUDA
(one sync at the end) or ``time.perf_counter`` on CPU. A ``setup`` callable (untimed, e.g. a fresh forward before a
timed backward) may run before each call.

The record: every benchmark writes one :class:`Record`, a JSON file of rows of one schema (``SCHEMA``)::

    name, provider, mode, shape      what was timed: the piece ("DINO loss"), who ("ours", "reference"), how
                                     ("fwd+bwd", "synthetic") and at what size ("B=64 10 crops K=65536 bfloat16")
    p20_ms, p50_ms, p80_ms           per timed call (None where the row records an error)
    peak_memory_bytes                above what was allocated before (CUDA; None on CPU)
    device, commit, date             where and on what code it ran
    baseline                         {"provider", "mode"} of the row it is compared with: same name and shape, the
                                     same mode unless it names one (None on the baseline itself)
    headline                         the row goes into the summary table (benchmarks/run_all.py)
    error                            why there is no timing (a failure, a skip, an unavailable backend), else None
    extra                            whatever else the benchmark measures: ``images`` (images per timed call: the
                                     summary then shows img/s), ``pct_of_copy_bw``, ``mfu``, ...

Ratios are throughputs (``images`` per call, else calls, per second) against the baseline row of the same file:
:func:`speedup`. Files go to ``benchmarks/results/<stem>_<device-slug>.json``, or into ``$OUT`` when that variable
is set, or to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCHEMA = "dino_fast.benchmark-rows/1"


def pick_device(requested: str | None = None) -> torch.device:
    """``--device`` if given, else CUDA when available, else CPU."""
    if requested:
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda was asked for but torch.cuda.is_available() is False")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: torch.device) -> str:
    """A file-name-safe device name, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu``."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def environment(device: torch.device) -> dict[str, Any]:
    """Device name, library versions, date: recorded with every result file."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(cuda=torch.version.cuda, total_memory_gib=round(props.total_memory / 2**30, 1),
                    sm_count=props.multi_processor_count)
    return info


def time_fn(
    fn: Callable[[], Any],
    device: torch.device,
    warmup: int = 3,
    iters: int = 10,
    setup: Callable[[], Any] | None = None,
) -> dict[str, float]:
    """Median, 20th and 80th percentile of ``fn()`` in milliseconds (``setup()`` runs untimed before each call)."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    sync(device)
    times: list[float] = []
    if device.type == "cuda":
        events = []
        for _ in range(iters):
            if setup is not None:
                setup()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        sync(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(iters):
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times)


def summarize(times_ms: list[float]) -> dict[str, float]:
    q = statistics.quantiles(times_ms, n=10, method="inclusive") if len(times_ms) > 1 else times_ms * 9
    return {"p20_ms": q[1], "p50_ms": statistics.median(times_ms), "p80_ms": q[7], "n": len(times_ms)}


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Bytes allocated by ``fn()`` above what was allocated before it (CUDA only; None on CPU)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def copy_bandwidth(device: torch.device, nbytes: int | None = None, iters: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s, counting read + write (the floor streaming kernels are held to)."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 27)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=3, iters=iters)
    return 2 * nbytes / (t["p50_ms"] * 1e-3) / 1e9


def results_path(name: str, device: torch.device, out: str | None = None) -> Path:
    """``--out`` if given, else ``$OUT/<name>_<slug>.json`` if ``$OUT`` is set, else ``benchmarks/results/...``."""
    if out:
        return Path(out)
    base = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS_DIR
    return base / f"{name}_{device_slug(device)}.json"


def write_json(payload: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def write_between_markers(path: Path, start: str, end: str, block: str) -> None:
    """Replace what lies between the ``start`` and ``end`` marker lines of a Markdown file with ``block``; the rest
    of the file is left byte for byte (others edit it too)."""
    text = path.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{path}: the markers {start} and {end} are missing; put them where the table goes")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{block}\n{end}{tail}")


def git_commit() -> str | None:
    """The checkout's short commit, with ``+`` when it has uncommitted changes; None outside a git checkout (the
    lent GPU machine gets a copy of the working tree without its history)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+" if dirty else "")


def error_chain(exc: BaseException) -> list[dict[str, str]]:
    """Every exception of ``exc``'s chain, the cause first: its type, its message's first line and where it was
    raised (``file:line``). The cause is what a reader needs: an error raised inside a CUDA graph capture, say, is
    followed by the capture's own "capture invalidated" error on the way out, which alone says nothing."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = traceback.extract_tb(exc.__traceback__)
        where = f"{tb[-1].filename.split('site-packages/')[-1]}:{tb[-1].lineno}" if tb else ""
        chain.append({"type": type(exc).__name__, "message": str(exc).strip().splitlines()[0] if str(exc).strip()
                      else "", "where": where})
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return chain[::-1]


def error_text(exc: BaseException, limit: int = 2000) -> str:
    """The whole chain of ``exc`` (:func:`error_chain`) as one line, the cause first: ``Type: message (at file:line)
    → then Type: message ...``, cut to ``limit`` characters, for a row that records a failure instead of a timing."""
    parts = [f"{e['type']}: {e['message']}" + (f" (at {e['where']})" if e["where"] else "") for e in error_chain(exc)]
    text = " → then ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Record:
    """One benchmark run's results file: rows of the schema above, stamped with the device, commit and date.

    ``meta`` holds the file-level facts (settings, copy bandwidth, launch configs, sweeps). ``write`` may be called
    after every row, so a run cut off at its time limit keeps the rows it finished.
    """

    def __init__(self, benchmark: str, device: torch.device, out: str | None = None, stem: str | None = None,
                 **meta: Any):
        self.benchmark, self.device = benchmark, device
        self.environment = environment(device)
        self.path = results_path(stem or benchmark, device, out)
        self.commit = git_commit()
        self.meta = meta
        self.rows: list[dict[str, Any]] = []

    def add(self, name: str, provider: str, mode: str, shape: str, timing: dict[str, float] | None = None, *,
            peak_memory_bytes: int | None = None, baseline: str | None = None, baseline_mode: str | None = None,
            headline: bool = False, error: str | None = None, **extra: Any) -> dict[str, Any]:
        """Append a row; ``timing`` as :func:`time_fn` returns it; ``baseline`` names the provider compared with."""
        timing = timing or {}
        row = {"name": name, "provider": provider, "mode": mode, "shape": shape,
               "p20_ms": timing.get("p20_ms"), "p50_ms": timing.get("p50_ms"), "p80_ms": timing.get("p80_ms"),
               "peak_memory_bytes": peak_memory_bytes, "device": self.environment["device"], "commit": self.commit,
               "date": self.environment["date"],
               "baseline": {"provider": baseline, "mode": baseline_mode or mode} if baseline else None,
               "headline": headline, "error": error, "extra": extra}
        self.rows.append(row)
        return row

    def payload(self, **meta: Any) -> dict[str, Any]:
        return {"schema": SCHEMA, "benchmark": self.benchmark, "environment": self.environment, **self.meta, **meta,
                "rows": self.rows}

    def write(self, **meta: Any) -> Path:
        return write_json(self.payload(**meta), self.path)


def find_row(rows: list[dict[str, Any]], name: str, shape: str, provider: str, mode: str) -> dict[str, Any] | None:
    """The first timed row (no error) of that provider and mode at that piece and shape."""
    key = (name, shape, provider, mode)
    return next((r for r in rows if r["error"] is None and r["p50_ms"]
                 and (r["name"], r["shape"], r["provider"], r["mode"]) == key), None)


def baseline_row(row: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    base = row.get("baseline")
    return find_row(rows, row["name"], row["shape"], base["provider"], base["mode"]) if base else None


def throughput(row: dict[str, Any]) -> float:
    """Images (``extra["images"]`` per timed call) or calls per second, at the median."""
    return row["extra"].get("images", 1) / (row["p50_ms"] * 1e-3)


def speedup(row: dict[str, Any], rows: list[dict[str, Any]], provider: str | None = None,
            mode: str | None = None) -> float | None:
    """``row``'s throughput over its baseline's (or over ``provider`` at ``mode``, default: the row's mode) in the
    same rows; None when either has no timing."""
    if provider is None:
        base = baseline_row(row, rows)
    else:
        base = find_row(rows, row["name"], row["shape"], provider, mode or row["mode"])
    if base is None or row["error"] is not None or not row["p50_ms"]:
        return None
    return throughput(row) / throughput(base)


def add_kernel_args(p: argparse.ArgumentParser, quick_help: str) -> None:
    """The CLI of the kernel benchmarks (bench_loss, bench_ema)."""
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="result JSON path (default: $OUT or benchmarks/results/)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per measurement")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--sweep", action="store_true", help="also sweep the Triton launch configs (CUDA)")


def bandwidth_header(record: Record) -> float:
    """Measure the device's copy bandwidth (the floor streaming kernels are held to), print it with the device."""
    env, bw = record.environment, copy_bandwidth(record.device)
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  copy bandwidth {bw:.1f} GB/s")
    return bw


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A rich table when rich is importable, else aligned plain text."""
    cells = [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(x)) for x in col) for col in zip(columns, *cells)]
        print(f"\n{title}")
        print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
        for row in cells:
            print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        return
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right")
    for row in cells:
        table.add_row(*row)
    Console(width=200).print(table)


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)
