"""Teacher EMA as Triton kernels: t ← m·t + (1 − m)·s over every teacher parameter (DINO_SPEC "Optimisation").

The EMA's implementations share one signature ``fn(teacher_params, student_params, momentum) -> None`` (in place on
the teacher, fp32; the student may be fp32 or bf16); the plain-torch ones (the reference loop, the foreach lerp) are
in :mod:`dino_fast.ops.reference`, the choice among them in ``dino_fast.ops.select``.

The Triton path (:class:`FlatEMA`, which :class:`dino_fast.teacher.TeacherEMA` holds; :func:`ema_triton` is its
one-off functional form) lays the teacher parameters out in one flat fp32 buffer and re-points them as views into
it. Where the student's parameters already live in one flat buffer (DeepSpeed ZeRO 0–2 flatten each optimizer param
group into one bf16/fp32 tensor and re-point the module's parameters into it), the teacher mirrors that buffer's
layout, so each student buffer costs one streaming kernel over ``[read t, read s, write t]``. Student parameters
that are not part of such a buffer go through one grouped launch (a table of pointers and sizes, one program per
block of any tensor); anything the kernels cannot take (a non-contiguous student tensor, a non-fp32 teacher) falls
back to the reference loop (:mod:`dino_fast.ops.reference`). Buffers are not averaged.
"""

from __future__ import annotations

import os

import torch

from dino_fast.ops.reference import ema_reference_loop, ema_reference_loop_on_device

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a hard dependency; the torch paths still work without it
    triton = None


_ALIGN = 32  # elements (128 B for fp32): every region of the teacher's flat buffer starts aligned
_MIN_SPAN_COVERAGE = 0.75  # a student buffer is streamed whole if its parameters fill at least this share of it
BLOCK = 4096  # default elements per program (a module attribute so tests can enlarge it for the interpreter)
NUM_WARPS = 8

