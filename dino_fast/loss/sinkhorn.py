"""Sinkhorn-Knopp teacher targets (DINOv2, Oquab et al. 2023; SwAV, Caron et al. 2020), an alternative to centering.

Instead of ``softmax((t − c)/τt)`` with a running center c, the teacher's targets for a batch are the doubly
normalised ``exp(t/τt)``: every row (image) sums to 1 and every column (prototype) to B/K over the global batch,
so the targets cannot all pick the same prototypes (one-hot collapse) nor ignore the image (each round rescales
the columns the batch over-uses). Three normalisation rounds, as DINOv2.

Each column is first shifted by its maximum over the global batch (an all-reduce MAX). A per-column factor cancels
in the first column normalisation, so the result is unchanged, but ``exp`` can no longer overflow at small τt
(cosine logits / 0.01 span e^200) and no column can underflow to all zeros (its largest entry is exactly 1).
Distributed: the column sums are all-reduced, so every rank normalises against the whole global batch while its
rows stay on it. On CUDA with one rank the arithmetic runs as one compiled (fused) function.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dino_fast.dist import world_size


def _all_reduce(x: torch.Tensor, op) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(x, op=op)
    return x


def _normalise(t: torch.Tensor, column_max: torch.Tensor, teacher_temp: float, n_iterations: int,
               total_rows: int, reduce_columns) -> torch.Tensor:
    q = torch.exp((t - column_max) / teacher_temp)
    k = q.shape[1]
    for _ in range(n_iterations):
        q = q / (reduce_columns(q.sum(dim=0, keepdim=True)) * k)  # each prototype: total mass 1/K
        q = q / (q.sum(dim=1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny) * total_rows)  # each image: 1/B
    return q * total_rows


def _single_rank(t: torch.Tensor, teacher_temp: float, n_iterations: int) -> torch.Tensor:
    return _normalise(t, t.max(dim=0, keepdim=True).values, teacher_temp, n_iterations, t.shape[0], lambda s: s)


_compiled_single_rank = None


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Targets ``[R, K]`` (fp32, rows sum to 1) from teacher logits ``[R, K]`` of this rank's rows.

    Each round: columns ← column / (K · column sum over all ranks' rows), then rows ← row / (B · row sum), B the
    global number of rows; the result is scaled by B so each row is a distribution.
    """
    global _compiled_single_rank
    with torch.autocast(device_type=teacher_logits.device.type, enabled=False):
        t = teacher_logits.detach().float()
        world = world_size()
        if world == 1:
            if t.is_cuda:  # one fused kernel chain instead of ~5 launches per round over [R, K]
                if _compiled_single_rank is None:
                    _compiled_single_rank = torch.compile(_single_rank, dynamic=False)
                return _compiled_single_rank(t, teacher_temp, n_iterations)
            return _single_rank(t, teacher_temp, n_iterations)
        column_max = _all_reduce(t.max(dim=0, keepdim=True).values, dist.ReduceOp.MAX)
        return _normalise(t, column_max, teacher_temp, n_iterations, t.shape[0] * world,
                          lambda s: _all_reduce(s, dist.ReduceOp.SUM))
