"""Where a DINO train step's time goes: GPU kernels, the host launching them, or host syncs (torch.profiler).

The same steps as ``bench_train`` (``ours``: DeepSpeed + the step object ``DINOStep``; ``reference``: the
plain-PyTorch reference step; synthetic crops already on the device). After ``--warmup`` steps, ``--steps`` steps
are timed without the profiler (``time.perf_counter``, one device sync after the last), then ``--steps`` more run under
``torch.profiler.profile`` (CPU activity always, CUDA activity on CUDA; one discarded profiler warm-up step first,
so CUPTI's start-up is not in them). Each profiled step is a ``bench:step`` range; every number is per step, the
median over the profiled steps (``mean`` where it says so):

- wall: unprofiled (median and mean) and profiled; their ratio is the profiler's overhead.
- CUDA: GPU busy = union of the device intervals (kernels, memcpy, memset) inside the step's window (this step's
  start to the next one's; the last one ends at a device sync), idle share = 1 − busy / wall (profiled, and with
  the unprofiled mean wall), kernel launches (runtime/driver launch calls, and device kernels), host syncs
  (``cudaStreamSynchronize`` / ``cudaDeviceSynchronize`` / ``cudaEventSynchronize`` / ``cudaMemcpy`` calls), the
  host time blocked in them, and the GPU idle time that follows a sync (the queue ran dry and waits for launches).
- ``ours`` per ``dino:*`` range of ``DINOStep``: host ms, and device ms of the kernels whose launching CPU op
  starts inside the range on any thread (so backward kernels, launched from the autograd engine's device thread,
  count in ``dino:backward``; a range's ``device_time_total`` only sums its own thread's children).
- aten op calls, excluding view/metadata/allocation ops: the ops a TorchDispatchMode sees (the first op below a
  CompositeImplicitAutograd decomposition on each call chain), a CPU stand-in for kernel launches on a GPU.
- ``aten::_local_scalar_dense`` calls from Python (``.item()``, ``bool(tensor)``; not those inside another op, such
  as fused AdamW's reads of its CPU step counters): host syncs on CPU, where no runtime exists (also counts reads of
  CPU tensors; ``.tolist()`` of a CPU tensor calls no op, so ours' health sync shows none on CPU).
- top 15 device kernels by total time (CUDA) and top 15 aten ops by self host time.

``--host-floor also`` (or ``only``) adds a pass (rows of mode ``host_floor`` in the record) over the arch's op graph
with next to no arithmetic (backbones 48 wide, same depth and heads, B=1, 32/16 px crops, K=1024): its step time is
what the host alone costs (Python, the dispatcher, launches). Beside the measured step's time on the same machine
it says how much CUDA graphs or fewer launches could win.

Profiler APIs used (present in torch 2.11 and 2.14): ``torch.profiler.profile/schedule/record_function``,
``prof.events()`` → ``FunctionEvent.{name, device_type, time_range, thread, cpu_parent, kernels[].duration,
self_cpu_time_total}`` and ``is_user_annotation`` (read with a default). Run: ``python -m benchmarks.bench_profile
[--quick]``; the JSON has no trace (it stays a few KiB).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import functools
import statistics
import time
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function, schedule

from benchmarks import steps
from benchmarks.common import Record, pick_device, print_table, summarize, sync

PHASES = ("dino:teacher_forward", "dino:student_forward", "dino:loss", "dino:health", "dino:backward",
          "dino:clip", "dino:optimizer_step", "dino:teacher_ema")
STEP_RANGE, DRAIN_RANGE = "bench:step", "bench:drain"
NAME = "train step profile"  # the record's rows: mode = the pass (measured, host_floor), p20/p50/p80 unprofiled
# Ops that launch no kernel: views, metadata, allocation (counted neither here nor in the test's dispatch count).
METADATA_OPS = frozenset({
    "alias", "as_strided", "as_strided_", "chunk", "detach", "detach_", "diagonal", "empty", "empty_like",
    "empty_strided", "expand", "lift_fresh", "narrow", "new_empty", "new_empty_strided", "permute", "resize_",
    "resolve_conj", "resolve_neg", "_reshape_alias", "select", "set_", "slice", "split", "split_with_sizes",
    "squeeze", "t", "transpose", "unbind", "unflatten", "unfold", "unsqueeze", "_unsafe_view", "view",
    "view_as_complex", "view_as_real", "_fused_sdp_choice", "is_same_size", "_has_compatible_shallow_copy_type",
    "result_type", "size", "stride", "numel", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
})
# CUDA runtime/driver calls as the trace names them (a suffix such as ``_ptsz`` or ``_v7000`` is dropped first).
LAUNCH_CALLS = frozenset({"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                          "cudaLaunchCooperativeKernel", "cudaGraphLaunch"})
SYNC_CALLS = frozenset({"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"})
TOP = 15


@functools.cache
def composite_implicit(name: str) -> bool:
    """Whether every non-out overload of aten op ``name`` is CompositeImplicitAutograd (it only decomposes: a
    dispatch mode never sees it). The profiler records no overload, so a mixed op (``sum``) counts as real."""
    packet = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
    found = []
    for overload in packet.overloads() if packet is not None else []:
        if "out" in overload:
            continue
        try:
            found.append(getattr(packet, overload).has_kernel_for_dispatch_key(
                torch._C.DispatchKey.CompositeImplicitAutograd))
        except (AttributeError, RuntimeError):  # TorchScript-only overloads (aten::to.prim_Device)
            continue
    return bool(found) and all(found)


def dispatched_op(ev) -> bool:
    """An aten op a TorchDispatchMode would see: not a pure decomposition, and not called from inside another op."""
    if not ev.name.startswith("aten::") or composite_implicit(ev.name):
        return False
    parent = ev.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::") and not composite_implicit(parent.name):
            return False
        parent = parent.cpu_parent
    return True


def counted_op(ev) -> bool:
    return dispatched_op(ev) and ev.name.removeprefix("aten::") not in METADATA_OPS


def union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _in_window(starts: list[float], ends: list[float], t: float) -> int | None:
    """Index of the [start, end] window holding ``t`` (windows sorted and disjoint), or None."""
    i = bisect.bisect_right(starts, t) - 1
    return i if i >= 0 and t <= ends[i] else None


def _step_windows(cpu, n_steps: int, n_events: int) -> tuple[list[float], list[float], list[float]]:
    """(host start, host end, device-window end) of each of the last ``n_steps`` profiled steps."""
    ranges = sorted((e for e in cpu if e.name == STEP_RANGE), key=lambda e: e.time_range.start)[-n_steps:]
    if not ranges:
        raise RuntimeError(f"the profiler recorded no {STEP_RANGE!r} range ({n_events} events)")
    drain = max((e.time_range.end for e in cpu if e.name == DRAIN_RANGE), default=ranges[-1].time_range.end)
    h_start = [e.time_range.start for e in ranges]
    h_end = [e.time_range.end for e in ranges]
    d_end = h_start[1:] + [max(drain, h_end[-1])]  # device window: this step's start to the next one's
    return h_start, h_end, d_end


class _PhaseTally:
    """Per ``dino:*`` range of ours' step and per profiled step: its host time, and what the events inside count."""

    def __init__(self, cpu, h_start: list[float], h_end: list[float]):
        n = len(h_start)
        self.ranges = sorted((e for e in cpu if e.name in PHASES and h_start[0] <= e.time_range.start <= h_end[-1]),
                             key=lambda e: e.time_range.start)
        self.starts = [e.time_range.start for e in self.ranges]
        self.ends = [e.time_range.end for e in self.ranges]
        self.by_name = {name: {"host_us": [0.0] * n, "device_us": [0.0] * n, "kernels": [0] * n, "aten_ops": [0] * n,
                               "host_syncs": [0] * n, "seen": 0} for name in PHASES}
        for ev in self.ranges:
            i = _in_window(h_start, h_end, ev.time_range.start)
            if i is not None:
                self.by_name[ev.name]["host_us"][i] += ev.time_range.end - ev.time_range.start
                self.by_name[ev.name]["seen"] += 1

    def of(self, ev) -> dict[str, Any] | None:
        """The tally of the range ``ev`` starts in, or None."""
        j = _in_window(self.starts, self.ends, ev.time_range.start) if self.ranges else None
        return self.by_name[self.ranges[j].name] if j is not None else None

    def summary(self, device_trace: bool) -> dict[str, Any]:
        return {name: {"host_ms": median([u / 1e3 for u in p["host_us"]]),
                       "device_ms": median([u / 1e3 for u in p["device_us"]]) if device_trace else None,
                       "kernels": median(p["kernels"]) if device_trace else None,
                       "aten_ops": median(p["aten_ops"]), "host_syncs": median(p["host_syncs"]), "ranges": p["seen"]}
                for name, p in self.by_name.items()}


