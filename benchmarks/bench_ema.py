"""Teacher-EMA benchmark on real parameter sets: ViT-S/16 and ViT-B/16, each with the DINO head (K=65536).

Providers, all computing t ← m·t + (1−m)·s over every parameter (teacher fp32, student fp32 or bf16):
  * ``reference``       one mul_/add_ pair per parameter (the reference algorithm);
  * ``foreach``         one multi-tensor lerp (timm ModelEmaV3 style; the best plain-torch path);
  * ``ours-flat``       :class:`dino_fast.ops.ema.FlatEMA`, teacher and student in flat buffers: one streaming launch
                        (what a DeepSpeed-flattened or ``flatten_student=True`` student gets);
  * ``ours-grouped``    FlatEMA with the student left as separate tensors: one pointer-table launch;
  * ``foreach-on-device``, ``ours-flat-on-device``: the CUDA-graph step's EMA, the momentum read from device memory
                        (``ema_foreach_on_device``: a lerp with a tensor weight; ``FlatEMA.update_on_device``), timed
                        as that step runs them: captured in a CUDA graph and replayed (eager on CPU).
The Triton providers need CUDA; on CPU the table shows the torch paths (``foreach`` is what dino_fast picks there).
Throughput counts the bytes every provider must move (read t, read s, write t) and is compared with the
device-to-device copy bandwidth measured in the same run.

Run from the repo root: ``python -m benchmarks.bench_ema`` (full GPU suite) or ``--quick`` (CPU / CI sanity).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import (
    Record,
    add_kernel_args,
    bandwidth_header,
    error_text,
    peak_memory,
    pick_device,
    print_table,
    speedup,
    time_fn,
)
from dino_fast.ops import ema as ops
from dino_fast.ops import reference, select

OUT_DIM = 65536
PARAM_SETS = {"vit_small+head": "vit_small_patch16_224", "vit_base+head": "vit_base_patch16_224"}


def param_shapes(arch: str) -> list[torch.Size]:
    """Shapes of a DINO student (timm ViT + DINO head, K=65536), built on the meta device (no memory, no init)."""
    from dino_fast.models import DINOHead, build_backbone

    with torch.device("meta"):
        backbone = build_backbone(arch, 224)
        head = DINOHead(backbone.num_features, OUT_DIM)
    return [p.shape for m in (backbone, head) for p in m.parameters()]


def make_params(shapes: list[torch.Size], s_dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    teacher = [torch.randn(s, generator=g, device=device) * 0.02 for s in shapes]
    student = [(t + torch.randn(s, generator=g, device=device) * 1e-3).to(s_dtype) for t, s in zip(teacher, shapes)]
    return teacher, student


def providers(device: torch.device) -> list[str]:
    names = ["reference", "foreach", "foreach-on-device"]
    if device.type == "cuda" and "triton" in select.EMA:
        names += ["ours-flat", "ours-grouped", "ours-flat-on-device"]
    return names


def _graphed(fn, device: torch.device):
    """``fn`` captured once as a CUDA graph (as the whole-step graph runs it), replayed per call; eager on CPU."""
    if device.type != "cuda":
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles, the foreach path's allocations) outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def build_update(name: str, teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float,
                 block: int | None = None, num_warps: int | None = None):
    if name == "reference":
        return lambda: reference.ema_reference_loop(teacher, student, momentum), 1
    if name == "foreach":
        return lambda: reference.ema_foreach(teacher, student, momentum), 1
    device = teacher[0].device
    weights = torch.tensor([momentum, 1.0 - momentum], dtype=torch.float32, device=device)
    if name == "foreach-on-device":
        return _graphed(lambda: reference.ema_foreach_on_device(teacher, student, weights), device), None
    ema = ops.FlatEMA(teacher, student, flatten_student=name.startswith("ours-flat"), block=block,
                      num_warps=num_warps)
    if name == "ours-flat-on-device":
        return _graphed(lambda: ema.update_on_device(weights), device), ema.num_launches
    return lambda: ema.update(momentum), ema.num_launches


def sweep(shapes, device: torch.device, bw: float, iters: int) -> list[dict]:
    """Block size / warps of the flat kernel (bf16 student, one launch)."""
    teacher, student = make_params(shapes, torch.bfloat16, device)
    n = sum(t.numel() for t in teacher)
    rows = []
    for block in (1024, 2048, 4096, 8192, 16384):
        for warps in (4, 8, 16):
            fn, _ = build_update("ours-flat", teacher, student, 0.996, block, warps)
            t = time_fn(fn, device, 3, iters)
            gbs = n * 10 / (t["p50_ms"] * 1e-3) / 1e9
            rows.append({"block": block, "num_warps": warps, "p50_ms": t["p50_ms"], "gb_s": gbs,
                         "pct_of_copy_bw": 100 * gbs / bw})
    print_table("FlatEMA launch-config sweep (bf16 student, last param set)",
                ["block", "warps", "ms", "GB/s", "% copy"],
                [[r["block"], r["num_warps"], r["p50_ms"], r["gb_s"], r["pct_of_copy_bw"]] for r in rows])
    return rows


NAME = "teacher EMA"  # the record's rows: shape = the parameter set, mode = the student's dtype


def run_param_set(record: Record, set_name: str, shapes, s_dtype: torch.dtype, bw: float, warmup: int,
                  iters: int) -> None:
    """Every provider on one parameter set and student dtype, each on fresh parameters: one row each."""
    device = record.device
    n = sum(s.numel() for s in shapes)
    nbytes = n * (4 + torch.empty((), dtype=s_dtype).element_size() + 4)
    mode = f"{str(s_dtype).replace('torch.', '')} student"
    for name in providers(device):
        teacher, student = make_params(shapes, s_dtype, device)
        facts = {"params": n, "tensors": len(shapes), "bytes": nbytes}
        baseline = None if name == "reference" else "reference"
        try:
            fn, launches = build_update(name, teacher, student, 0.996)
            t = time_fn(fn, device, warmup, iters)
            gbs = nbytes / (t["p50_ms"] * 1e-3) / 1e9
            record.add(NAME, name, mode, set_name, t, peak_memory_bytes=peak_memory(fn, device), baseline=baseline,
                       headline=name == "ours-flat", **facts, launches=launches if name.startswith("ours") else None,
                       gb_s=gbs, pct_of_copy_bw=100 * gbs / bw)
        except Exception as exc:  # recorded, the other providers still run
            record.add(NAME, name, mode, set_name, baseline=baseline, error=error_text(exc), **facts)
            print(f"  {name} {set_name} {mode}: {record.rows[-1]['error']}")
        del teacher, student
        if device.type == "cuda":
            torch.cuda.empty_cache()


def print_results(record: Record, bw: float) -> None:
    table = []
    for r in record.rows:
        x = r["extra"]
        table.append([r["shape"], f"{x['params'] / 1e6:.1f}M", r["mode"], r["provider"], r["p50_ms"], r["p20_ms"],
                      r["p80_ms"], x.get("gb_s"), x.get("pct_of_copy_bw"), speedup(r, record.rows, "reference"),
                      None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2**20])
    print_table(f"Teacher EMA ({record.environment['device']}; copy bandwidth {bw:.0f} GB/s, bytes = read t + read s "
                "+ write t)", ["params", "n", "student", "provider", "median ms", "p20", "p80", "GB/s", "% copy",
                               "× ref", "peak MiB"], table)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_kernel_args(p, "ViT-S + head, fp32 student, few iterations")
    args = p.parse_args(argv)

    device = pick_device(args.device)
    cpu = device.type == "cpu"
    sets = ["vit_small+head"] if args.quick else list(PARAM_SETS)
    dtypes = [torch.float32] if args.quick else [torch.bfloat16, torch.float32]
    iters = args.iters or (5 if args.quick or cpu else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick or cpu else 5)

    record = Record("teacher_ema", device, args.out, stem="bench_ema", iters=iters, warmup=warmup,
                    launch_config={"block": ops.BLOCK, "num_warps": ops.NUM_WARPS})
    bw = record.meta["copy_bandwidth_gbs"] = bandwidth_header(record)
    shapes_by_set = {name: param_shapes(PARAM_SETS[name]) for name in sets}
    for set_name in sets:
        for s_dtype in dtypes:
            run_param_set(record, set_name, shapes_by_set[set_name], s_dtype, bw, warmup, iters)
    print_results(record, bw)
    if args.sweep and device.type == "cuda":
        record.meta["sweep"] = sweep(shapes_by_set[sets[-1]], device, bw, iters)
    print(f"wrote {record.write()}")
    return record.payload()


if __name__ == "__main__":
    main()
