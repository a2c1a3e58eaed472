"""DINO loss benchmark: the reference pair loop, torch.compile of it, and dino_fast's fused loss.

Providers (all return ``(loss, teacher_colsum)`` for the same inputs):
  * ``reference``   the spec's 2·(ncrops−1)-pair loop (dino_fast/ops/reference.py), eager;
  * ``compile``     ``torch.compile`` of that loop (a failure is recorded and the run goes on; a compile-time budget
                    skips the rest once spent);
  * ``ours``        ``dino_loss_triton`` on CUDA, ``dino_loss_eager`` (fused, analytic gradient) on CPU;
  * ``eager-fused`` ``dino_loss_eager`` on CUDA too (the fallback path);
  * ``ours-sinkhorn`` the ``dino.centering=sinkhorn_knopp`` path: Sinkhorn-Knopp targets (3 rounds, compiled on
                    CUDA) and the loss on them (the fused student kernel on CUDA), to compare with ``ours``.
bf16 configurations run under ``torch.autocast(bfloat16)`` as training does (the reference's softmaxes then run in
fp32). Per provider: forward, backward and full-step time (median, p20, p80), peak extra memory, and the full step
against a memory-bandwidth floor: the minimum bytes (read student once, read teacher once, write the student
gradient once) at the device-to-device copy bandwidth measured in the same run.

Run from the repo root: ``python -m benchmarks.bench_loss`` (full GPU suite) or ``--quick`` (CPU / CI sanity).
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings
from collections.abc import Callable

import torch

from benchmarks.common import (
    Record,
    add_kernel_args,
    bandwidth_header,
    copy_bandwidth,
    error_text,
    find_row,
    fmt,
    peak_memory,
    pick_device,
    print_table,
    speedup,
    time_fn,
)
from dino_fast.loss.sinkhorn import sinkhorn_knopp
from dino_fast.ops import dino_loss as ops
from dino_fast.ops import select
from dino_fast.ops.reference import dino_loss_eager, random_loss_inputs, reference_dino_loss

TEACHER_TEMP, STUDENT_TEMP, K = 0.04, 0.1, 65536
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def providers(device: torch.device, ncrops: int, with_compile: bool) -> dict[str, LossFn]:
    def bind(fn):
        return lambda s, t, c: fn(s, t, c, TEACHER_TEMP, STUDENT_TEMP, ncrops)

    out: dict[str, LossFn] = {"reference": bind(reference_dino_loss)}
    if with_compile:
        torch._dynamo.reset()  # a fresh cache per configuration: no recompile limit, compile time measured alone
        out["compile"] = bind(torch.compile(reference_dino_loss, dynamic=False))
    fused = device.type == "cuda" and "triton" in select.LOSS
    if fused:
        out["ours"] = bind(ops.dino_loss_triton)
        out["eager-fused"] = bind(dino_loss_eager)
    else:
        out["ours"] = bind(dino_loss_eager)
    from_targets = select.LOSS["triton" if fused else "eager"].from_targets

    def sinkhorn_loss(s, t, c):
        q = sinkhorn_knopp(t, TEACHER_TEMP, 3)
        loss = from_targets(s, q, STUDENT_TEMP, ncrops)
        return loss, t.float().sum(dim=0, keepdim=True)

    out["ours-sinkhorn"] = sinkhorn_loss
    return out


def bench_provider(fn: LossFn, inputs, dtype: torch.dtype, device: torch.device, warmup: int, iters: int) -> dict:
    student, teacher, center = inputs
    x = student.clone().requires_grad_()
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()
    state: dict = {}

    def forward():
        with amp:
            state["loss"] = fn(x, teacher, center)[0]

    def fresh_forward():
        x.grad = None
        forward()

    def backward():
        state["loss"].backward()

    def full():
        fresh_forward()
        backward()

    t0 = time.perf_counter()
    full()  # first call: compiles (torch.compile, Triton), measured separately
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    first_call_s = time.perf_counter() - t0
    loss_value = float(state["loss"].detach())
    res = {
        "first_call_s": first_call_s,
        "loss": loss_value,
        "forward": time_fn(fresh_forward, device, warmup, iters),
        "backward": time_fn(backward, device, warmup, iters, setup=fresh_forward),
        "full": time_fn(full, device, warmup, iters),
    }
    x.grad = None
    state.clear()
    res["peak_memory_bytes"] = peak_memory(full, device)
    x.grad = None
    state.clear()
    return res


def floor_bytes(b: int, ncrops: int, k: int, dtype: torch.dtype) -> int:
    """Read student logits once + read teacher logits once + write the student gradient once."""
    item = torch.empty((), dtype=dtype).element_size()
    return (2 * ncrops * b * k + 2 * b * k) * item


def sweep(device: torch.device, iters: int) -> dict:
    """Launch-config sweep of the two Triton kernels at the real size (B=256, 2+10 crops, K=65536, bf16)."""
    b, ncrops = 256, 12
    student, teacher, center = random_loss_inputs(b, ncrops, K, torch.bfloat16, device)
    bw = copy_bandwidth(device)
    t_bytes = teacher.numel() * 2 + teacher.numel() * 4  # read t, write the fp32 numerators
    s_bytes = student.numel() * 2 * 2 + teacher.numel() * 4  # read s, write grad, read the numerators once
    teacher_rows, student_rows = [], []
    for cfg in [(1024, 16, 4), (2048, 16, 4), (2048, 16, 8), (4096, 16, 8), (2048, 4, 4), (4096, 4, 8), (4096, 32, 8)]:
        t = time_fn(lambda cfg=cfg: ops.teacher_targets_and_colsum(teacher, center, TEACHER_TEMP, cfg), device, 3,
                    iters)
        teacher_rows.append({"config": cfg, "ms": t["p50_ms"],
                             "pct_of_copy_bw": 100 * t_bytes / 1e9 / bw / (t["p50_ms"] * 1e-3)})
    targets, _ = ops.teacher_targets_and_colsum(teacher, center, TEACHER_TEMP, (4096, 16, 8))
    for cfg in [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16)]:
        t = time_fn(lambda cfg=cfg: ops.student_loss_and_grad(student, targets, STUDENT_TEMP, ncrops, True, cfg),
                    device, 3, iters)
        student_rows.append({"config": cfg, "ms": t["p50_ms"],
                             "pct_of_copy_bw": 100 * s_bytes / 1e9 / bw / (t["p50_ms"] * 1e-3)})
    print_table(f"Launch-config sweep (B={b}, {ncrops} crops, K={K}, bf16; copy {bw:.0f} GB/s)",
                ["kernel", "config", "ms", "% copy bw (bytes it must move)"],
                [["teacher", str(r["config"]), r["ms"], r["pct_of_copy_bw"]] for r in teacher_rows]
                + [["student", str(r["config"]), r["ms"], r["pct_of_copy_bw"]] for r in student_rows])
    return {"teacher": teacher_rows, "student": student_rows}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_kernel_args(p, "B=32, 2+8 crops, fp32, few iterations (CPU / CI sanity)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None, help="include torch.compile")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--compile-budget-s", type=float, default=40.0,
                   help="skip the compile provider for the remaining configurations once its compiles took this long")
    return p.parse_args(argv)


NAME = "DINO loss"  # the record's rows: modes forward, backward, fwd+bwd; baseline the reference pair loop


def loss_shape(b: int, ncrops: int, dtype: torch.dtype) -> str:
    return f"B={b} {ncrops} crops K={K} {str(dtype).replace('torch.', '')}"


def run_config(record: Record, inputs, b: int, ncrops: int, dtype: torch.dtype, floor_ms: float, use_compile: bool,
               warmup: int, iters: int) -> float:
    """Every provider at one configuration: forward, backward and fwd+bwd rows (or one error row) against the
    reference. Returns the seconds the compile provider's first call took."""
    device, shape = record.device, loss_shape(b, ncrops, dtype)
    compile_s = 0.0
    for name, fn in providers(device, ncrops, use_compile).items():
        baseline = None if name == "reference" else "reference"
        try:
            res = bench_provider(fn, inputs, dtype, device, warmup, iters)
        except Exception as exc:  # a provider that fails (compile, OOM) is recorded, the rest still run
            record.add(NAME, name, "fwd+bwd", shape, baseline=baseline, error=error_text(exc), floor_ms=floor_ms)
            print(f"  {name} {shape}: {record.rows[-1]['error']}")
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for mode in ("forward", "backward"):
            record.add(NAME, name, mode, shape, res[mode], baseline=baseline)
        record.add(NAME, name, "fwd+bwd", shape, res["full"], peak_memory_bytes=res["peak_memory_bytes"],
                   baseline=baseline, headline=name == "ours", first_call_s=res["first_call_s"], loss=res["loss"],
                   floor_ms=floor_ms, pct_of_floor=100 * floor_ms / res["full"]["p50_ms"])
        if name == "compile":
            compile_s += res["first_call_s"]
    return compile_s