def _count_events(cpu, h_start: list[float], h_end: list[float], phases: _PhaseTally | None,
                  device_trace: bool) -> tuple[dict[str, list], dict[str, list[float]]]:
    """Per profiled step: counted aten ops, Python-level ``_local_scalar_dense`` calls, launch and sync calls, the
    host time blocked in syncs (and when each ended), device time of the kernels the step's ops launched; and each
    aten op's self host time and calls (the phases' tallies are filled on the way)."""
    n = len(h_start)
    c: dict[str, list] = {k: [0] * n for k in ("ops", "lsd", "launches", "syncs", "sync_wait", "linked")}
    c["sync_ends"] = [[] for _ in range(n)]
    host_ops: dict[str, list[float]] = {}
    for ev in cpu:
        i = _in_window(h_start, h_end, ev.time_range.start)
        if i is None:
            continue
        ph = phases.of(ev) if phases else None
        name = ev.name
        api = name.split("_", 1)[0]
        if counted_op(ev):
            c["ops"][i] += 1
            if ph:
                ph["aten_ops"][i] += 1
        if name.startswith("aten::"):
            rec = host_ops.setdefault(name, [0.0, 0])
            rec[0] += ev.self_cpu_time_total
            rec[1] += 1
        if name == "aten::_local_scalar_dense" and dispatched_op(ev):  # not a read inside a fused CPU op
            c["lsd"][i] += 1
            if ph and not device_trace:
                ph["host_syncs"][i] += 1
        elif api in LAUNCH_CALLS:
            c["launches"][i] += 1
        elif api in SYNC_CALLS:
            c["syncs"][i] += 1
            c["sync_wait"][i] += ev.time_range.end - ev.time_range.start
            c["sync_ends"][i].append(ev.time_range.end)
            if ph:
                ph["host_syncs"][i] += 1
        if ev.kernels:
            dur = sum(k.duration for k in ev.kernels)
            c["linked"][i] += dur
            if ph:
                ph["device_us"][i] += dur
                ph["kernels"][i] += len(ev.kernels)
    return c, host_ops


