"""The DINO loss as two Triton kernels (the teacher step, the student step), their launchers and one autograd Function.

DINO cross-entropy over all (teacher global, student crop) pairs, with the centered, sharpened teacher softmax.

Math (DINO_SPEC "Loss"): with s_v = student logits of crop v / τs and q_iq = softmax((t_iq − c) / τt),

    loss = Σ_{iq∈{0,1}} Σ_{v≠iq} mean_b [ −Σ_k q_iq,k · log_softmax(s_v)_k ] / n_terms,  n_terms = 2·(ncrops − 1).

Since Σ_k q = 1, each pair term is LSE(s_v) − q_iq·s_v, and the targets of crop v fold into Q_v = Σ_{iq≠v} q_iq, so
one log-sum-exp and one dot product per student row suffice whatever the number of crops. The literal pair loop
this is tested against is :func:`dino_fast.ops.reference.reference_dino_loss`.

Shapes:
    student_output: [ncrops·B, K] (crop order G1, G2, L1..LN), teacher_output: [2·B, K] (G1, G2), center: [1, K].

:func:`dino_loss_triton` (and its eager twin :func:`dino_fast.ops.reference.dino_loss_eager`; which one runs is
chosen in ``dino_fast.ops.select``) runs two steps and returns ``(loss, teacher_colsum)``: the scalar loss and the
fp32 column sum of the raw teacher logits over the local rows, ``[1, K]`` (what the center update needs), so the
teacher logits are read once.

1. The teacher step: the targets q and the column sum. Eager: a dense fp32 softmax. Triton:
   ``_teacher_softmax_colsum_kernel``, one program per (column block j, group of rows), reading the teacher logits
   exactly once: per row the block-local softmax numerators e = exp((t − c)/τt − m_j) (fp32) with the block's max
   m_j and sum d_j (the multi-block softmax, its combination deferred to the consumer), and the block's column sum
   for the center update (one atomic add per column per program). The center never re-reads the teacher logits.
2. The student step, an autograd Function that computes the gradient in the forward (Liger-style) and whose
   backward only scales it by the incoming one. Triton: ``_student_loss_grad_kernel``, one program per student row
   (crop v, image b; programs ordered b-major so the ≤ ncrops rows sharing q_0[b], q_1[b] run together and hit L2):
   it combines the teacher block statistics into the row's max M and sum D (q = e·exp(m_j − M)/D), runs an online
   log-sum-exp of s/τs, then one sweep that reads Q_v = Σ_{iq≠v} q_iq, accumulates Q_v·s/τs, and writes

       ∂loss/∂s_v = (|Q_v|·softmax(s_v/τs) − Q_v) / (τs · B · n_terms),   |Q_v| = 1 (global v) or 2 (local v).

:func:`dino_loss_from_targets_triton` runs the student step on given targets (Sinkhorn-Knopp's).
"""

from __future__ import annotations

import math
import os

import torch

from dino_fast.ops.reference import StoredGradLoss, folded_loss, loss_from_targets

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a hard dependency; the eager path still works without it
    triton = None


def _row_major(x: torch.Tensor) -> torch.Tensor:
    """Rows may be strided (a slice of a larger batch); elements within a row must be contiguous."""
    return x if x.stride(1) == 1 and x.stride(0) >= x.shape[1] else x.contiguous()


def _check_triton(*tensors: torch.Tensor) -> None:
    """The Triton path needs its tensors on one CUDA device (or the CPU under ``TRITON_INTERPRET=1``)."""
    if triton is None:
        raise RuntimeError("dino_loss_triton needs the `triton` package")
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        raise ValueError(f"student, teacher and center must be on one device, got {[str(t.device) for t in tensors]}")
    if dev.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(f"dino_loss_triton runs on CUDA tensors (got {dev}); use the 'eager' implementation on CPU")


