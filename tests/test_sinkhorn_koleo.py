"""Sinkhorn-Knopp teacher targets and the KoLeo regulariser against independent float64 computations, the loss on
given targets (eager and the Triton student kernel) against the literal pair sum, and the distributed SK."""

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from dino_fast.loss import DINOLoss
from dino_fast.loss.koleo import koleo_loss
from dino_fast.loss.sinkhorn import sinkhorn_knopp
from dino_fast.ops import select


def sinkhorn_float64(logits: torch.Tensor, temp: float, iterations: int) -> torch.Tensor:
    """The alternating normalisation written out in float64 on the whole global batch (B × K, rows = images)."""
    p = torch.exp(logits.double() / temp)
    p = p / p.sum()
    b, k = p.shape
    for _ in range(iterations):
        p = p / p.sum(0, keepdim=True) / k
        p = p / p.sum(1, keepdim=True) / b
    return p * b


def pair_sum_with_targets(student, q, s_temp, ncrops):
    s = (student.double() / s_temp).chunk(ncrops)
    qs = q.double().chunk(2)
    terms = [torch.sum(-qs[iq] * torch.log_softmax(s[v], -1), -1).mean() for iq in range(2) for v in range(ncrops)
             if v != iq]
    return sum(terms) / len(terms)


@pytest.mark.parametrize("b, k, temp", [(4, 17, 0.05), (16, 1000, 0.02), (3, 4096, 0.01)])
def test_sinkhorn_matches_float64_and_normalises(b, k, temp):
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(b, k, generator=g)  # cosine-like logits; exp(1/0.01) overflows without the max shift
    q = sinkhorn_knopp(logits, temp, 3)
    ref = sinkhorn_float64(logits, temp, 3)
    torch.testing.assert_close(q.double(), ref, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(q.sum(1).double(), torch.ones(b, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(q).all()


def test_sinkhorn_spreads_targets_that_centering_leaves_on_one_prototype():
    """Every row prefers prototype 0 by the same margin: a centered softmax (center 0, a fresh run) puts all the mass
    there, Sinkhorn-Knopp makes the batch use its prototypes evenly (column sums → B/K)."""
    b, k = 8, 8
    logits = torch.randn(b, k, generator=torch.Generator().manual_seed(0)) * 0.02
    logits[:, 0] += 0.2
    q = sinkhorn_knopp(logits, 0.05, 50)
    assert torch.softmax(logits / 0.05, -1)[:, 0].mean() > 0.8
    torch.testing.assert_close(q.sum(0), torch.full((k,), b / k), rtol=1e-3, atol=1e-3)


def _sk_worker(rank, world, port, logits, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    out[rank] = sinkhorn_knopp(logits.chunk(world)[rank], 0.04, 3)
    torch.distributed.destroy_process_group()


def test_sinkhorn_normalises_over_the_global_batch_across_ranks():
    logits = torch.randn(12, 33, generator=torch.Generator().manual_seed(3))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_sk_worker, args=(2, port, logits, out), nprocs=2)
    torch.testing.assert_close(torch.cat([out[0], out[1]]).double(), sinkhorn_float64(logits, 0.04, 3),
                               rtol=1e-4, atol=1e-9)


def koleo_float64(x: torch.Tensor) -> torch.Tensor:
    """−mean log of each row's distance to its nearest other row, all pairs enumerated, in float64."""
    x = torch.nn.functional.normalize(x.double(), dim=-1)
    eye = torch.eye(x.shape[0], dtype=torch.bool)
    d = torch.where(eye, torch.inf, torch.cdist(x, x))
    return -torch.log(d.min(dim=1).values).mean()


@pytest.mark.parametrize("b, d", [(2, 3), (7, 16), (32, 192)])
def test_koleo_matches_float64_value_and_gradient(b, d):
    x = torch.randn(b, d, generator=torch.Generator().manual_seed(b)).requires_grad_(True)
    loss = koleo_loss(x)
    loss.backward()
    x64 = x.detach().double().requires_grad_(True)
    ref = koleo_float64(x64)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)


def test_koleo_is_lower_for_spread_features_than_for_a_collapsed_batch():
    spread = torch.eye(8)
    collapsed = torch.ones(8, 8) + 0.01 * torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    assert koleo_loss(spread) < 0 < koleo_loss(collapsed)  # √2 apart: −log √2 < 0; near-identical rows: large
    with pytest.raises(ValueError, match="at least 2 rows"):
        koleo_loss(torch.ones(1, 4))


@pytest.mark.parametrize("impl", ["eager", "triton"])
@pytest.mark.parametrize("ncrops, b, k", [(2, 3, 17), (6, 4, 1271), (10, 2, 4096)])
def test_loss_on_given_targets_matches_the_pair_sum(impl, ncrops, b, k):
    if impl == "triton" and ("triton" not in select.LOSS or os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.fail("the Triton interpreter must be on for CPU runs (tests/conftest.py sets TRITON_INTERPRET=1)")
    g = torch.Generator().manual_seed(ncrops + k)
    student = torch.randn(ncrops * b, k, generator=g) * 3
    q = sinkhorn_knopp(torch.randn(2 * b, k, generator=g), 0.04, 3)
    s = student.clone().requires_grad_(True)
    loss = select.LOSS[impl].from_targets(s, q, 0.1, ncrops)
    (2.5 * loss).backward()
    s64 = student.double().requires_grad_(True)
    ref = pair_sum_with_targets(s64, q, 0.1, ncrops)
    (2.5 * ref).backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-7)


def test_dino_loss_with_sinkhorn_centering_uses_sk_targets_and_still_tracks_the_center():
    ncrops, b, k = 4, 5, 64
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(ncrops * b, k, generator=g), torch.randn(2 * b, k, generator=g)
    loss_fn = DINOLoss(k, ncrops, impl="eager", centering="sinkhorn_knopp")
    loss = loss_fn(student, teacher, teacher_temp=0.04)
    ref = pair_sum_with_targets(student, sinkhorn_float64(teacher, 0.04, 3), 0.1, ncrops)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_fn.center.double(), 0.1 * teacher.double().mean(0, keepdim=True), rtol=1e-6,
                               atol=1e-7)
    with pytest.raises(ValueError, match="centering must be"):
        DINOLoss(k, ncrops, centering="sinkhorn")


def test_sinkhorn_queue_normalises_with_the_previous_steps_teacher_rows():
    """dino.sinkhorn_queue: each step's targets are the first rows of Sinkhorn-Knopp over this step's teacher rows
    and the newest ``queue`` rows of the steps before (float64 reference on the concatenation), the queue holds only
    what has been seen so far, and it travels in the loss module's state dict."""
    rows, k, size = 6, 48, 15
    g = torch.Generator().manual_seed(3)
    loss_fn = DINOLoss(k, 4, impl="eager", centering="sinkhorn_knopp", sinkhorn_queue=size)
    seen = []
    for step in range(5):
        teacher = torch.randn(rows, k, generator=g)
        q = loss_fn.sinkhorn_targets(teacher, 0.05)
        history = torch.cat(seen[::-1])[:size] if seen else teacher[:0]  # newest first
        ref = sinkhorn_float64(torch.cat([teacher, history]), 0.05, 3)[:rows]
        torch.testing.assert_close(q.double(), ref, rtol=1e-4, atol=1e-9)
        seen.append(teacher)
        assert int(loss_fn.sinkhorn_queue_rows) == min(rows * (step + 1), size)
    assert not torch.equal(q, sinkhorn_float64(teacher, 0.05, 3).float())  # the queue changed the targets
    restored = DINOLoss(k, 4, impl="eager", centering="sinkhorn_knopp", sinkhorn_queue=size)
    restored.load_state_dict(loss_fn.state_dict())
    teacher = torch.randn(rows, k, generator=g)
    torch.testing.assert_close(restored.sinkhorn_targets(teacher, 0.05), loss_fn.sinkhorn_targets(teacher, 0.05))
    restored.load_rank_state({})  # a checkpoint of another world size: the queue starts over on every rank
    assert int(restored.sinkhorn_queue_rows) == 0
    torch.testing.assert_close(restored.sinkhorn_targets(teacher, 0.05).double(), sinkhorn_float64(teacher, 0.05, 3),
                               rtol=1e-4, atol=1e-9)
    assert set(DINOLoss(k, 4, centering="sinkhorn_knopp").state_dict()) == {"center"}  # no queue, no new keys


def test_compiled_sinkhorn_equals_eager():
    """The fused form used on CUDA (torch.compile of the one-rank arithmetic; inductor's CPU backend here)."""
    from dino_fast.loss.sinkhorn import _single_rank

    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(5)).clamp(-1, 1)
    compiled = torch.compile(_single_rank, dynamic=False)
    torch.testing.assert_close(compiled(logits, 0.02, 3), _single_rank(logits, 0.02, 3), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(_single_rank(logits, 0.02, 3).double(), sinkhorn_float64(logits, 0.02, 3),
                               rtol=1e-4, atol=1e-9)


def test_a_tiny_run_with_sinkhorn_and_koleo_logs_both(tiny_overrides):
    """The trainer with the demo recipe's two options: KoLeo is logged apart from the DINO loss, the health
    metrics are those of the Sinkhorn-Knopp targets, and the student moved."""
    import json
    from pathlib import Path

    from dino_fast.config import load_config
    from dino_fast.train import train

    cfg = load_config(None, tiny_overrides + ["optim.max_steps=3", "dino.centering=sinkhorn_knopp",
                                              "dino.koleo_weight=0.1", "model.drop_path_rate=0"])
    last = train(cfg)
    records = [json.loads(x) for x in (Path(cfg.checkpoint.output_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["koleo"] == r["koleo"] and abs(r["koleo"]) < 20  # finite, −mean log distance of unit vectors
        assert 0 < r["teacher_entropy"] < math.log(256) and r["teacher_student_kl"] >= -1e-4
        # "loss" is the DINO loss alone: H(targets) + KL, not the KoLeo-weighted total.
        assert abs(r["loss"] - (r["teacher_entropy"] + r["teacher_student_kl"])) < 1e-4
    assert last["step"] == 3