def _device_numbers(events, cpu, c: dict[str, list], h_start: list[float], d_end: list[float]) -> dict[str, Any]:
    """The device trace's numbers, or a note that it holds no device events."""
    cpu_names = {e.name for e in cpu}
    dev = [e for e in events if e.device_type != DeviceType.CPU and e.name not in cpu_names
           and not getattr(e, "is_user_annotation", False)]  # not the GPU-side copies of record_function ranges
    if not dev:
        return {"device_trace": "no device events recorded (CUPTI could not trace kernels); device fields empty"}
    out = _device_side(dev, h_start, d_end, c["sync_ends"])
    runtime_seen = sum(c["launches"]) > 0
    out.update(kernel_launch_calls=median(c["launches"]), device_ms_sum=median([u / 1e3 for u in c["linked"]]),
               sync_calls=median(c["syncs"]), sync_wait_ms=median([u / 1e3 for u in c["sync_wait"]]),
               host_syncs=median(c["syncs"]) if runtime_seen else out["d2h_copies"],
               host_syncs_source=("CUDA runtime sync calls: " + "/".join(sorted(SYNC_CALLS))) if runtime_seen
               else "device-to-host memcpy events (no runtime events in the trace)")
    return out


def analyse(events, n_steps: int, device_trace: bool, with_phases: bool) -> dict[str, Any]:
    """Per-step numbers from the profiler's events (see the module docstring)."""
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    h_start, h_end, d_end = _step_windows(cpu, n_steps, len(events))
    n = len(h_start)
    phases = _PhaseTally(cpu, h_start, h_end) if with_phases else None
    c, host_ops = _count_events(cpu, h_start, h_end, phases, device_trace)
    out: dict[str, Any] = {
        "host_ms_profiled": median([(e - s) / 1e3 for s, e in zip(h_start, h_end)]),
        "wall_ms_profiled": {"median": median([(e - s) / 1e3 for s, e in zip(h_start, d_end)]),
                             "mean": (d_end[-1] - h_start[0]) / 1e3 / n},
        "aten_ops": median(c["ops"]), "local_scalar_dense": median(c["lsd"]),
        "top_host_ops": [[k, round(v[0] / 1e3 / n, 4), v[1] / n] for k, v in
                         sorted(host_ops.items(), key=lambda kv: -kv[1][0])[:TOP]],
    }
    if device_trace:
        out.update(_device_numbers(events, cpu, c, h_start, d_end))
    if "host_syncs" not in out:
        out.update(host_syncs=median(c["lsd"]),
                   host_syncs_source="aten::_local_scalar_dense calls (no CUDA runtime events: CPU or no device trace)")
    if phases:
        out["phases"] = phases.summary(device_trace)
    return out


