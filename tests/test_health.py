"""Health metrics against float64 numpy pair loops, and the collapse detector on constructed collapsed and healthy
outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dino_fast import health
from dino_fast.ops.reference import dino_loss_eager


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference(student, teacher, center, tt, ts, ncrops):
    """float64 numpy, the reference's pair loop: (loss, mean teacher entropy, batch entropy, mean pair KL)."""
    s, t, c = (np.asarray(a, np.float64) for a in (student, teacher, center))
    logq = _log_softmax((t - c) / tt)
    q = np.exp(logq)
    logp = _log_softmax(s / ts)
    b = t.shape[0] // 2
    ce, kl, terms = 0.0, 0.0, 0
    for iq in range(2):
        qi, lqi = q[iq * b:(iq + 1) * b], logq[iq * b:(iq + 1) * b]
        for v in range(ncrops):
            if v == iq:
                continue
            lp = logp[v * b:(v + 1) * b]
            ce += (-(qi * lp).sum(-1)).mean()
            kl += (qi * (lqi - lp)).sum(-1).mean()
            terms += 1
    entropy = (-(q * logq).sum(-1)).mean()
    m = q.mean(0)
    batch_entropy = -(m * np.log(np.maximum(m, 1e-300))).sum()
    return ce / terms, entropy, batch_entropy, kl / terms


