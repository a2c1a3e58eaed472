"""The reference algorithm's loss and center update, written from DINO_SPEC "Loss" (the baseline of bench_loss).

The eager 2·(ncrops−1)-pair loop: one softmax of the centered, sharpened teacher chunk and one log_softmax of the
student chunk per pair, exactly as the reference code spells it (no folding of the targets). The per-parameter EMA
loop baseline lives in :func:`dino_fast.ops.ema.ema_reference_loop`.
"""

from __future__ import annotations

import torch

from dino_fast.ops.ema import ema_reference_loop

__all__ = ["ReferenceDINOLoss", "ema_reference_loop", "reference_dino_loss"]


def reference_dino_loss(
    student_output: torch.Tensor,
    teacher_output: torch.Tensor,
    center: torch.Tensor,
    teacher_temp: float,
    student_temp: float,
    ncrops: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair-loop DINO loss; same contract as the dino_fast implementations: ``(loss, teacher_colsum)``.

    Shapes: student_output [ncrops·B, K], teacher_output [2·B, K], center [1, K].
    Math: Σ_{iq∈{0,1}} Σ_{v≠iq} mean_b(Σ_k −q_iq · log_softmax(s_v/τs)) / (2·(ncrops−1)).
    """
    student_out = (student_output / student_temp).chunk(ncrops)
    teacher_out = torch.softmax((teacher_output - center) / teacher_temp, dim=-1).detach().chunk(2)
    total_loss = 0
    n_loss_terms = 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = torch.sum(-q * torch.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    total_loss /= n_loss_terms
    return total_loss, teacher_output.detach().sum(dim=0, keepdim=True)


class ReferenceDINOLoss:
    """The reference's loss object: the pair loop, then center ← 0.9·center + 0.1·mean of the teacher rows."""

    def __init__(self, out_dim: int, ncrops: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 device: torch.device | str = "cpu"):
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center = torch.zeros(1, out_dim, device=device)

    def __call__(self, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        loss, _ = reference_dino_loss(student_output, teacher_output, self.center, teacher_temp, self.student_temp,
                                      self.ncrops)
        self.update_center(teacher_output)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """Single-process form of the reference update (the all-reduce is a no-op with one rank)."""
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
