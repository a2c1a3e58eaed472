"""The DINO loss module: owns the center buffer and the per-epoch teacher temperature schedule."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dino_fast.ops import dino_loss as ops
from dino_fast.ops.select import select_impl
from dino_fast.ops.sinkhorn import sinkhorn_knopp
from dino_fast.schedules import teacher_temp_schedule


class DINOLoss(nn.Module):
    """Cross-entropy between the centered, sharpened teacher softmax and the student, over all crop pairs.

    Numerically equal to the reference's 2·(ncrops−1)-pair loop (DINO_SPEC "Loss"); the center is updated after
    the loss (the loss uses the old center) with the teacher logits' mean over all rows of all ranks.

    Args:
        out_dim: K, the number of prototypes.
        ncrops: 2 global + N local crops.
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs: per-epoch τt schedule.
        student_temp: τs.
        center_momentum: EMA factor of the center.
        impl: "auto" | "eager" | "triton"; the environment variable ``DINO_FAST_LOSS`` overrides it, auto is the
            Triton kernels on CUDA, else eager (re-chosen when the module moves to another device).
        centering: "centering" (the reference: softmax((t − center)/τt)) or "sinkhorn_knopp" (DINOv2's doubly
            normalised targets, :func:`dino_fast.ops.sinkhorn.sinkhorn_knopp`; the center is still tracked, for the
            health metrics, but not used).
        sinkhorn_iterations: normalisation rounds of Sinkhorn-Knopp.
    """

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        nepochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        impl: str = "auto",
        centering: str = "centering",
        sinkhorn_iterations: int = 3,
    ):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs
        )
        self.requested_impl = impl
        if centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"centering must be 'centering' or 'sinkhorn_knopp', got {centering!r}")
        self.centering = centering
        self.sinkhorn_iterations = sinkhorn_iterations
        self.impl = self._select_impl()

    def _apply(self, fn, *args, **kwargs):
        # Re-pick the implementation when the module (its center) moves to another device.
        out = super()._apply(fn, *args, **kwargs)
        self.impl = self._select_impl()
        return out

    def _select_impl(self) -> str:
        return select_impl("loss", ops.IMPLEMENTATIONS, self.requested_impl, self.center.device, env="DINO_FAST_LOSS",
                           fallback="eager")

    def sinkhorn_targets(self, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor | None:
        """The Sinkhorn-Knopp targets [2·B, K] of this step (None with the reference centering)."""
        if self.centering != "sinkhorn_knopp":
            return None
        return sinkhorn_knopp(teacher_output, float(self.teacher_temp_schedule[epoch]), self.sinkhorn_iterations)

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """Shapes: student_output [ncrops·B, K], teacher_output [2·B, K]; returns a scalar fp32 loss.

        With Sinkhorn-Knopp centering, ``targets`` (from :meth:`sinkhorn_targets`, computed here if None) replace
        the centered teacher softmax."""
        temp = float(self.teacher_temp_schedule[epoch])
        if self.centering == "sinkhorn_knopp":
            q = self.sinkhorn_targets(teacher_output, epoch) if targets is None else targets
            loss = ops.dino_loss_from_targets(student_output, q, self.student_temp, self.ncrops, self.impl)
            colsum = teacher_output.detach().float().sum(dim=0, keepdim=True)
        else:
            fn = ops.IMPLEMENTATIONS[self.impl]
            loss, colsum = fn(student_output, teacher_output, self.center, temp, self.student_temp, self.ncrops)
        self.update_center(colsum, teacher_output.shape[0])
        return loss

    @torch.no_grad()
    def update_center(self, teacher_colsum: torch.Tensor, rows: int) -> None:
        """center ← m·center + (1−m)·(Σ over all ranks' teacher rows) / (rows per rank × world size)."""
        batch_center = teacher_colsum.float().clone()
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            world = dist.get_world_size()
        batch_center = batch_center / (rows * world)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
