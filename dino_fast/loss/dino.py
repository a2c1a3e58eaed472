"""The DINO loss module: owns the center buffer and its update; the teacher temperature comes in with each call.

The center update is split as dinov2 splits it, so its communication overlaps the backward pass:

1. :meth:`DINOLoss.forward` computes the loss with the current (old) center; the teacher step that gives the
   targets also gives the column sum of the teacher logits (one read of them, fused in the Triton path);
2. :meth:`DINOLoss.reduce_center_update` (called at the end of forward) starts the all-reduce of that column sum
   without waiting for it;
3. :meth:`DINOLoss.apply_center_update` waits for it and applies center ← m·center + (1−m)·batch_center. Whoever
   reads the center calls it first, as dinov2 does: the step before the health metrics (the next teacher softmax),
   :meth:`DINOLoss.forward` itself, the checkpointer before it saves or loads. With one process there is nothing to
   wait for and the update is applied at once, inside forward.
"""

from __future__ import annotations

import torch
import torch.distributed
from torch import nn

from dino_fast import dist
from dino_fast.loss.sinkhorn import sinkhorn_knopp
from dino_fast.ops import select


class DINOLoss(nn.Module):
    """Cross-entropy between the centered, sharpened teacher softmax and the student, over all crop pairs.

    Numerically equal to the reference's 2·(ncrops−1)-pair loop (DINO_SPEC "Loss",
    :func:`dino_fast.ops.reference.reference_dino_loss`); the center is updated after the loss (the loss uses the old
    center) with the teacher logits' mean over all rows of all ranks (see the module docstring for when).

    Args:
        out_dim: K, the number of prototypes.
        ncrops: 2 global + N local crops.
        student_temp: τs.
        center_momentum: EMA factor of the center.
        impl: "auto" | "eager" | "triton"; the environment variable ``DINO_FAST_LOSS`` overrides it, auto is the
            Triton kernels on CUDA, else eager (``dino_fast.ops.select``).
        device: where the buffers live and the loss runs (the implementation is chosen for it).
        centering: "centering" (the reference: softmax((t − center)/τt)) or "sinkhorn_knopp" (DINOv2's doubly
            normalised targets, :func:`dino_fast.loss.sinkhorn.sinkhorn_knopp`; the center is still tracked, for the
            health metrics, but not used).
        sinkhorn_iterations: normalisation rounds of Sinkhorn-Knopp.
        sinkhorn_queue: Sinkhorn-Knopp normalises this step's teacher rows together with up to this many teacher
            rows of the previous steps (a FIFO of this rank's logits, buffer ``sinkhorn_queue``); the targets are
            the current rows'. 0: off.
    """

    def __init__(self, out_dim: int, ncrops: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 impl: str = "auto", centering: str = "centering", sinkhorn_iterations: int = 3,
                 sinkhorn_queue: int = 0, device: torch.device | str = "cpu"):
        super().__init__()
        if centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"centering must be 'centering' or 'sinkhorn_knopp', got {centering!r}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.centering = centering
        self.sinkhorn_iterations = sinkhorn_iterations
        # (all-reduce handle or None, this rank's batch column sum, rows it sums over): the update not yet applied.
        self._pending: tuple[torch.distributed.Work | None, torch.Tensor, int] | None = None
        self.register_buffer("center", torch.zeros(1, out_dim, device=device))
        if sinkhorn_queue:  # only then: checkpoints of runs without a queue keep their keys
            self.register_buffer("sinkhorn_queue", torch.zeros(sinkhorn_queue, out_dim, device=device))
            self.register_buffer("sinkhorn_queue_rows", torch.zeros((), dtype=torch.long, device=device))
            # The fill level as the host knows it (one push of a known size per step, the same on every rank): the
            # step slices the queue by it without reading the buffer back; a state_dict load reads it once.
            self.register_load_state_dict_post_hook(lambda module, _keys: module._count_queue_rows())
        self.queue_size = sinkhorn_queue
        self._queue_rows = 0
        self.impl, self._ops = select.loss_impl(impl, device)

    def rank_state(self) -> dict[str, torch.Tensor]:
        """This rank's own state for a checkpoint (the Sinkhorn-Knopp queue; empty without one)."""
        if not self.queue_size:
            return {}
        return {"sinkhorn_queue": self.sinkhorn_queue, "sinkhorn_queue_rows": self.sinkhorn_queue_rows}

    @torch.no_grad()
    def load_rank_state(self, state: dict) -> None:
        """Restore :meth:`rank_state`. A queue of another size (``dino.sinkhorn_queue`` changed) or none in the
        checkpoint starts empty again."""
        mine = self.rank_state()
        if mine and mine["sinkhorn_queue"].shape == getattr(state.get("sinkhorn_queue"), "shape", None):
            for k, v in mine.items():
                v.copy_(state[k])
        elif mine:
            mine["sinkhorn_queue_rows"].zero_()
        self._count_queue_rows()

    def _count_queue_rows(self) -> None:
        """The host's fill level from the buffer (after a load: one read, never per step)."""
        if self.queue_size:
            self._queue_rows = int(self.sinkhorn_queue_rows)

    def sinkhorn_targets(self, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor | None:
        """The Sinkhorn-Knopp targets [2·B, K] of this step (None with the reference centering)."""
        if self.centering != "sinkhorn_knopp":
            return None
        if not self.queue_size:
            return sinkhorn_knopp(teacher_output, teacher_temp, self.sinkhorn_iterations)
        queue, rows = self.sinkhorn_queue, teacher_output.shape[0]
        filled = self._queue_rows  # the same on every rank: one push per step
        q = sinkhorn_knopp(torch.cat([teacher_output.detach().float(), queue[:filled]]), teacher_temp,
                           self.sinkhorn_iterations)[:rows]
        with torch.no_grad():  # newest first: shift the queue down by this step's rows
            keep = min(filled, queue.shape[0] - rows)
            if keep > 0:
                queue[rows:rows + keep] = queue[:keep].clone()
            queue[:min(rows, queue.shape[0])] = teacher_output.detach().float()[:queue.shape[0]]
            self._queue_rows = min(filled + rows, queue.shape[0])
            self.sinkhorn_queue_rows.fill_(self._queue_rows)  # for checkpoints
        return q

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, *, teacher_temp: float,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """Shapes: student_output [ncrops·B, K], teacher_output [2·B, K]; returns a scalar fp32 loss.

        ``teacher_temp`` is τt of this step (``StepValues.teacher_temp``). With Sinkhorn-Knopp centering,
        ``targets`` (from :meth:`sinkhorn_targets`, computed here if None) replace the centered teacher softmax.
        Applies a pending center update first and starts this step's (:meth:`reduce_center_update`) before
        returning.
        """
        if self.centering == "sinkhorn_knopp":
            q = self.sinkhorn_targets(teacher_output, teacher_temp) if targets is None else targets
            loss = self._ops.from_targets(student_output, q, self.student_temp, self.ncrops)
            colsum = teacher_output.detach().float().sum(dim=0, keepdim=True)
        else:
            self.apply_center_update()  # the old center: the last step's update applied, this one's not yet
            loss, colsum = self._ops.dino_loss(student_output, teacher_output, self.center, teacher_temp,
                                               self.student_temp, self.ncrops)
        self.reduce_center_update(colsum, teacher_output.shape[0])
        return loss

    @torch.no_grad()
    def reduce_center_update(self, teacher_colsum: torch.Tensor, rows: int) -> None:
        """Start summing this step's teacher column sum [1, K] over the ranks (``rows`` teacher rows per rank); the
        update is applied by :meth:`apply_center_update`, at once when there is one process."""
        self.apply_center_update()  # at most one update in flight
        batch_center = teacher_colsum.float().clone()
        world = dist.world_size()
        work = torch.distributed.all_reduce(batch_center, async_op=True) if world > 1 else None
        self._pending = (work, batch_center, rows * world)
        if work is None:
            self.apply_center_update()

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """center ← m·center + (1−m)·(Σ over all ranks' teacher rows) / (rows per rank × world size), once the
        all-reduce started by :meth:`reduce_center_update` has finished; nothing when no update is pending. Call it
        before reading ``center`` (the step, the checkpointer and forward do)."""
        if self._pending is None:
            return
        work, batch_center, count = self._pending
        self._pending = None
        if work is not None:
            work.wait()
        batch_center = batch_center / count
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
