"""The reference algorithm, written as the reference spells it: the baseline every kernel here is tested and
benchmarked against (DINO_SPEC "Loss" and "Optimisation"), and one maker of random loss inputs for both.

- :func:`reference_dino_loss`: the 2·(ncrops−1)-pair loop: one softmax of the centered, sharpened teacher chunk and
  one log_softmax of the student chunk per pair, no folding of the targets. It computes in the dtype it is given:
  tests pass float64 tensors, benchmarks the training dtype.
- :func:`pair_cross_entropy`: that loop on given targets (also the health metrics' cross-entropy).
- :func:`ema_reference_loop`: one mul_/add_ pair per parameter.
"""

from __future__ import annotations

import torch


def pair_cross_entropy(targets: torch.Tensor, student_output: torch.Tensor, student_temp: float,
                       ncrops: int) -> torch.Tensor:
    """Mean over the pairs (teacher crop iq ∈ {0, 1}, student crop v ≠ iq) of mean_b Σ_k −q_iq · log_softmax(s_v/τs).

    Shapes: targets [2·B, K] (rows are distributions), student_output [ncrops·B, K] → scalar.
    """
    student_out = (student_output / student_temp).chunk(ncrops)
    total_loss = 0
    n_loss_terms = 0
    for iq, q in enumerate(targets.chunk(2)):
        for v in range(len(student_out)):
            if v == iq:
                continue  # a crop is not its own target
            loss = torch.sum(-q * torch.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    total_loss /= n_loss_terms
    return total_loss


def reference_dino_loss(student_output: torch.Tensor, teacher_output: torch.Tensor, center: torch.Tensor,
                        teacher_temp: float, student_temp: float, ncrops: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair-loop DINO loss with the contract of the dino_fast implementations: ``(loss, teacher_colsum)``.

    Shapes: student_output [ncrops·B, K], teacher_output [2·B, K], center [1, K] → scalar, [1, K].
    Math: q = softmax((t − c)/τt) per teacher row, then :func:`pair_cross_entropy`.
    """
    q = torch.softmax((teacher_output - center) / teacher_temp, dim=-1).detach()
    return pair_cross_entropy(q, student_output, student_temp, ncrops), teacher_output.detach().sum(dim=0, keepdim=True)


@torch.no_grad()
def ema_reference_loop(teacher_params: list[torch.Tensor], student_params: list[torch.Tensor], momentum: float) -> None:
    """t ← m·t + (1 − m)·s, one mul_/add_ pair per parameter (the baseline of the fused EMA)."""
    for t, s in zip(teacher_params, student_params):
        t.mul_(momentum).add_((1 - momentum) * s.detach().to(t.dtype))


def ema_reference_loop_on_device(teacher_params: list[torch.Tensor], student_params: list[torch.Tensor],
                                 weights: torch.Tensor) -> None:
    """:func:`ema_reference_loop` with ``weights`` = [m, 1 − m] (float32 on the device): the same ops with tensor
    factors, so nothing is read back to the host and the result is the same bit for bit."""
    m, w = weights[0], weights[1]
    for t, s in zip(teacher_params, student_params):
        t.mul_(m).add_(w * s.detach().to(t.dtype))


def random_loss_inputs(b: int, ncrops: int, k: int, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu", seed: int = 0):
    """(student [ncrops·B, K], teacher [2·B, K], center [1, K]): logits shaped like the head's (cosine similarities,
    uniform in [-1, 1]) in ``dtype``, and a small non-zero fp32 center. Drawn on the CPU from ``seed``, so every
    device gets the same numbers."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    student = (torch.rand(ncrops * b, k, generator=g) * 2 - 1).to(device=device, dtype=dtype)
    teacher = (torch.rand(2 * b, k, generator=g) * 2 - 1).to(device=device, dtype=dtype)
    center = (torch.randn(1, k, generator=g) * 0.1).to(device)
    return student, teacher, center
