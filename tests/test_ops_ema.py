"""The fused teacher EMA (Triton, flat buffers) against the per-parameter reference loop on a real ViT + DINO head.

CPU runs execute the kernels in the Triton interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py);
the ``cuda`` variants run the compiled kernels.
"""

import copy
from functools import partial

import pytest
import torch

from dino_fast.config import ModelConfig
from dino_fast.models import build_student_teacher
from dino_fast.ops import ema as ops
from dino_fast.ops import select
from dino_fast.ops.reference import ema_reference_loop
from dino_fast.teacher import TeacherEMA

INTERPRETED = type(ops._ema_flat_kernel).__name__ == "InterpretedFunction"
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TIGHT = dict(rtol=1e-6, atol=1e-7)  # fp32 rounding (a compiled kernel may fuse m·t + (1−m)·s into one FMA)


def assert_params_close(module: torch.nn.Module, reference: torch.nn.Module) -> None:
    """Element-wise |t − r| ≤ atol + rtol·|r| over all parameters at once (assert_close per tensor is slow on CPU)."""
    t = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    r = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    ok = (t - r).abs() <= TIGHT["atol"] + TIGHT["rtol"] * r.abs()
    if not bool(ok.all()):
        for (name, a), b in zip(module.named_parameters(), reference.parameters()):
            torch.testing.assert_close(a, b, **TIGHT, msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture
def interpreted(monkeypatch):
    monkeypatch.setattr(ops, "BLOCK", 16384)  # fewer (slow) interpreted programs
    if not INTERPRETED:
        if torch.cuda.is_available():
            pytest.skip("kernels are compiled on this GPU machine: the cuda variants cover them")
        pytest.fail("Triton was imported before TRITON_INTERPRET=1 was set: tests/conftest.py sets it on machines "
                    "without a GPU; run the tests through pytest from the repository root")


@pytest.fixture(scope="module")
def vit_pair():
    """A 2-block ViT-Tiny + DINO head (≈1.1 M parameters), student perturbed away from the teacher."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="vit_tiny_patch16_224", depth=2, out_dim=1000, head_hidden_dim=64, head_bottleneck_dim=32)
    student, teacher = build_student_teacher(cfg, img_size=32)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return student, teacher


def fresh(vit_pair, dtype, device):
    student, teacher = vit_pair
    return copy.deepcopy(student).to(device=device, dtype=dtype), copy.deepcopy(teacher).to(device)


def deepspeed_like(student: torch.nn.Module) -> list[torch.Tensor]:
    """Re-point the student's parameters into two flat buffers, as DeepSpeed ZeRO 0–2 does per param group
    (decay / no-decay, group order ≠ module order, 16-element alignment padding); the frozen gain stays alone."""
    groups = [[], []]
    for p in student.parameters():
        if p.requires_grad:
            groups[int(p.ndim <= 1)].append(p)
    buffers = []
    for params in groups:
        params = params[::-1]
        sizes = [(p.numel() + 15) // 16 * 16 for p in params]
        flat = torch.full((sum(sizes),), float("nan"), dtype=params[0].dtype, device=params[0].device)  # pad: NaN
        off = 0
        for p, n in zip(params, sizes):
            flat[off:off + p.numel()].copy_(p.detach().reshape(-1))
            p.data = flat[off:off + p.numel()].view_as(p)
            off += n
        buffers.append(flat)
    return buffers


def check_against_reference(teacher, reference, student, update, momenta=(0.996, 0.5)):
    sd_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    for m in momenta:
        update(m)
        ema_reference_loop(list(reference.parameters()), list(student.parameters()), m)
        assert_params_close(teacher, reference)
    # Buffers are not averaged.
    for k, v in teacher.named_buffers():
        torch.testing.assert_close(v, sd_before[k])


def run_layouts(vit_pair, dtype, device):
    # 1) plain module student, grouped launch (the student's storage is left alone)
    student, teacher = fresh(vit_pair, dtype, device)
    reference = copy.deepcopy(teacher)
    sd = {k: v.clone() for k, v in teacher.state_dict().items()}
    params = list(teacher.parameters())
    ema = ops.FlatEMA(list(teacher.parameters()), list(student.parameters()))
    # Re-pointing keeps the parameter objects, their values and the state_dict; all live in one storage now.
    assert list(teacher.parameters()) == params
    assert all(torch.equal(v, sd[k]) for k, v in teacher.state_dict().items())
    assert len({p.untyped_storage().data_ptr() for p in teacher.parameters()}) == 1
    assert ema.num_launches == 1 and not ema.span_jobs and not ema.fallback
    check_against_reference(teacher, reference, student, ema.update)

    # 2) student flattened too: one streaming launch
    student, teacher = fresh(vit_pair, dtype, device)
    reference = copy.deepcopy(teacher)
    s_before = [p.detach().clone() for p in student.parameters()]
    ema = ops.FlatEMA(list(teacher.parameters()), list(student.parameters()), flatten_student=True)
    assert ema.num_launches == 1 and len(ema.span_jobs) == 1
    assert all(torch.equal(p.detach(), q) for p, q in zip(student.parameters(), s_before))
    check_against_reference(teacher, reference, student, ema.update)

    # 3) DeepSpeed-like flat buffers (two groups with NaN padding) + one loose frozen parameter
    student, teacher = fresh(vit_pair, dtype, device)
    reference = copy.deepcopy(teacher)
    deepspeed_like(student)
    ema = ops.FlatEMA(list(teacher.parameters()), list(student.parameters()))
    assert len(ema.span_jobs) == 2 and len(ema.group_jobs) == 1
    check_against_reference(teacher, reference, student, ema.update)
    # The student is re-pointed after the layout was built: detected, rebuilt, still exact.
    deepspeed_like(student)
    check_against_reference(teacher, reference, student, ema.update, momenta=(0.99,))

    # 4) the common function signature (layout cached on the parameter tensors) and the TeacherEMA wrapper
    student, teacher = fresh(vit_pair, dtype, device)
    reference = copy.deepcopy(teacher)
    tp, sp = list(teacher.parameters()), list(student.parameters())
    check_against_reference(teacher, reference, student, lambda m: ops.ema_triton(tp, sp, m))
    check_against_reference(teacher, reference, student, lambda m: ops.ema_triton(list(teacher.parameters()),
                                                                                 list(student.parameters()), m),
                            momenta=(0.9,))
    wrapper = TeacherEMA(teacher, student, impl="triton")
    check_against_reference(teacher, reference, student, wrapper.update, momenta=(0.97,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_flat_ema_matches_reference_loop(interpreted, vit_pair, dtype):
    run_layouts(vit_pair, dtype, "cpu")


def test_odd_parameters_fall_back(interpreted):
    # A non-contiguous student tensor and a non-fp32 teacher tensor go through the reference op.
    teacher = [torch.randn(7, 5), torch.randn(33), torch.randn(4, 4, dtype=torch.float64), torch.randn(300)]
    student = [torch.randn(5, 7).t(), torch.randn(33).bfloat16(), torch.randn(4, 4, dtype=torch.float64),
               torch.randn(300)]
    reference = [t.clone() for t in teacher]
    ema = ops.FlatEMA(teacher, student, block=64)
    assert ema.fallback == [0, 2]
    for m in (0.9, 0.5):
        ema.update(m)
        ema_reference_loop(reference, student, m)
    for t, r in zip(teacher, reference):
        torch.testing.assert_close(t, r, **TIGHT)


def on_device_pairs(device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Teacher/student tensors with a loose odd size, a bf16 student and a fallback (non-contiguous) one."""
    g = torch.Generator().manual_seed(3)
    shapes = [(37, 5), (33,), (64, 64), (300,)]
    teacher = [torch.randn(*s, generator=g) for s in shapes]
    student = [torch.randn(*s, generator=g) for s in shapes]
    student[1] = student[1].bfloat16()
    student[0] = torch.randn(5, 37, generator=g).t()  # non-contiguous: the fallback
    return [t.to(device) for t in teacher], [s.to(device) for s in student]


def check_on_device_equals_float(device) -> None:
    """The CUDA-graph step's EMA (momentum read from device memory) gives the float path's teacher bit for bit, for
    the kernels, their fallback, the foreach lerp and the reference loop, on the m and 1 − m of the step's EMA table."""
    momenta = (0.996, 0.9, 0.5)
    table = torch.tensor([[m, 1.0 - m] for m in momenta], dtype=torch.float32, device=device)
    for impl in select.EMA:
        (t_float, s), (t_dev, _) = on_device_pairs(device), on_device_pairs(device)
        if impl == "triton":
            flat_float, flat_dev = ops.FlatEMA(t_float, s, block=64), ops.FlatEMA(t_dev, s, block=64)
            assert flat_float.fallback == [0]
            float_path, device_path = flat_float.update, flat_dev.update_on_device
        else:
            float_path = partial(select.EMA[impl].update, t_float, s)
            device_path = partial(select.EMA[impl].update_on_device, t_dev, s)
        for i, m in enumerate(momenta):
            float_path(m)
            device_path(table[i])
        for a, b in zip(t_float, t_dev):
            assert torch.equal(a, b)


def test_ema_with_the_momentum_on_the_device_equals_the_float_path(interpreted):
    check_on_device_equals_float("cpu")
    with pytest.raises(ValueError, match="float32"):
        ops.FlatEMA(*on_device_pairs("cpu")).update_on_device(torch.tensor([0.9, 0.1], dtype=torch.float64))


@cuda
@needs_cuda
def test_cuda_ema_with_the_momentum_on_the_device_equals_the_float_path():
    check_on_device_equals_float("cuda")


def test_mismatched_params_are_rejected():
    with pytest.raises(ValueError, match="shape mismatch"):
        ops.FlatEMA([torch.zeros(3)], [torch.zeros(4)])
    with pytest.raises(ValueError, match="teacher vs"):
        ops.FlatEMA([torch.zeros(3)], [])


def test_the_chooser_registers_every_ema_and_picks_triton_on_cuda_only(monkeypatch):
    assert set(select.EMA) == {"foreach", "reference", "triton"}
    monkeypatch.delenv("DINO_FAST_EMA", raising=False)
    assert select.ema_impl("auto", "cpu") == "foreach" and select.ema_impl("auto", "cuda") == "triton"
    monkeypatch.setenv("DINO_FAST_EMA", "reference")
    assert select.ema_impl("triton", "cuda") == "reference"


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_flat_ema_matches_reference_loop(vit_pair, dtype):
    run_layouts(vit_pair, dtype, "cuda")
