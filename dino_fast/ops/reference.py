"""The plain-PyTorch side of every op: the reference algorithm as the reference spells it (the baseline each kernel
is tested and benchmarked against, DINO_SPEC "Loss" and "Optimisation"), the eager implementations that run where the
kernels do not (the CPU, or by choice: ``dino_fast.ops.select``), and one maker of random loss inputs for both.

The reference:

- :func:`reference_dino_loss`: the 2·(ncrops−1)-pair loop: one softmax of the centered, sharpened teacher chunk and
  one log_softmax of the student chunk per pair, no folding of the targets. It computes in the dtype it is given:
  tests pass float64 tensors, benchmarks the training dtype.
- :func:`pair_cross_entropy`: that loop on given targets (also the health metrics' cross-entropy).
- :func:`ema_reference_loop`: one mul_/add_ pair per parameter.

The eager implementations, with the signatures of the kernels' (``dino_fast.ops.dino_loss``, ``dino_fast.ops.ema``):

- :func:`dino_loss_eager`, :func:`dino_loss_from_targets_eager`: the folded loss (see ``dino_fast.ops.dino_loss``
  for the math) in fp32 PyTorch, the gradient computed in the forward as the kernel does;
- :func:`ema_foreach`: one multi-tensor lerp (timm's ModelEmaV3), the best plain-torch EMA;
- ``*_on_device``: the EMA with the momentum read from device memory (the CUDA-graph step), bit-equal to the float
  forms.
"""

from __future__ import annotations

from collections.abc import Callable

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