if triton is not None:

    @triton.jit
    def _teacher_softmax_colsum_kernel(
        t_ptr,
        t_row_stride,
        c_ptr,
        e_ptr,
        m_ptr,
        d_ptr,
        colsum_ptr,
        rows,
        K,
        scale_log2,  # log2(e) / τt
        ROWS: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Column block j of ROWS teacher rows, t read once: block-local softmax numerators e = 2^(x − m_j) with
        x = (t − c)·log2(e)/τt, their max m_j and sum d_j per row, and the block's column sum (one atomic add)."""
        blk = tl.program_id(0)
        nblocks = tl.num_programs(0)
        row0 = tl.program_id(1) * ROWS
        offs = blk * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = offs < K
        c = tl.load(c_ptr + offs, mask=mask, other=0.0)
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for r in range(0, ROWS):
            row = row0 + r
            ok = row < rows
            t = tl.load(t_ptr + row.to(tl.int64) * t_row_stride + offs, mask=mask & ok, other=0.0).to(tl.float32)
            acc += t
            x = tl.where(mask, (t - c) * scale_log2, float("-inf"))
            m = tl.max(x, axis=0)
            e = tl.exp2(x - m)
            tl.store(e_ptr + row.to(tl.int64) * K + offs, e, mask=mask & ok)
            tl.store(m_ptr + row * nblocks + blk, m, mask=ok)
            tl.store(d_ptr + row * nblocks + blk, tl.sum(e, axis=0), mask=ok)
        tl.atomic_add(colsum_ptr + offs, acc, mask=mask)

    @triton.jit
    def _student_loss_grad_kernel(
        s_ptr,
        s_row_stride,
        e_ptr,  # teacher numerators [2B, K] fp32 (see the teacher kernel)
        tm_ptr,  # teacher block maxima [2B, NBT]
        td_ptr,  # teacher block sums [2B, NBT]
        grad_ptr,
        loss_ptr,
        K,
        B,
        ncrops,
        NBT,
        scale_log2,  # log2(e) / τs
        inv_temp,  # 1 / τs
        grad_scale,  # 1 / (τs · B · n_terms)
        loss_scale,  # 1 / (B · n_terms)
        T_BLOCK: tl.constexpr,  # the teacher kernel's BLOCK_K (a multiple of BLOCK_K)
        NBT_P2: tl.constexpr,  # next power of two ≥ NBT
        BLOCK_K: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr,
    ):
        """One student row (crop v, image b): its term (|Q|·LSE(s/τs) − Q·s/τs)/(B·n_terms) and, optionally, its
        gradient. q_iq[k] = e_iq[k]·2^(m_iq,j − M_iq)/D_iq for k in teacher block j (M, D: the row's max and sum)."""
        pid = tl.program_id(0)
        b = pid // ncrops
        v = pid % ncrops
        row = v * B + b
        s_row = s_ptr + row.to(tl.int64) * s_row_stride
        g_row = grad_ptr + row.to(tl.int64) * K
        e0_row = e_ptr + b.to(tl.int64) * K
        e1_row = e_ptr + (B + b).to(tl.int64) * K
        use0 = v != 0  # crop v is paired with teacher crop iq unless v == iq
        use1 = v != 1
        n_q = use0.to(tl.float32) + use1.to(tl.float32)
        # Row normalisers of both teacher rows from their block statistics.
        j = tl.arange(0, NBT_P2)
        m0 = tl.load(tm_ptr + b * NBT + j, mask=j < NBT, other=float("-inf"))
        m1 = tl.load(tm_ptr + (B + b) * NBT + j, mask=j < NBT, other=float("-inf"))
        M0 = tl.max(m0, axis=0)
        M1 = tl.max(m1, axis=0)
        inv_d0 = 1.0 / tl.sum(tl.load(td_ptr + b * NBT + j, mask=j < NBT, other=0.0) * tl.exp2(m0 - M0), axis=0)
        inv_d1 = 1.0 / tl.sum(tl.load(td_ptr + (B + b) * NBT + j, mask=j < NBT, other=0.0) * tl.exp2(m1 - M1), axis=0)

        nblocks = tl.cdiv(K, BLOCK_K)
        cols = tl.arange(0, BLOCK_K)
        m = float("-inf")
        d = 0.0
        for i in range(0, nblocks):
            offs = i * BLOCK_K + cols
            mask = offs < K
            s = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32)
            x = tl.where(mask, s * scale_log2, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new), axis=0)
            m = m_new
        lse2 = m + tl.log2(d)  # log2-domain LSE of s/τs
        dot = 0.0
        for i in range(0, nblocks):
            blk = nblocks - 1 - i  # newest blocks first: still in L2
            offs = blk * BLOCK_K + cols
            mask = offs < K
            jt = (blk * BLOCK_K) // T_BLOCK
            f0 = tl.exp2(tl.load(tm_ptr + b * NBT + jt) - M0) * inv_d0
            f1 = tl.exp2(tl.load(tm_ptr + (B + b) * NBT + jt) - M1) * inv_d1
            s = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32)
            q = tl.load(e0_row + offs, mask=mask & use0, other=0.0) * f0
            q += tl.load(e1_row + offs, mask=mask & use1, other=0.0) * f1
            dot += tl.sum(q * s, axis=0)
            if COMPUTE_GRAD:
                p = tl.exp2(s * scale_log2 - lse2)
                g = (n_q * p - q) * grad_scale
                tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
        tl.store(loss_ptr + row, (n_q * lse2 * 0.6931471805599453 - dot * inv_temp) * loss_scale)


