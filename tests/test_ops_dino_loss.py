"""The fused DINO loss (Triton and eager) against the literal pair loop of the spec, in float64.

CPU runs execute the Triton kernels in the interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py before
triton is first imported); the ``cuda`` variants run the compiled kernels, including the real size (B=256, 2+10
crops, K=65536).
"""


import pytest
import torch

from dino_fast.ops import dino_loss as ops
from dino_fast.ops import select
from dino_fast.ops.reference import dino_loss_eager, random_loss_inputs, reference_dino_loss

INTERPRETED = type(ops._student_loss_grad_kernel).__name__ == "InterpretedFunction"
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TEACHER_TEMP, STUDENT_TEMP = 0.04, 0.1


@pytest.fixture
def interpreted():
    if not INTERPRETED:
        if torch.cuda.is_available():
            pytest.skip("kernels are compiled on this GPU machine: the cuda variants cover them")
        pytest.fail("Triton was imported before TRITON_INTERPRET=1 was set: tests/conftest.py sets it on machines "
                    "without a GPU; run the tests through pytest from the repository root")


def reference_loss64(student, teacher, center, teacher_temp, student_temp, ncrops):
    """DINO_SPEC "Loss", literally: 2·(ncrops−1) pairs of softmax targets × log_softmax, in float64."""
    return reference_dino_loss(student.double(), teacher.double(), center.double(), teacher_temp, student_temp,
                               ncrops)[0]


TOL = {  # loss (fp32 math on the same inputs in both dtypes), gradient (stored in the student dtype)
    torch.float32: dict(loss=dict(rtol=2e-5, atol=2e-5), grad=dict(rtol=1e-4, atol=1e-7)),
    torch.bfloat16: dict(loss=dict(rtol=2e-5, atol=2e-5), grad=dict(rtol=1.6e-2, atol=1e-6)),
}


def check(fn, b, k, ncrops, dtype, device, grad_scale=1.0, seed=0):
    student, teacher, center = random_loss_inputs(b, ncrops, k, dtype, device, seed)
    s64 = student.double().requires_grad_()
    ref = reference_loss64(s64, teacher, center, TEACHER_TEMP, STUDENT_TEMP, ncrops)
    (ref * grad_scale).backward()

    x = student.clone().requires_grad_()
    loss, colsum = fn(x, teacher, center, TEACHER_TEMP, STUDENT_TEMP, ncrops)
    (loss * grad_scale).backward() if grad_scale != 1.0 else loss.backward()

    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), ref.detach(), **TOL[dtype]["loss"])
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    grad_atol = TOL[dtype]["grad"]["atol"] + TOL[dtype]["grad"]["rtol"] * s64.grad.abs().max().item()
    torch.testing.assert_close(x.grad.double(), s64.grad, rtol=TOL[dtype]["grad"]["rtol"], atol=grad_atol)
    assert colsum.shape == (1, k) and colsum.dtype == torch.float32
    torch.testing.assert_close(colsum.double(), teacher.double().sum(0, keepdim=True), rtol=1e-5, atol=1e-4)


CASES = [  # (B, K, ncrops, dtype)
    (5, 1007, 2, torch.float32),
    (5, 1007, 3, torch.float32),
    (3, 1007, 10, torch.float32),
    (5, 1007, 3, torch.bfloat16),
    (3, 1007, 10, torch.bfloat16),
    (2, 65536, 4, torch.float32),
]
IDS = [f"B{b}-K{k}-crops{n}-{str(d)[6:]}" for b, k, n, d in CASES]