def add_loss_diffs(rows: list[dict]) -> None:
    """Each fwd+bwd row's loss against the reference's at the same configuration (``extra.loss_diff_vs_reference``)."""
    for r in rows:
        ref = find_row(rows, NAME, r["shape"], "reference", "fwd+bwd")
        if r["mode"] == "fwd+bwd" and r["error"] is None and ref is not None:
            r["extra"]["loss_diff_vs_reference"] = abs(r["extra"]["loss"] - ref["extra"]["loss"])


def print_results(record: Record, bw: float) -> None:
    """One line per provider and configuration: fwd+bwd with its forward and backward times."""
    table = []
    for r in (r for r in record.rows if r["mode"] == "fwd+bwd"):
        x, t = r["extra"], [r["provider"], r["shape"]]
        if r["error"] is None:
            fwd, bwd = (find_row(record.rows, NAME, r["shape"], r["provider"], m) for m in ("forward", "backward"))
            t += [fwd["p50_ms"], bwd["p50_ms"], f"{fmt(r['p50_ms'])} [{fmt(r['p20_ms'])}-{fmt(r['p80_ms'])}]",
                  speedup(r, record.rows, "reference"), x["pct_of_floor"],
                  None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2**20, x["first_call_s"], ""]
        else:
            t += [None] * 7 + [r["error"][:70]]
        table.append(t)
    print_table(f"DINO loss, K={K} ({record.environment['device']}; floor = bytes at {bw:.0f} GB/s copy bandwidth)",
                ["provider", "shape", "fwd ms", "bwd ms", "full ms [p20-p80]", "× ref", "% floor", "peak MiB",
                 "1st call s", "note"], table)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    cpu = device.type == "cpu"
    warnings.filterwarnings("ignore", message=".*[Oo]nline softmax is disabled.*")  # inductor's note, per compile
    if args.quick:
        configs = [(32, 10, torch.float32)]
    else:
        # Most telling first (the compile budget may skip the tail): the real size, then the default recipe.
        configs = [(b, n, d) for d in (torch.bfloat16, torch.float32) for b, n in ((256, 12), (64, 10), (256, 10),
                                                                                    (64, 12))]
    iters = args.iters or (3 if args.quick or cpu else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick or cpu else 3)
    with_compile = args.compile if args.compile is not None else not (args.quick or cpu)

    record = Record("dino_loss", device, args.out, stem="bench_loss", iters=iters, warmup=warmup,
                    teacher_temp=TEACHER_TEMP, student_temp=STUDENT_TEMP)
    bw = record.meta["copy_bandwidth_gbs"] = bandwidth_header(record)
    compile_spent = 0.0
    for b, ncrops, dtype in configs:
        inputs = random_loss_inputs(b, ncrops, K, dtype, device)
        floor_ms = floor_bytes(b, ncrops, K, dtype) / (bw * 1e9) * 1e3
        use_compile = with_compile and compile_spent < args.compile_budget_s
        compile_spent += run_config(record, inputs, b, ncrops, dtype, floor_ms, use_compile, warmup, iters)
        if with_compile and not use_compile:
            record.add(NAME, "compile", "fwd+bwd", loss_shape(b, ncrops, dtype), baseline="reference",
                       error=f"skipped: compile budget of {args.compile_budget_s:.0f} s spent")
        del inputs
        record.write(partial=True)  # partial results survive a timeout of the caller

    add_loss_diffs(record.rows)
    print_results(record, bw)
    record.meta.update(partial=False, launch_config={"teacher": ops.TEACHER_CONFIG, "student": ops.STUDENT_CONFIG})
    if args.sweep and device.type == "cuda":
        record.meta["sweep"] = sweep(device, iters)
    print(f"wrote {record.write()}")
    return record.payload()


if __name__ == "__main__":
    main()