# ---------------------------------------------------------------- the DINO loss, eager (the folded form)
def check_loss_shapes(student_output: torch.Tensor, teacher_output: torch.Tensor, center: torch.Tensor, ncrops: int):
    if ncrops < 2:
        raise ValueError(f"ncrops must be ≥ 2 (two global crops), got {ncrops}")
    if student_output.dim() != 2 or teacher_output.dim() != 2:
        raise ValueError("student_output and teacher_output must be 2-D [rows, K] logits")
    rows, k = student_output.shape
    if rows % ncrops or teacher_output.shape != (2 * (rows // ncrops), k):
        raise ValueError(
            f"student_output {tuple(student_output.shape)} and teacher_output {tuple(teacher_output.shape)} do not "
            f"fit ncrops={ncrops}: expected [ncrops·B, K] and [2·B, K]"
        )
    if center.numel() != k:
        raise ValueError(f"center has {center.numel()} elements, expected K={k} (shape [1, K])")
    return rows // ncrops, k


class StoredGradLoss(torch.autograd.Function):
    """A student step: ``forward(ctx, student_output, targets, student_temp, ncrops, compute_grad)`` returns the loss
    and saves ∂loss/∂student (None without ``compute_grad``); backward only scales it."""

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        if grad is not None:  # scaled on the device: checking for grad_loss == 1 first would sync the host
            grad = grad * grad_loss.to(grad.dtype)
        return grad, None, None, None, None


class _EagerStudentLoss(StoredGradLoss):
    """Folded-target loss in plain PyTorch (fp32 math) against dense targets q [2, B, K]."""

    @staticmethod
    def forward(ctx, student_output: torch.Tensor, q: torch.Tensor, student_temp: float, ncrops: int,
                compute_grad: bool):
        _, b, k = q.shape
        n_terms = 2 * (ncrops - 1)
        x = student_output.detach()
        # One fp32 buffer, reused: s/τs → log_softmax → softmax → gradient.
        s = x.float().div_(student_temp) if x.dtype != torch.float32 else x.div(student_temp)
        ls = torch.log_softmax(s.view(ncrops, b, k), dim=-1)
        del s
        # Per-row cross-entropy −Q_v·log_softmax(s_v) (Σ_k Q_v = |Q_v| folds the LSE in).
        ce = torch.empty(ncrops, b, device=ls.device, dtype=torch.float32)
        ce[0] = torch.einsum("bk,bk->b", q[1], ls[0])
        ce[1] = torch.einsum("bk,bk->b", q[0], ls[1])
        q_local = q[0] + q[1] if ncrops > 2 else None
        if q_local is not None:
            ce[2:] = torch.einsum("bk,vbk->vb", q_local, ls[2:])
        loss = -ce.sum() / (b * n_terms)
        grad = None
        if compute_grad:
            scale = 1.0 / (student_temp * b * n_terms)
            p = ls.exp_()
            p[0].mul_(scale).sub_(q[1], alpha=scale)
            p[1].mul_(scale).sub_(q[0], alpha=scale)
            if q_local is not None:
                p[2:].mul_(2 * scale).sub_(q_local, alpha=scale)
            grad = p.view(ncrops * b, k).to(student_output.dtype)
        ctx.save_for_backward(grad)
        return loss


def _eager_teacher_targets(teacher_output: torch.Tensor, center: torch.Tensor,
                           teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense targets q = softmax((t − c)/τt) as [2, B, K] fp32, and the column sum [1, K] of the teacher rows."""
    teacher = teacher_output.detach().float()
    rows, k = teacher.shape
    q = torch.softmax((teacher - center.detach().float().reshape(1, k)) / teacher_temp, dim=-1)
    return q.view(2, rows // 2, k), teacher.sum(dim=0, keepdim=True)


def folded_loss(teacher_step: Callable, student_step: type[StoredGradLoss], student_output: torch.Tensor,
                teacher_output: torch.Tensor, center: torch.Tensor, teacher_temp: float, student_temp: float,
                ncrops: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The folded DINO loss from an implementation's two steps: ``teacher_step(teacher, center, τt)`` → (targets,
    colsum [1, K]), then ``student_step.apply(student, targets, τs, ncrops, compute_grad)`` → loss. Shared by the
    eager and the Triton implementation (``dino_fast.ops.dino_loss``)."""
    check_loss_shapes(student_output, teacher_output, center, ncrops)
    # needs_input_grad stays True under no_grad: decide here whether a gradient is wanted at all.
    want_grad = torch.is_grad_enabled() and student_output.requires_grad
    # The loss runs under the trainer's autocast; keep every op here (einsum included) in fp32.
    with torch.autocast(device_type=student_output.device.type, enabled=False):
        targets, colsum = teacher_step(teacher_output, center, teacher_temp)
        return student_step.apply(student_output, targets, student_temp, ncrops, want_grad), colsum


def loss_from_targets(as_targets: Callable, student_step: type[StoredGradLoss], student_output: torch.Tensor,
                      targets: torch.Tensor, student_temp: float, ncrops: int) -> torch.Tensor:
    """The student step of :func:`folded_loss` on given targets [2·B, K] (rows are distributions), turned into the
    implementation's target form by ``as_targets``."""
    check_loss_shapes(student_output, targets, targets.new_zeros(1, targets.shape[1]), ncrops)
    want_grad = torch.is_grad_enabled() and student_output.requires_grad
    with torch.autocast(device_type=student_output.device.type, enabled=False):
        q = as_targets(targets.detach().float())
        return student_step.apply(student_output, q, student_temp, ncrops, want_grad)


def dino_loss_eager(student_output: torch.Tensor, teacher_output: torch.Tensor, center: torch.Tensor,
                    teacher_temp: float, student_temp: float, ncrops: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The folded DINO loss in fp32 PyTorch: ``(loss, teacher_colsum)`` as :func:`dino_fast.ops.dino_loss.
    dino_loss_triton` returns them (the CPU path and the fallback)."""
    return folded_loss(_eager_teacher_targets, _EagerStudentLoss, student_output, teacher_output, center,
                       teacher_temp, student_temp, ncrops)


def dino_loss_from_targets_eager(student_output: torch.Tensor, targets: torch.Tensor, student_temp: float,
                                 ncrops: int) -> torch.Tensor:
    """The DINO cross-entropy against given teacher targets ``[2·B, K]`` (Sinkhorn-Knopp's), eager."""
    return loss_from_targets(lambda q: q.view(2, q.shape[0] // 2, q.shape[1]), _EagerStudentLoss, student_output,
                             targets, student_temp, ncrops)


# ---------------------------------------------------------------- the teacher EMA
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


@torch.no_grad()
def ema_foreach(teacher_params: list[torch.Tensor], student_params: list[torch.Tensor], momentum: float) -> None:
    """One multi-tensor lerp (timm ModelEmaV3 style): t + (1−m)·(s − t) = m·t + (1−m)·s."""
    students = [s.detach() if s.dtype == t.dtype else s.detach().to(t.dtype) for t, s in zip(teacher_params,
                                                                                            student_params)]
    torch._foreach_lerp_(teacher_params, students, 1.0 - momentum)


@torch.no_grad()
def ema_foreach_on_device(teacher_params: list[torch.Tensor], student_params: list[torch.Tensor],
                          weights: torch.Tensor) -> None:
    """:func:`ema_foreach` with the momentum on the device: ``weights`` = [m, 1 − m] (float32, 0-dim views are taken);
    the lerp weight is a tensor, so nothing is read back to the host (a CUDA graph can capture it)."""
    w = weights[1].to(teacher_params[0].dtype)
    students = [s.detach() if s.dtype == t.dtype else s.detach().to(t.dtype) for t, s in zip(teacher_params,
                                                                                            student_params)]
    torch._foreach_lerp_(teacher_params, students, [w] * len(teacher_params))


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