# Launch configurations, module attributes so a benchmark sweep can override them (chosen on an H100 with
# ``python -m benchmarks.bench_loss --sweep``). Teacher: (columns per program, rows per program, warps); student:
# (columns per loop step, warps), one program per row; its block is capped at the teacher's.
TEACHER_CONFIG = (2048, 16, 8)
STUDENT_CONFIG = (2048, 4)


def _pow2_block(block: int, k: int) -> int:
    return max(16, min(triton.next_power_of_2(block), triton.next_power_of_2(k)))


class TeacherTargets:
    """The teacher kernel's output: softmax numerators per column block and the blocks' max/sum (see kernels)."""

    def __init__(self, e: torch.Tensor, block_max: torch.Tensor, block_sum: torch.Tensor, block: int):
        self.e, self.block_max, self.block_sum, self.block = e, block_max, block_sum, block

    def probabilities(self) -> torch.Tensor:
        """q = softmax((t − c)/τt) as a dense fp32 [R, K] tensor (for tests and debugging)."""
        r, k = self.e.shape
        m_row = self.block_max.max(dim=1, keepdim=True).values
        scale = torch.exp2(self.block_max - m_row)
        d_row = (self.block_sum * scale).sum(dim=1, keepdim=True)
        factor = (scale / d_row).repeat_interleave(self.block, dim=1)[:, :k]
        return self.e * factor