def _device_side(dev, h_start: list[float], d_end: list[float], sync_ends: list[list[float]]) -> dict[str, Any]:
    """GPU busy in each step's window (the union of every device interval overlapping it, clipped to it, so a kernel
    of the previous step still running counts as busy), counts and top kernels of the device ops that start in the
    window, and the idle time after each sync."""
    busy, walls, kernels, memcpy, d2h, idle_after_sync = ([] for _ in range(6))
    by_kernel: dict[str, list[float]] = {}
    for i, (s0, s1) in enumerate(zip(h_start, d_end)):
        mine = [e for e in dev if s0 <= e.time_range.start < s1]
        iv = [(max(e.time_range.start, s0), min(e.time_range.end, s1)) for e in dev
              if e.time_range.start < s1 and e.time_range.end > s0]
        busy.append(union_us(iv) / 1e3)
        walls.append((s1 - s0) / 1e3)
        kernels.append(sum(not e.name.startswith(("Memcpy", "Memset")) for e in mine))
        memcpy.append(sum(e.name.startswith("Memcpy") for e in mine))
        d2h.append(sum(e.name.startswith("Memcpy DtoH") for e in mine))
        starts = sorted(s for s, _ in iv)
        gap = 0.0
        for t in sync_ends[i]:  # after a sync the queue is empty: the GPU idles until the next device op starts
            k = bisect.bisect_left(starts, t)
            gap += (starts[k] if k < len(starts) else s1) - t
        idle_after_sync.append(gap / 1e3)
        for e in mine:
            rec = by_kernel.setdefault(e.name[:120], [0.0, 0])
            rec[0] += e.time_range.end - e.time_range.start
            rec[1] += 1
    n = len(h_start)
    return {"gpu_busy_ms": median(busy), "gpu_idle_share": median([1 - b / w for b, w in zip(busy, walls)]),
            "device_kernels": median(kernels), "memcpy": median(memcpy), "d2h_copies": median(d2h),
            "idle_after_sync_ms": median(idle_after_sync),
            "top_kernels": [[k, round(v[0] / 1e3 / n, 4), v[1] / n]
                            for k, v in sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:TOP]]}


@contextlib.contextmanager
def narrow_backbones(width: int | None):
    """Build every timm backbone ``width`` channels wide (same depth, heads and blocks, so the same ops in the same
    order). With B=1 and tiny crops the step's arithmetic then costs next to nothing and its time is the host's:
    Python, the dispatcher and, on a GPU, the kernel launches (``--host-floor``)."""
    if not width:
        yield
        return
    import dino_fast.models as models

    create = models.timm.create_model

    def narrow(name, **kwargs):
        return create(name, embed_dim=width, **kwargs)

    models.timm.create_model = narrow
    try:
        yield
    finally:
        models.timm.create_model = create


