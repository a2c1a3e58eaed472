"""Where a finished run's DINO loss sits between the teacher's entropy and ln K, and why (Sinkhorn-Knopp runs).

The loss is the cross-entropy H(q, s) = H(q) + KL(q ‖ s) of the teacher's targets q and the student's softmax s at
τs, averaged over the crop pairs. For the end checkpoint of a run this splits it on a few batches of its own data:

- ``teacher_entropy``: H(q), the loss of a student that reproduced the targets exactly;
- ``floor``: H(q, softmax(t / τs)) with t the teacher's own logits for the same crop: the loss of a student that
  were the teacher and perfectly view-invariant. What it adds to H(q) is the temperature gap alone (q is sharpened
  at τt, the student's softmax at τs; with τt = 0.01 and τs = 0.1 that is worth more than a nat);
- ``same_crop``: the student (eval mode, no drop-path) on the teacher's own global crop;
- ``global_pairs`` / ``local_pairs``: the loss's pairs (the other global crop; the local crops);
- ``loss``: the pairs' mean, as :class:`dino_fast.loss.DINOLoss` computes it (tests check that it is equal).

So ``loss − floor`` is what better view invariance could still gain, and ``floor − teacher_entropy`` is fixed by the
temperatures and the teacher's logits.

    python -m benchmarks.research.loss_parts runs/recipe_check/glyphs [--batches 3]
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from dino_fast.health import teacher_health
from dino_fast.loss.sinkhorn import sinkhorn_knopp


def _ce(q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    return -(q * log_p).sum(dim=-1).mean()


@torch.no_grad()
def loss_parts(student: torch.nn.Module, teacher: torch.nn.Module, crops: list[torch.Tensor], *, teacher_temp: float,
               student_temp: float, sinkhorn_iterations: int = 3) -> dict[str, float]:
    """The parts above for one batch (crops: 2 global then the local ones, each [B, 3, S, S]); models as given."""
    b, n = crops[0].shape[0], len(crops)
    t = teacher(crops[:2]).float()
    s = torch.log_softmax(student(crops).float() / student_temp, dim=-1).chunk(n)
    q = sinkhorn_knopp(t, teacher_temp, sinkhorn_iterations).chunk(2)
    own = torch.log_softmax(t / student_temp, dim=-1).chunk(2)
    pairs = {(iq, v): _ce(q[iq], s[v]) for iq in range(2) for v in range(n) if v != iq}
    global_pairs = [x for (iq, v), x in pairs.items() if v < 2]
    local_pairs = [x for (iq, v), x in pairs.items() if v >= 2]
    return {
        "teacher_entropy": float(teacher_health(t, torch.zeros(1, t.shape[1]), teacher_temp,
                                                targets=torch.cat(q))["teacher_entropy"]),  # the trainer's metric
        "floor": float(sum(_ce(q[i], own[i]) for i in range(2)) / 2),
        "same_crop": float(sum(_ce(q[i], s[i]) for i in range(2)) / 2),
        "global_pairs": float(sum(global_pairs) / len(global_pairs)),
        "local_pairs": float(sum(local_pairs) / len(local_pairs)) if local_pairs else math.nan,
        "loss": float(sum(pairs.values()) / len(pairs)),
        "images": b,
    }


def run_parts(run: str, batches: int = 3) -> dict[str, float]:
    """:func:`loss_parts` of a run folder's latest checkpoint, averaged over the first ``batches`` batches of its
    data's epoch 0 (the run's own augmentation, no workers), with the run's final τt."""
    from dino_fast.eval.export import read_checkpoint
    from dino_fast.models import build_student_teacher
    from pipelines.build import build_loader

    student_ckpt, teacher_ckpt = read_checkpoint(run, "student"), read_checkpoint(run, "teacher")
    cfg = student_ckpt.config
    if cfg.dino.centering != "sinkhorn_knopp":
        raise SystemExit(f"{run}: dino.centering={cfg.dino.centering}; this split is for sinkhorn_knopp runs")
    student, teacher = build_student_teacher(cfg.model, cfg.data.global_crop_size)
    for model, ckpt in ((student, student_ckpt), (teacher, teacher_ckpt)):
        model.load_state_dict(ckpt.state_dict)  # read_checkpoint has stripped DeepSpeed's and compile's prefixes
        model.eval()
    cfg.data.num_workers = 0
    loader = build_loader(cfg.data, seed=cfg.seed)
    loader.set_epoch(0)
    rows = []
    for crops, _ in loader:  # (crops, labels)
        rows.append(loss_parts(student, teacher, [c.float() for c in crops], teacher_temp=cfg.dino.teacher_temp,
                               student_temp=cfg.dino.student_temp, sinkhorn_iterations=cfg.dino.sinkhorn_iterations))
        if len(rows) == batches:
            break
    loader.close()
    out = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "images"}
    return {"run": run, "batches": len(rows), "ln_k": math.log(cfg.model.out_dim), **out}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (their checkpoints/latest is read)")
    parser.add_argument("--batches", type=int, default=3)
    args = parser.parse_args(argv)
    for run in args.runs:
        parts = run_parts(run, args.batches)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in parts.items()}))


if __name__ == "__main__":
    main()