if triton is not None:

    @triton.jit
    def _momentum(momentum, one_minus_momentum, ON_DEVICE: tl.constexpr):
        """(m, 1 − m): the scalar arguments, or with ON_DEVICE read from the fp32 device memory they point to."""
        if ON_DEVICE:
            return tl.load(momentum), tl.load(one_minus_momentum)
        return momentum, one_minus_momentum

    @triton.jit
    def _ema_flat_kernel(t_ptr, s_ptr, n, momentum, one_minus_momentum, BLOCK: tl.constexpr,
                         ON_DEVICE: tl.constexpr = False):
        """t[i] ← m·t[i] + (1−m)·s[i] for i < n; t fp32, s any float dtype (upcast)."""
        momentum, one_minus_momentum = _momentum(momentum, one_minus_momentum, ON_DEVICE)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        t = tl.load(t_ptr + offs, mask=mask)
        s = tl.load(s_ptr + offs, mask=mask).to(tl.float32)
        tl.store(t_ptr + offs, t * momentum + s * one_minus_momentum, mask=mask)

    @triton.jit
    def _ema_grouped_kernel(
        t_addrs,
        s_addrs,
        numels,
        block_tensor,
        block_start,
        s_like_ptr,  # any student tensor of the group's dtype: gives the element type of the student pointers
        momentum,
        one_minus_momentum,
        BLOCK: tl.constexpr,
        ON_DEVICE: tl.constexpr = False,
    ):
        """Many tensors in one launch: program p updates block ``block_start[p]`` of tensor ``block_tensor[p]``."""
        momentum, one_minus_momentum = _momentum(momentum, one_minus_momentum, ON_DEVICE)
        pid = tl.program_id(0)
        i = tl.load(block_tensor + pid)
        start = tl.load(block_start + pid)
        n = tl.load(numels + i)
        t_ptr = tl.load(t_addrs + i).to(tl.pointer_type(tl.float32))
        s_ptr = tl.load(s_addrs + i).to(s_like_ptr.dtype)
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        t = tl.load(t_ptr + offs, mask=mask)
        s = tl.load(s_ptr + offs, mask=mask).to(tl.float32)
        tl.store(t_ptr + offs, t * momentum + s * one_minus_momentum, mask=mask)


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class FlatEMA:
    """Fused teacher EMA over flat buffers: one streaming kernel per student buffer, one grouped launch for the rest.

    On construction the fp32 teacher parameters are copied into one flat buffer and their ``.data`` re-pointed to
    views of it (values, ``module.parameters()`` and ``state_dict()`` are unchanged; the tensors now share one
    storage). The layout is checked (data pointers) before every update and rebuilt if someone re-pointed the
    student (e.g. DeepSpeed's engine wrapping the model after this object was built).

    Args:
        teacher_params: the teacher's parameters (fp32, contiguous; updated in place).
        student_params: the student's parameters, same shapes and order (fp32 or bf16).
        flatten_student: also move student parameters that are not in one flat buffer into one (per dtype), so the
            update is a single launch. Only for a plain ``nn.Module`` student: storage owned by DeepSpeed must not
            be re-pointed behind its back.
        block, num_warps: launch configuration (defaults: the module's ``BLOCK``, ``NUM_WARPS``).

    Math: t ← m·t + (1 − m)·s (fp32, the student upcast), bytes moved = 4·n (read t) + s.itemsize·n + 4·n (write t).

    Note: the teacher's parameters share one storage afterwards. ``torch.save`` stores it once; safetensors refuses
    shared tensors, so export clones (``{k: v.clone() ...}``) or moves them to another device first.
    """

    def __init__(
        self,
        teacher_params: list[torch.Tensor],
        student_params: list[torch.Tensor],
        flatten_student: bool = False,
        block: int | None = None,
        num_warps: int | None = None,
    ):
        if triton is None:
            raise RuntimeError("FlatEMA needs the `triton` package; use ema_foreach instead")
        self.teacher_params = list(teacher_params)
        self.student_params = list(student_params)
        if len(self.teacher_params) != len(self.student_params):
            raise ValueError(f"{len(self.teacher_params)} teacher vs {len(self.student_params)} student parameters")
        for i, (t, s) in enumerate(zip(self.teacher_params, self.student_params)):
            if t.shape != s.shape:
                raise ValueError(f"teacher/student shape mismatch at parameter {i}: {tuple(t.shape)} vs "
                                 f"{tuple(s.shape)}")
            if t.device != s.device:
                raise ValueError(f"teacher and student parameter {i} are on {t.device} and {s.device}")
        devices = {t.device for t in self.teacher_params}
        if len(devices) > 1:
            raise ValueError(f"teacher parameters span several devices: {devices}")
        self.device = next(iter(devices)) if devices else torch.device("cpu")
        if self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ValueError(f"ema_triton runs on CUDA tensors (got {self.device}); use 'foreach' on CPU")
        if len({id(t) for t in self.teacher_params}) != len(self.teacher_params):
            raise ValueError("a teacher parameter appears twice (tied weights); use ema_foreach")
        self.block = block or BLOCK
        self.num_warps = num_warps or NUM_WARPS
        if flatten_student:
            self._flatten_student()
        self._build()

    # ------------------------------------------------------------------ layout
    def _ptrs(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (tuple(t.data_ptr() for t in self.teacher_params), tuple(s.data_ptr() for s in self.student_params))

    def _kernel_ok(self, i: int) -> bool:
        t, s = self.teacher_params[i], self.student_params[i]
        return t.dtype == torch.float32 and s.is_floating_point() and s.is_contiguous() and t.numel() > 0

    def _flatten_student(self) -> None:
        """Re-point every kernel-eligible student parameter of each dtype into one flat buffer (own storage)."""
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, s in enumerate(self.student_params):
            if self._kernel_ok(i):
                by_dtype.setdefault(s.dtype, []).append(i)
        for dtype, idx in by_dtype.items():
            flat = torch.zeros(sum(_aligned(self.student_params[i].numel()) for i in idx), dtype=dtype,
                               device=self.device)
            off = 0
            for i in idx:
                s = self.student_params[i]
                n = s.numel()
                flat[off:off + n].copy_(s.detach().reshape(-1))
                s.data = flat[off:off + n].view_as(s)
                off += _aligned(n)

    def _build(self) -> None:
        """Group student parameters by storage; mirror dense groups in the teacher's flat buffer; table the rest."""
        groups: dict[tuple[int, torch.dtype], list[int]] = {}
        self.fallback: list[int] = []
        for i, s in enumerate(self.student_params):
            if self._kernel_ok(i):
                groups.setdefault((s.untyped_storage().data_ptr(), s.dtype), []).append(i)
            else:
                self.fallback.append(i)
        spans: list[tuple[list[int], int, int]] = []  # (param indices, storage start, span length)
        loose: list[int] = []
        for idx in groups.values():
            idx.sort(key=lambda i: self.student_params[i].storage_offset())
            starts = [self.student_params[i].storage_offset() for i in idx]
            ends = [a + self.student_params[i].numel() for a, i in zip(starts, idx)]
            overlapping = any(a < e for a, e in zip(starts[1:], ends[:-1]))
            span = max(ends) - starts[0]
            dense = sum(self.student_params[i].numel() for i in idx) >= _MIN_SPAN_COVERAGE * span
            if len(idx) > 1 and dense and not overlapping:
                spans.append((idx, starts[0], span))
            else:
                loose.extend(idx)
        loose.sort()

        total = sum(_aligned(span) for _, _, span in spans) + sum(
            _aligned(self.teacher_params[i].numel()) for i in loose)
        self.flat = torch.zeros(total, dtype=torch.float32, device=self.device)
        self.span_jobs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (teacher region, student region)
        off = 0
        for idx, start, span in spans:
            for i in idx:
                self._repoint_teacher(i, off + self.student_params[i].storage_offset() - start)
            s0 = self.student_params[idx[0]].detach()
            self.span_jobs.append((self.flat[off:off + span], s0.as_strided((span,), (1,), start)))
            off += _aligned(span)
        for i in loose:
            self._repoint_teacher(i, off)
            off += _aligned(self.teacher_params[i].numel())
        self.group_jobs = self._group_tables(loose)
        self._ptr_key = self._ptrs()

    def _repoint_teacher(self, i: int, offset: int) -> None:
        t = self.teacher_params[i]
        n = t.numel()
        self.flat[offset:offset + n].copy_(t.detach().reshape(-1))
        t.data = self.flat[offset:offset + n].view(t.shape)

    def _group_tables(self, loose: list[int]) -> list[tuple[torch.Tensor, ...]]:
        """Per student dtype: device tables of (t address, s address, numel) and (tensor index, start) per block."""
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i in loose:
            by_dtype.setdefault(self.student_params[i].dtype, []).append(i)
        jobs = []
        for idx in by_dtype.values():
            t_addr = [self.teacher_params[i].data_ptr() for i in idx]
            s_addr = [self.student_params[i].data_ptr() for i in idx]
            numel = [self.teacher_params[i].numel() for i in idx]
            blk_tensor, blk_start = [], []
            for j, n in enumerate(numel):
                for start in range(0, n, self.block):
                    blk_tensor.append(j)
                    blk_start.append(start)

            def dev(x: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
                return torch.tensor(x, dtype=dtype, device=self.device)

            s_like = self.student_params[idx[0]].detach()
            jobs.append((dev(t_addr), dev(s_addr), dev(numel), dev(blk_tensor, torch.int32), dev(blk_start), s_like))
        return jobs

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """t ← m·t + (1−m)·s for every parameter pair (re-lays the buffers out first if a pointer moved)."""
        m = float(momentum)
        self._launch(m, 1.0 - m, on_device=False)
        if self.fallback:
            ema_reference_loop([self.teacher_params[i] for i in self.fallback],
                               [self.student_params[i] for i in self.fallback], m)

    @torch.no_grad()
    def update_on_device(self, weights: torch.Tensor) -> None:
        """:meth:`update` with ``weights`` = [m, 1 − m], a float32 device tensor the kernels read (no host sync: a
        CUDA graph can capture it and a replay sees the values of the moment)."""
        if weights.dtype != torch.float32 or weights.numel() != 2 or weights.device != self.device:
            raise ValueError(f"weights must be [m, 1 - m] float32 on {self.device}, got {weights.dtype} "
                             f"{tuple(weights.shape)} on {weights.device}")
        self._launch(weights[0:1], weights[1:2], on_device=True)
        if self.fallback:
            ema_reference_loop_on_device([self.teacher_params[i] for i in self.fallback],
                                         [self.student_params[i] for i in self.fallback], weights)

    def _launch(self, m, w, on_device: bool) -> None:
        if self._ptrs() != self._ptr_key:
            self._build()
        for t_region, s_region in self.span_jobs:
            n = t_region.numel()
            _ema_flat_kernel[(triton.cdiv(n, self.block),)](
                t_region, s_region, n, m, w, BLOCK=self.block, ON_DEVICE=on_device, num_warps=self.num_warps
            )
        for t_addr, s_addr, numel, blk_tensor, blk_start, s_like in self.group_jobs:
            _ema_grouped_kernel[(blk_tensor.numel(),)](
                t_addr, s_addr, numel, blk_tensor, blk_start, s_like, m, w, BLOCK=self.block, ON_DEVICE=on_device,
                num_warps=self.num_warps,
            )

    @property
    def num_launches(self) -> int:
        """Kernel launches per update (spans + grouped tables; the torch fallback not counted)."""
        return len(self.span_jobs) + len(self.group_jobs)


def ema_triton(teacher_params: list[torch.Tensor], student_params: list[torch.Tensor], momentum: float) -> None:
    """One fused update with the common signature: lays out a :class:`FlatEMA` (re-pointing the teacher's parameters
    into its flat buffer) and applies it. The layout is built on every call; a training loop keeps one FlatEMA
    instead (:class:`dino_fast.teacher.TeacherEMA` does). The student's storage is never re-pointed."""
    FlatEMA(teacher_params, student_params).update(momentum)

