import math

import numpy as np

from dino_fast.config import load_config
from dino_fast.schedules import Schedules, cosine_scheduler, momentum_schedule, teacher_temp_schedule


def test_cosine_schedule_warmup_boundaries_and_last_iteration():
    base, final, epochs, n, warm, start = 2e-3, 1e-6, 10, 7, 3, 0.0
    s = cosine_scheduler(base, final, epochs, n, warm, start)
    assert s.shape == (70,) and s.dtype == np.float64
    w = warm * n
    np.testing.assert_allclose(s[:w], np.linspace(start, base, w), rtol=0, atol=0)
    assert s[0] == start and s[w - 1] == base
    m = epochs * n - w
    for i in (0, 1, m // 2, m - 1):
        expected = final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / m))
        assert math.isclose(s[w + i], expected, rel_tol=1e-15)
    assert s[w] == base and s[-1] > final


def test_cosine_schedule_without_warmup_and_momentum_formula():
    epochs, n = 5, 4
    m = momentum_schedule(0.996, epochs, n)
    total = epochs * n
    for it in range(total):
        assert math.isclose(m[it], 1 - 0.5 * (1 - 0.996) * (1 + math.cos(math.pi * it / total)), rel_tol=1e-14)
    end = momentum_schedule(0.95, epochs, n, final_momentum=0.98)  # DINOv2's final_momentum_teacher
    for it in (0, 7, total - 1):
        assert math.isclose(end[it], 0.98 - 0.5 * (0.98 - 0.95) * (1 + math.cos(math.pi * it / total)), rel_tol=1e-14)
    assert np.all(momentum_schedule(0.95, epochs, n, final_momentum=0.95) == 0.95)  # constant
    wd = cosine_scheduler(0.04, 0.4, epochs, n)
    assert math.isclose(wd[0], 0.04) and wd[-1] < 0.4 and np.all(np.diff(wd) > 0)


def test_teacher_temperature_is_per_epoch_linear_then_constant():
    t = teacher_temp_schedule(0.04, 0.07, 30, 100)
    assert len(t) == 100 and t[0] == 0.04 and math.isclose(t[29], 0.07) and np.all(t[29:] == 0.07)
    assert math.isclose(t[15], 0.04 + 15 * 0.03 / 29)
    assert np.all(teacher_temp_schedule(0.04, 0.04, 0, 5) == 0.04)


def test_step_schedules_take_the_momentum_end_from_the_config():
    cfg = load_config(None, ["dino.momentum_teacher=0.95", "optim.epochs=4", "optim.warmup_epochs=0"])
    last = 1 - 0.5 * 0.05 * (1 + math.cos(math.pi * 19 / 20))  # the reference: the cosine heads for 1
    assert math.isclose(Schedules(cfg, 5, 64).momentum[-1], last, rel_tol=1e-14)
    cfg = load_config(None, ["dino.momentum_teacher=0.95", "dino.momentum_teacher_end=0.95", "optim.epochs=4",
                             "optim.warmup_epochs=0"])
    assert np.all(Schedules(cfg, 5, 64).momentum == 0.95)