def teacher_targets_and_colsum(
    teacher_output: torch.Tensor,
    center: torch.Tensor,
    teacher_temp: float,
    config: tuple[int, int, int] | None = None,
) -> tuple[TeacherTargets, torch.Tensor]:
    """Launcher of the teacher kernel: one read of the teacher logits gives the targets and the column sum.

    Shape: teacher_output [R, K] (rows may be strided), center [1, K] → targets (e: [R, K] fp32, block stats
    [R, ⌈K/block⌉]), colsum [1, K] fp32.
    Math: q = softmax((t − c)/τt) per row, stored as e·2^(m_j − M)/D per column block j; colsum = Σ_rows t (fp32
    atomics, one per column per program: the summation order is not fixed).
    """
    teacher = _row_major(teacher_output.detach())
    rows, k = teacher.shape
    block, rows_per_program, warps = config or TEACHER_CONFIG
    block = _pow2_block(block, k)
    nblocks = triton.cdiv(k, block)
    c = center.detach().reshape(-1).float().contiguous()
    e = torch.empty(rows, k, device=teacher.device, dtype=torch.float32)
    block_max = torch.empty(rows, nblocks, device=teacher.device, dtype=torch.float32)
    block_sum = torch.empty(rows, nblocks, device=teacher.device, dtype=torch.float32)
    colsum = torch.zeros(1, k, device=teacher.device, dtype=torch.float32)
    _teacher_softmax_colsum_kernel[(nblocks, triton.cdiv(rows, rows_per_program))](
        teacher, teacher.stride(0), c, e, block_max, block_sum, colsum, rows, k, math.log2(math.e) / teacher_temp,
        ROWS=rows_per_program, BLOCK_K=block, num_warps=min(warps, max(1, block // 64)),
    )
    return TeacherTargets(e, block_max, block_sum, block), colsum


def student_loss_and_grad(
    student_output: torch.Tensor,
    targets: TeacherTargets,
    student_temp: float,
    ncrops: int,
    compute_grad: bool = True,
    config: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launcher of the student kernel.

    Shape: student_output [ncrops·B, K] (rows may be strided), targets of [2·B, K] → loss (fp32 scalar),
    grad [ncrops·B, K] in the student dtype (None unless ``compute_grad``).
    Math: loss = Σ_rows (|Q_v|·LSE(s_v/τs) − Q_v·s_v/τs) / (B·n_terms); grad = (|Q_v|·softmax − Q_v)/(τs·B·n_terms).
    """
    student = _row_major(student_output.detach())
    rows, k = student.shape
    b = rows // ncrops
    n_terms = 2 * (ncrops - 1)
    block, warps = config or STUDENT_CONFIG
    block = min(_pow2_block(block, k), targets.block)
    nbt = targets.block_max.shape[1]
    grad = torch.empty(rows, k, device=student.device, dtype=student.dtype) if compute_grad else targets.e  # dummy
    row_loss = torch.empty(rows, device=student.device, dtype=torch.float32)
    _student_loss_grad_kernel[(rows,)](
        student, student.stride(0), targets.e, targets.block_max, targets.block_sum, grad, row_loss, k, b, ncrops,
        nbt, math.log2(math.e) / student_temp, 1.0 / student_temp, 1.0 / (student_temp * b * n_terms),
        1.0 / (b * n_terms), T_BLOCK=targets.block, NBT_P2=triton.next_power_of_2(nbt), BLOCK_K=block,
        COMPUTE_GRAD=compute_grad, num_warps=min(warps, max(1, block // 64)),
    )
    return row_loss.sum(), grad if compute_grad else None


class _TritonStudentLoss(StoredGradLoss):
    """The student kernel against targets in the teacher kernel's block form (:class:`TeacherTargets`)."""

    @staticmethod
    def forward(ctx, student_output: torch.Tensor, targets: TeacherTargets, student_temp: float, ncrops: int,
                compute_grad: bool):
        loss, grad = student_loss_and_grad(student_output, targets, student_temp, ncrops, compute_grad)
        ctx.save_for_backward(grad)
        return loss


def _targets_from_probabilities(q: torch.Tensor) -> TeacherTargets:
    """Dense probabilities [R, K] as the student kernel's block form: e = q, every block max 0, block sums of q."""
    rows, k = q.shape
    block = _pow2_block(TEACHER_CONFIG[0], k)
    nblocks = triton.cdiv(k, block)
    e = q.float().contiguous()
    padded = torch.nn.functional.pad(e, (0, nblocks * block - k))
    block_sum = padded.view(rows, nblocks, block).sum(-1)
    return TeacherTargets(e, torch.zeros_like(block_sum), block_sum, block)


def dino_loss_triton(student_output: torch.Tensor, teacher_output: torch.Tensor, center: torch.Tensor,
                     teacher_temp: float, student_temp: float, ncrops: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The folded DINO loss with the fused kernels: the teacher kernel, then the student kernel (module docstring).

    Args:
        student_output: [ncrops·B, K] logits (fp32/bf16/fp16; math in fp32), crop order G1, G2, L1..LN; rows may be
            strided (elements within a row contiguous, else copied).
        teacher_output: [2·B, K] logits (G1, G2), treated as constants.
        center: [1, K], the old one: the caller updates it afterwards with the returned column sum.
        teacher_temp, student_temp: τt, τs.  ncrops: 2 + N.

    Returns:
        ``loss`` (fp32 scalar, differentiable w.r.t. ``student_output``; the gradient, stored in the student dtype,
        is computed in the forward) and ``teacher_colsum`` (fp32 [1, K], Σ_rows of the raw teacher logits).

    Math: loss = Σ_v mean_b [ |Q_v|·LSE(s_v/τs) − Q_v·s_v/τs ] / (2·(ncrops−1)), Q_v = Σ_{iq≠v} q_iq. Its eager twin
    (same signature, same numbers to fp32 rounding) is :func:`dino_fast.ops.reference.dino_loss_eager`.
    """
    _check_triton(student_output, teacher_output, center)
    return folded_loss(teacher_targets_and_colsum, _TritonStudentLoss, student_output, teacher_output, center,
                       teacher_temp, student_temp, ncrops)


def dino_loss_from_targets_triton(student_output: torch.Tensor, targets: torch.Tensor, student_temp: float,
                                  ncrops: int) -> torch.Tensor:
    """The DINO cross-entropy against given teacher targets ``[2·B, K]`` (rows are distributions, e.g. from
    :func:`dino_fast.loss.sinkhorn.sinkhorn_knopp`): the student kernel reading the dense targets."""
    _check_triton(student_output, targets)
    return loss_from_targets(_targets_from_probabilities, _TritonStudentLoss, student_output, targets, student_temp,
                             ncrops)
