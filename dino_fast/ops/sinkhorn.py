"""Sinkhorn-Knopp teacher targets (DINOv2, Oquab et al. 2023; SwAV, Caron et al. 2020), an alternative to centering.

Instead of ``softmax((t − c)/τt)`` with a running center c, the teacher's targets for a batch are the doubly
normalised ``exp(t/τt)``: every row (image) sums to 1 and every column (prototype) to B/K over the global batch,
so the targets cannot all pick the same prototypes (one-hot collapse) nor ignore the image (each iteration rescales
the columns the batch over-uses). Three normalisation rounds, as DINOv2.

Computed in the log domain (each normalisation subtracts a log-sum-exp), so neither ``exp(t/τt)`` overflowing nor a
whole column underflowing at small τt (cosine logits / 0.01 span e^200) can give inf or 0/0. Distributed: the
column log-sum-exps run over all ranks' rows (an all-reduce MAX, then SUM), so every rank normalises against the
whole global batch while its rows stay on it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


def _column_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """log Σ_rows exp(x) per column over every rank's rows: [R, K] → [1, K]."""
    m = _all_reduce(x.max(dim=0, keepdim=True).values, dist.ReduceOp.MAX if dist.is_available() else None)
    return m + torch.log(_all_reduce(torch.exp(x - m).sum(dim=0, keepdim=True)))


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Targets ``[R, K]`` (fp32, rows sum to 1) from teacher logits ``[R, K]`` of this rank's rows.

    Each round: columns ← column / (K · column sum over all ranks' rows), then rows ← row / (B · row sum), B the
    global number of rows; the result is scaled by B so each row is a distribution.
    """
    with torch.autocast(device_type=teacher_logits.device.type, enabled=False):
        log_q = teacher_logits.detach().float() / teacher_temp
        rows, k = log_q.shape
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        log_k, log_b = math.log(k), math.log(rows * world)
        for _ in range(n_iterations):
            log_q = log_q - (_column_logsumexp(log_q) + log_k)  # each prototype: total mass 1/K
            log_q = log_q - (torch.logsumexp(log_q, dim=1, keepdim=True) + log_b)  # each image: total mass 1/B
        return torch.exp(log_q + log_b)
