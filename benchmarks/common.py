"""Shared benchmark plumbing: timing (median / p20 / p80), peak memory, copy bandwidth, device facts, JSON, tables.

Timing: ``warmup`` untimed calls, then ``iters`` timed calls, each bracketed by ``torch.cuda.Event`` pairs on CUDA
(one sync at the end) or ``time.perf_counter`` on CPU. A ``setup`` callable (untimed, e.g. a fresh forward before a
timed backward) may run before each call. Results go to ``benchmarks/results/<name>_<device-slug>.json``, or into
``$OUT`` when that variable is set, or to ``--out``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


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
    return {"median_ms": statistics.median(times_ms), "p20_ms": q[1], "p80_ms": q[7], "n": len(times_ms)}


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
    return 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9


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