@pytest.mark.parametrize("b,k,ncrops,dtype", CASES, ids=IDS)
def test_triton_matches_pair_loop(interpreted, b, k, ncrops, dtype):
    check(ops.dino_loss_triton, b, k, ncrops, dtype, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_grad_output_not_one(interpreted, dtype):
    check(ops.dino_loss_triton, 3, 1007, 4, dtype, "cpu", grad_scale=0.37, seed=1)


@pytest.mark.parametrize("b,k,ncrops,dtype", CASES, ids=IDS)
def test_eager_matches_pair_loop(b, k, ncrops, dtype):
    check(dino_loss_eager, b, k, ncrops, dtype, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_grad_output_not_one(dtype):
    check(dino_loss_eager, 3, 1007, 4, dtype, "cpu", grad_scale=0.37, seed=1)


def test_triton_equals_eager_and_strided_inputs(interpreted):
    student, teacher, center = random_loss_inputs(4, 3, 333, torch.float32, "cpu", seed=2)
    wide = torch.zeros(student.shape[0], 400)
    wide[:, :333] = student
    strided = wide[:, :333].requires_grad_()  # row stride 400: read in place
    transposed = teacher.t().contiguous().t()  # column-major: copied
    loss, colsum = ops.dino_loss_triton(strided, transposed, center, TEACHER_TEMP, STUDENT_TEMP, 3)
    loss.backward()
    x = student.clone().requires_grad_()
    loss_e, colsum_e = dino_loss_eager(x, teacher, center, TEACHER_TEMP, STUDENT_TEMP, 3)
    loss_e.backward()
    torch.testing.assert_close(loss, loss_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(colsum, colsum_e, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(strided.grad, x.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("teacher_cfg,student_cfg", [((1024, 3, 4), (256, 4)), ((256, 16, 8), (1024, 8)),
                                                     ((64, 1, 1), (64, 1))])
def test_triton_launch_configs(interpreted, teacher_cfg, student_cfg):
    # Row groups that do not divide the rows, student blocks smaller than the teacher's, K not a block multiple.
    student, teacher, center = random_loss_inputs(5, 3, 1007, torch.float32, "cpu", seed=5)
    targets, colsum = ops.teacher_targets_and_colsum(teacher, center, TEACHER_TEMP, teacher_cfg)
    q = torch.softmax((teacher.double() - center.double()) / TEACHER_TEMP, dim=-1)
    torch.testing.assert_close(targets.probabilities().double(), q, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(colsum.double(), teacher.double().sum(0, keepdim=True), rtol=1e-5, atol=1e-4)
    loss, grad = ops.student_loss_and_grad(student, targets, STUDENT_TEMP, 3, True, student_cfg)
    x = student.clone().requires_grad_()
    loss_e, _ = dino_loss_eager(x, teacher, center, TEACHER_TEMP, STUDENT_TEMP, 3)
    loss_e.backward()
    torch.testing.assert_close(loss, loss_e.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, x.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ["eager", "triton"])
def test_autocast_keeps_fp32_math(name, request):
    if name == "triton":
        request.getfixturevalue("interpreted")
    fn = select.LOSS[name].dino_loss
    student, teacher, center = random_loss_inputs(3, 4, 1007, torch.bfloat16, "cpu", seed=4)
    plain, _ = fn(student, teacher, center, TEACHER_TEMP, STUDENT_TEMP, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast, _ = fn(student, teacher, center, TEACHER_TEMP, STUDENT_TEMP, 4)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain, rtol=1e-6, atol=1e-6)


def test_triton_without_grad_and_uniform_collapse(interpreted):
    # Identical logits everywhere: q and softmax are uniform, the loss is ln K, the gradient zero.
    k = 512
    student = torch.full((3 * 2, k), 0.3)
    teacher = torch.full((2 * 2, k), -0.2)
    loss, colsum = ops.dino_loss_triton(student, teacher, torch.zeros(1, k), TEACHER_TEMP, STUDENT_TEMP, 3)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, torch.tensor(torch.log(torch.tensor(float(k))).item()), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(colsum, torch.full((1, k), -0.8))


@pytest.mark.parametrize("name", ["eager", "triton"])
def test_no_grad_mode(name, request):
    if name == "triton":
        request.getfixturevalue("interpreted")
    fn = select.LOSS[name].dino_loss
    student, teacher, center = random_loss_inputs(2, 3, 300, torch.float32, "cpu", seed=6)
    x = student.clone().requires_grad_()
    with torch.no_grad():
        loss, _ = fn(x, teacher, center, TEACHER_TEMP, STUDENT_TEMP, 3)
    assert not loss.requires_grad
    ref = reference_loss64(student.double(), teacher, center, TEACHER_TEMP, STUDENT_TEMP, 3)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("fn", [dino_loss_eager, ops.dino_loss_triton], ids=["eager", "triton"])
def test_bad_shapes_are_rejected(fn):
    s, t, c = random_loss_inputs(2, 3, 64, torch.float32, "cpu")
    with pytest.raises(ValueError, match="ncrops"):
        fn(s, t, c, TEACHER_TEMP, STUDENT_TEMP, 1)
    with pytest.raises(ValueError, match="do not fit"):
        fn(s[:-1], t, c, TEACHER_TEMP, STUDENT_TEMP, 3)
    with pytest.raises(ValueError, match="center"):
        fn(s, t, c[:, :10], TEACHER_TEMP, STUDENT_TEMP, 3)


def test_the_chooser_registers_both_and_picks_triton_on_cuda_only(monkeypatch):
    assert select.LOSS["triton"].dino_loss is ops.dino_loss_triton
    assert select.LOSS["eager"].from_targets is not select.LOSS["triton"].from_targets
    monkeypatch.delenv("DINO_FAST_LOSS", raising=False)
    assert select.loss_impl("auto", "cpu")[0] == "eager" and select.loss_impl("auto", "cuda")[0] == "triton"
    assert select.loss_impl("triton", "cpu")[0] == "triton"  # asked for: the interpreter runs it on CPU
    with pytest.raises(ValueError, match="not available"):
        select.loss_impl("fused", "cpu")
    monkeypatch.setenv("DINO_FAST_LOSS", "eager")  # the environment variable wins over the config
    assert select.loss_impl("triton", "cuda")[0] == "eager"


# ---------------------------------------------------------------------------------------------- CUDA (compiled)
CUDA_CASES = CASES + [(64, 65536, 10, torch.bfloat16), (256, 65536, 12, torch.bfloat16)]
CUDA_IDS = IDS + ["B64-K65536-crops10-bfloat16", "B256-K65536-crops12-bfloat16"]


@cuda
@needs_cuda
@pytest.mark.parametrize("b,k,ncrops,dtype", CUDA_CASES, ids=CUDA_IDS)
def test_cuda_triton_matches_pair_loop(b, k, ncrops, dtype):
    check(ops.dino_loss_triton, b, k, ncrops, dtype, "cuda")


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_grad_output_not_one(dtype):
    check(ops.dino_loss_triton, 32, 65536, 10, dtype, "cuda", grad_scale=0.37, seed=1)
    check(dino_loss_eager, 32, 65536, 10, dtype, "cuda", grad_scale=0.37, seed=1)


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_eager_matches_pair_loop(dtype):
    check(dino_loss_eager, 16, 65536, 10, dtype, "cuda")


@cuda
@needs_cuda
def test_cuda_k_131072_strided_and_eager_agree():
    student, teacher, center = random_loss_inputs(8, 6, 131072, torch.bfloat16, "cuda", seed=3)
    x = student.clone().requires_grad_()
    y = torch.cat([student, student[:, :64]], dim=1)[:, :131072].requires_grad_()
    loss_t, colsum_t = ops.dino_loss_triton(y, teacher, center, TEACHER_TEMP, STUDENT_TEMP, 6)  # strided rows
    loss_e, colsum_e = dino_loss_eager(x, teacher, center, TEACHER_TEMP, STUDENT_TEMP, 6)
    loss_t.backward()
    loss_e.backward()
    torch.testing.assert_close(loss_t, loss_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(colsum_t, colsum_e, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(y.grad.float(), x.grad.float(), rtol=1.6e-2, atol=1e-7)