def _healthy(b=6, k=500, ncrops=4, seed=0):
    """Logits of a run that learns: each image has its own signal z (so teachers differ across images), every
    crop of an image sees z plus noise, and the student's z/τs roughly matches the teacher's z/τt."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, k, generator=g) * 0.15
    teacher = z.repeat(2, 1) + 0.02 * torch.randn(2 * b, k, generator=g)
    student = 2.0 * z.repeat(ncrops, 1) + 0.05 * torch.randn(ncrops * b, k, generator=g)
    center = 0.02 * torch.randn(1, k, generator=g)
    return student, teacher, center


@pytest.mark.parametrize("ncrops", [2, 4])
def test_metrics_match_float64_reference(ncrops):
    student, teacher, center = _healthy(ncrops=ncrops)
    tt, ts = 0.04, 0.1
    m = health.health_metrics(student, teacher, center, tt, ts, ncrops)
    loss, entropy, batch_entropy, kl = reference(student.numpy(), teacher.numpy(), center.numpy(), tt, ts, ncrops)
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in m.values())
    assert m["teacher_entropy"].item() == pytest.approx(entropy, rel=1e-5)
    assert m["teacher_batch_entropy"].item() == pytest.approx(batch_entropy, rel=1e-5)
    assert m["teacher_student_kl"].item() == pytest.approx(kl, rel=1e-4, abs=1e-5)
    assert m["center_norm"].item() == pytest.approx(np.linalg.norm(center.numpy().astype(np.float64)), rel=1e-6)
    assert health.teacher_student_kl(student, teacher, center, tt, ts, ncrops).item() == pytest.approx(
        kl, rel=1e-4, abs=1e-5)
    # The loss shortcut (KL = loss − H(teacher)) with the project's own loss gives the same KL.
    project_loss, _ = dino_loss_eager(student, teacher, center, tt, ts, ncrops)
    assert project_loss.item() == pytest.approx(loss, rel=1e-5)
    fast = health.health_metrics(None, teacher, center, tt, ts, ncrops, loss=project_loss)
    assert fast["teacher_student_kl"].item() == pytest.approx(kl, rel=1e-4, abs=1e-4)
    assert fast["teacher_entropy"].item() == m["teacher_entropy"].item()
    with pytest.raises(ValueError, match="student logits or the loss"):
        health.health_metrics(None, teacher, center, tt, ts, ncrops)


def test_bf16_logits_are_accepted():
    student, teacher, center = _healthy()
    m = health.health_metrics(student.bfloat16(), teacher.bfloat16(), center, 0.04, 0.1, 4)
    assert all(torch.isfinite(v) for v in m.values())


def test_uniform_collapse_warns_after_warmup():
    b, k, ncrops = 4, 1000, 4
    student, teacher, center = torch.zeros(ncrops * b, k), torch.zeros(2 * b, k), torch.zeros(1, k)
    m = health.health_metrics(student, teacher, center, 0.04, 0.1, ncrops)
    loss, *_ = reference(student.numpy(), teacher.numpy(), center.numpy(), 0.04, 0.1, ncrops)
    assert loss == pytest.approx(math.log(k))
    assert m["teacher_entropy"].item() == pytest.approx(math.log(k), rel=1e-6)
    assert m["teacher_student_kl"].item() == pytest.approx(0.0, abs=1e-5)
    entropy = m["teacher_entropy"].item()
    assert health.collapse_warning(entropy, loss, k, step=5, warmup_steps=10) is None  # still warming up
    detector = health.CollapseDetector(k, warmup_steps=10, patience=2)
    assert detector.update(10, entropy, loss) is None  # first collapsed check: patience
    message = detector.update(20, entropy, loss)
    assert message is not None and "uniform collapse" in message and "ln K" in message
    assert detector.update(30, entropy, loss) is None  # once per episode


def test_one_hot_collapse_warns():
    b, k = 8, 1000
    teacher = torch.zeros(2 * b, k)
    teacher[:, 3] = 1.0  # every image's teacher picks prototype 3 (cosine 1 vs 0 elsewhere)
    center = torch.zeros(1, k)
    student = torch.randn(4 * b, k)
    m = health.health_metrics(student, teacher, center, 0.04, 0.1, 4)
    assert m["teacher_entropy"].item() < 1e-6 and m["teacher_batch_entropy"].item() < 1e-6
    message = health.collapse_warning(m["teacher_entropy"].item(), 3.0, k,
                                      batch_entropy=m["teacher_batch_entropy"].item(), step=1, warmup_steps=100)
    assert message is not None and "one prototype" in message
    detector = health.CollapseDetector(k, patience=1)
    assert "one prototype" in detector.update(1, m["teacher_entropy"].item(), 3.0)


def test_sharp_but_diverse_teacher_is_not_collapse():
    b, k = 8, 1000
    teacher = torch.zeros(2 * b, k)
    teacher[torch.arange(2 * b), torch.arange(2 * b) * 7] = 1.0  # one-hot rows, each on its own prototype
    m = health.health_metrics(torch.randn(4 * b, k), teacher, torch.zeros(1, k), 0.04, 0.1, 4)
    entropy, batch_entropy = m["teacher_entropy"].item(), m["teacher_batch_entropy"].item()
    assert entropy < 1e-6 and batch_entropy == pytest.approx(math.log(2 * b), rel=1e-4)
    assert health.collapse_warning(entropy, 3.0, k, batch_entropy=batch_entropy) is None
    # Without the batch entropy only the per-row entropy is available, and it looks collapsed.
    assert health.collapse_warning(entropy, 3.0, k) is not None


def test_healthy_run_stays_quiet():
    k, ncrops = 500, 4
    detector = health.CollapseDetector(k, warmup_steps=0, patience=1)
    for step in range(5):
        student, teacher, center = _healthy(k=k, ncrops=ncrops, seed=step)
        m = {name: v.item() for name, v in health.health_metrics(student, teacher, center, 0.04, 0.1, ncrops).items()}
        loss, *_ = reference(student.numpy(), teacher.numpy(), center.numpy(), 0.04, 0.1, ncrops)
        assert 0.05 * math.log(k) < m["teacher_entropy"] < 0.99 * math.log(k)
        assert loss < 0.99 * math.log(k)
        assert detector.update(step, m["teacher_entropy"], loss, m["teacher_batch_entropy"]) is None


def test_detector_rearms_after_a_lasting_recovery():
    k = 100
    detector = health.CollapseDetector(k, patience=1, rearm=3)
    flat, healthy = (math.log(k), math.log(k)), (2.0, 3.0)
    assert detector.update(1, *flat) is not None
    assert [detector.update(s, *healthy) for s in (2, 3)] == [None, None]
    assert detector.update(4, *flat) is None  # flickering around the threshold: still the same episode
    assert [detector.update(s, *healthy) for s in (5, 6, 7)] == [None, None, None]  # healthy for `rearm` checks
    assert detector.update(8, *flat) is not None  # a new episode warns again


def test_a_real_run_that_collapses_gets_the_warning(tiny_overrides, capsys):
    """A real (tiny) training run whose teacher is softer than its student (τt = 1 > τs = 0.1: no sharpening, so
    centering flattens every target) sits at ln K, and the trainer prints the uniform-collapse warning once."""
    from dino_fast.config import load_config
    from dino_fast.train import train

    overrides = [o for o in tiny_overrides if not o.startswith("logging.progress")]
    last = train(load_config(None, overrides + [
        "logging.progress=plain", "optim.max_steps=8", "optim.warmup_epochs=0", "dino.teacher_temp=1.0",
        "dino.warmup_teacher_temp=1.0", "checkpoint.every_steps=0"]))
    out = capsys.readouterr().out
    assert last["teacher_entropy"] >= 0.99 * math.log(256)  # model.out_dim=256 in the tiny config
    assert out.count("uniform") == 1 and "warning:" in out, out


def test_loss_near_ln_k_with_sharp_targets_is_not_uniform_collapse():
    """Sinkhorn-Knopp targets of entropy 6.4 of ln K = 8.3 with a student that has not learnt them yet: the loss
    (H + KL) sits near ln K, but nothing is flat, so no uniform-collapse warning; a flat teacher at that loss is."""
    k = 4096
    ln_k = math.log(k)
    assert health.collapse_warning(6.4, ln_k - 0.05, k, batch_entropy=8.2, step=100) is None
    assert "uniform collapse" in health.collapse_warning(0.95 * ln_k, ln_k - 0.05, k, batch_entropy=8.3, step=100)