def profiled_steps(step, crops, n: int, device: torch.device, device_trace: bool):
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_trace else [])
    with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=n, repeat=1)) as prof:
        for i in range(n + 1):  # the first one is the profiler's warm-up, discarded
            with record_function(STEP_RANGE):
                step(crops)
            if i == n:
                with record_function(DRAIN_RANGE):  # closes the last step's device window
                    sync(device)
            prof.step()
    return prof.events()


def run_provider(provider: str, cfg, device: torch.device, args) -> tuple[dict[str, float], dict[str, Any]]:
    """(the unprofiled step times, everything else: the analysis of the profiled steps) of ``provider``'s step."""
    with narrow_backbones(args.width):
        step = steps.build_step(provider, cfg, device)
    crops = steps.synthetic_crops(cfg, device)
    for _ in range(args.warmup):
        step(crops)
    sync(device)
    times = []
    t_block = time.perf_counter()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step(crops)
        times.append(1e3 * (time.perf_counter() - t0))
    sync(device)
    wall = {"median": statistics.median(times), "mean": 1e3 * (time.perf_counter() - t_block) / args.steps}

    device_trace, note = device.type == "cuda" and not args.no_device_trace, "off (CPU run)"
    if device.type == "cuda":
        note = "off (--no-device-trace)" if args.no_device_trace else "ok"
        if device_trace and ProfilerActivity.CUDA not in torch.profiler.supported_activities():
            device_trace, note = False, "unavailable: torch.profiler.supported_activities() lacks CUDA"
    try:
        events = profiled_steps(step, crops, args.steps, device, device_trace)
    except Exception as exc:  # CUPTI refused: keep the host-side numbers
        if not device_trace:
            raise
        device_trace, note = False, f"failed ({type(exc).__name__}: {str(exc)[:200]}); CPU activity only"
        events = profiled_steps(step, crops, args.steps, device, False)
    res = analyse(events, args.steps, device_trace, with_phases=provider.startswith("ours"))
    note = res.pop("device_trace", note)
    facts = steps.step_facts(cfg)
    res = {**facts, "steps": args.steps, "width": args.width, "describe": step.describe, "device_trace": note,
           "wall_ms": wall, "img_per_s": facts["batch"] / wall["mean"] * 1e3,
           "profiler_overhead": res["wall_ms_profiled"]["mean"] / wall["mean"], **res}
    if res.get("gpu_busy_ms") is not None:
        res["gpu_idle_share_unprofiled"] = max(0.0, 1 - res["gpu_busy_ms"] / wall["mean"])
        res["verdict"] = verdict(res)
    del step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return summarize(times), res


