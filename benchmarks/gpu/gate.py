"""The correctness gate of the GPU decision run (≤ 30 s): the fast variants it times must compute what the plain
step computes, or their timings mean nothing.

Checks, each on a small ViT (depth 2, 2×64 + 4×32 px, B=8, K=4096, fp32, no drop-path), over 3 real steps that cross
nothing but the graph's own warm-up, capture and replay:

- ``graph = eager``: the whole-step CUDA graph (``train.cuda_graph``: an eager warm-up step, a capture + replay, a
  replay) trains the weights and losses of the eager step (CUDA only: "needs CUDA" elsewhere);
- ``packed = unpacked``: the packed-crops student (``model.packed_crops``) trains the weights of the per-resolution one;
- ``EMA on device = float``: the graph step's EMA (momentum read from device memory) equals the float path bit for
  bit, with the kernel the device picks.

Writes ``gate.json`` (into ``$OUT``, else ``--out``) as each check ends; exit code 1 when a check fails (a "needs CUDA"
check on a CPU is not a failure). Run: ``python -m benchmarks.gpu.gate``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.common import environment, error_chain, error_text, pick_device, write_json
from benchmarks.steps import bench_config, synthetic_crops

SCHEMA = "dino_fast.gpu-gate/1"
TOLERANCE = dict(rtol=1e-4, atol=1e-6)  # fp32 on a GPU: TF32 off, but kernels may order sums differently
NEEDS_CUDA = "needs CUDA"


def _train(cfg, device: torch.device, graphed: bool = False, steps: int = 3):
    """``steps`` steps of the trainer's step object from one seed: (student state, teacher state, losses)."""
    from dino_fast.engine import build_training, init_distributed, make_step
    from dino_fast.schedules import Schedules

    init_distributed()
    cfg.train.cuda_graph = graphed
    engine, teacher, dino_loss, ema = build_training(cfg, device, 1, "fp32")
    schedules = Schedules(cfg, 10, cfg.data.batch_size_per_gpu)
    step = make_step(cfg, engine, teacher, dino_loss, ema, "fp32", schedules, 1)
    torch.manual_seed(1)
    batches = [synthetic_crops(cfg, device) for _ in range(steps)]
    metrics = [step(crops, schedules.at(10 + i, 1)) for i, crops in enumerate(batches)]
    losses = [m.read()["loss"] for m in metrics]
    return ({k: v.detach().clone() for k, v in engine.module.state_dict().items()},
            {k: v.detach().clone() for k, v in teacher.state_dict().items()}, losses)


def _compare(a, b) -> str:
    """Empty when the two runs agree within TOLERANCE; else the first difference."""
    for part_a, part_b, what in ((a[0], b[0], "student"), (a[1], b[1], "teacher")):
        for k in part_a:
            if not torch.allclose(part_a[k].float(), part_b[k].float(), **TOLERANCE):
                diff = (part_a[k].float() - part_b[k].float()).abs().max().item()
                return f"{what} {k} differs (max |Δ| {diff:.3g})"
    losses = torch.tensor(a[2]), torch.tensor(b[2])
    if not torch.allclose(*losses, **TOLERANCE):
        return f"losses differ: {a[2]} vs {b[2]}"
    return ""


def _config(device: torch.device, extra: list[str] = ()):
    return bench_config("vit_tiny_patch16_224", 8, 4, 64, 32, 4096, device,
                        ["model.depth=2", "model.patch_size=16", "model.drop_path_rate=0", "deepspeed.precision=fp32",
                         "optim.lr=0.01", *extra])


def check_graph(device: torch.device) -> str:
    if device.type != "cuda":
        raise RuntimeError(f"{NEEDS_CUDA}: the whole-step CUDA graph cannot run on {device.type}")
    return _compare(_train(_config(device), device), _train(_config(device), device, graphed=True))


def check_packed(device: torch.device) -> str:
    return _compare(_train(_config(device), device), _train(_config(device, ["model.packed_crops=true"]), device))


def check_ema(device: torch.device) -> str:
    from dino_fast.ops import ema as ops

    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{NEEDS_CUDA}: the Triton EMA kernels run on CUDA (or in TRITON_INTERPRET=1)")
    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = [(384, 1536), (1536,), (65536 // 16, 256), (7, 3)]
    teacher = [torch.randn(s, generator=g).to(device) for s in shapes]
    student = [torch.randn(s, generator=g).to(device=device, dtype=torch.bfloat16) for s in shapes]
    t_float, t_dev = [t.clone() for t in teacher], [t.clone() for t in teacher]
    float_path, device_path = ops.FlatEMA(t_float, student), ops.FlatEMA(t_dev, student)
    weights = torch.tensor([0.996, 1.0 - 0.996], dtype=torch.float32, device=device)
    for _ in range(3):
        float_path.update(0.996)
        device_path.update_on_device(weights)
    bad = [i for i, (a, b) in enumerate(zip(t_float, t_dev)) if not torch.equal(a, b)]
    return f"parameters {bad} differ" if bad else ""


CHECKS = {"graph = eager": check_graph, "packed = unpacked": check_packed, "EMA on device = float": check_ema}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="default: $OUT/gate.json, else benchmarks/results/gate_<device>.json")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    out = Path(args.out or (Path(os.environ["OUT"]) / "gate.json" if os.environ.get("OUT") else
                            Path(__file__).resolve().parents[1] / "results" / "gate.json"))
    payload = {"schema": SCHEMA, "environment": environment(device), "checks": []}
    failed = False
    for name, check in CHECKS.items():
        t0 = time.perf_counter()
        row = {"check": name, "ok": None, "detail": "", "error": None}
        try:
            row["detail"] = check(device)
            row["ok"] = not row["detail"]
        except Exception as exc:  # recorded with its whole chain; the other checks still run
            row["error"], row["error_chain"] = error_text(exc), error_chain(exc)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        needs_cuda = row["error"] is not None and NEEDS_CUDA in row["error"]
        failed |= row["ok"] is False or (row["error"] is not None and not needs_cuda)
        payload["checks"].append(row)
        write_json(payload, out)  # after every check: a run cut off keeps the finished ones
        verdict = "ok" if row["ok"] else ("skipped" if needs_cuda else "FAILED")
        print(f"gate: {name}: {verdict} ({row['seconds']} s) {row['detail'] or row['error'] or ''}", flush=True)
    print(json.dumps({c["check"]: c["ok"] for c in payload["checks"]}))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