def verdict(r: dict[str, Any]) -> str:
    """A one-line reading of the numbers (a heuristic: the numbers themselves are the answer)."""
    busy = 1 - r["gpu_idle_share_unprofiled"]
    idle_ms = max(0.0, r["wall_ms"]["mean"] - r["gpu_busy_ms"])
    if busy >= 0.85:
        return f"kernel-bound: GPU busy {busy:.0%} of the unprofiled step; only faster kernels help"
    after_sync = min(r["idle_after_sync_ms"], idle_ms)
    kind = "sync-bound" if after_sync >= 0.5 * idle_ms else "host/launch-bound"
    return (f"{kind}: GPU idle {1 - busy:.0%} ({idle_ms:.1f} ms) of the unprofiled step; {r['host_syncs']:.0f} "
            f"syncs/step, {after_sync:.1f} ms (profiled) of idle follows a sync; {r['kernel_launch_calls']:.0f} "
            f"launches/step; profiled host {r['host_ms_profiled']:.1f} ms vs GPU busy {r['gpu_busy_ms']:.1f} ms")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    steps.add_step_args(p, "vit_small_patch16_224")
    p.add_argument("--providers", default="ours,reference", help="ours,ours-compiled,ours-cudagraphs,reference")
    p.add_argument("--steps", type=int, default=5, help="profiled steps (and as many timed without the profiler)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-device-trace", action="store_true", help="CPU activity only, also on CUDA")
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="CPU sanity run: ViT-tiny depth 2, 64/32 px, 2 steps")
    p.add_argument("--width", type=int, default=None, help="build the backbones this wide (same blocks and heads)")
    p.add_argument("--host-floor", choices=("off", "also", "only"), default="off",
                   help="also (or only) the arch's op graph at negligible compute: width 48, B=1, 32/16 px, K=1024")
    p.add_argument("--out", default=None)
    p.add_argument("--set", nargs="*", default=[], help="extra dino_fast config overrides")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    extra = list(args.set)
    if args.quick:  # bench_train --quick's sizes
        steps.apply_quick(args, extra)
        args.steps, args.warmup = 2, 2
    # (name, width, batch, global px, local px, K, overrides) of each pass; the host floor keeps depth, heads, the
    # crop count and every op, and shrinks only the arithmetic.
    passes = [("measured", args.width, args.batch, args.global_size, args.local_size, args.out_dim, extra)]
    floor = ("host_floor", 48, 1, 32, 16, 1024,
             extra + ["model.patch_size=16", "model.head_hidden_dim=64", "model.head_bottleneck_dim=32"])
    passes = {"off": passes, "also": passes + [floor], "only": [floor]}[args.host_floor]
    record = Record("train_step_profile", device, args.out, stem="profile", quick=args.quick,
                    method=" ".join(__doc__.split("\n\n", 1)[1].split()))
    for name, width, batch, global_size, local_size, out_dim, overrides in passes:
        args.width = width
        for arch in args.archs.split(","):
            for provider in args.providers.split(","):
                cfg = steps.bench_config(arch, batch, args.locals, global_size, local_size, out_dim, device, overrides)
                shape = steps.step_shape(steps.step_facts(cfg))
                try:
                    timing, result = run_provider(provider, cfg, device, args)
                    record.add(NAME, provider, name, shape, timing, **result)
                except Exception as exc:  # record and go on: one failing case must not lose the others
                    record.add(NAME, provider, name, shape, error=f"{type(exc).__name__}: {exc}"[:500],
                               **steps.step_facts(cfg))
                record.write(partial=True)  # what is done survives a timeout of the caller
    path = record.write(partial=False)
    _print(record)
    print(f"wrote {path}")
    return record.payload(partial=False)


def _print(record: Record) -> None:
    for r in record.rows:
        if r["error"]:
            print(f"{r['extra']['arch']} {r['mode']} {r['provider']}: {r['error']}")
    ok = [(f"{r['extra']['arch']} {r['mode']} {r['provider']}", r["extra"]) for r in record.rows if not r["error"]]
    print_table(f"DINO step profile on {record.environment['device']} (per step, median of the profiled steps)",
                ["arch", "pass", "provider", "ms (no prof)", "ms (prof)", "GPU busy ms", "GPU idle", "launches",
                 "syncs", "aten ops", "item()", "trace"],
                [[*label.split(" "), x["wall_ms"]["mean"], x["wall_ms_profiled"]["mean"],
                  x.get("gpu_busy_ms"), x.get("gpu_idle_share_unprofiled"), x.get("kernel_launch_calls"),
                  x["host_syncs"], x["aten_ops"], x["local_scalar_dense"], x["device_trace"][:30]] for label, x in ok])
    for label, x in ok:
        if "phases" in x:
            print_table(f"{label}: step phases", ["phase", "host ms", "device ms", "kernels", "aten ops", "syncs"],
                        [[k.removeprefix("dino:"), v["host_ms"], v["device_ms"], v["kernels"], v["aten_ops"],
                          v["host_syncs"]] for k, v in x["phases"].items()])
        if "verdict" in x:
            print(f"{label}: {x['verdict']}")
        top = x.get("top_kernels") or x["top_host_ops"]
        what = "kernels" if record.device.type == "cuda" else "host ops"
        print(f"{label} top {what} (ms/step, calls):"
              + "".join(f"\n  {ms:8.3f} {calls:6.0f}  {name[:90]}" for name, ms, calls in top[:5]))


if __name__ == "__main__":
    main()
