"""What the trainer tests read back from a run folder, and how they start or call the trainer."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from child_env import clean_env

REPO = Path(__file__).resolve().parents[1]


def ckpt_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def latest_tag(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


def student_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def cpu_training(overrides: list[str], config: str | None = None, precision: str = "fp32"):
    """A fresh engine, teacher, loss and EMA on CPU from a recipe and overrides, as the trainer builds them:
    ``(cfg, engine, teacher, dino_loss, ema)``. The RNG is seeded alike after the build, so drop-path draws repeat."""
    from dino_fast.config import load_config
    from dino_fast.engine import build_training, init_distributed

    init_distributed()
    cfg = load_config(config, overrides)
    engine, teacher, dino_loss, ema = build_training(cfg, torch.device("cpu"), 1, precision)
    torch.manual_seed(1)
    return cfg, engine, teacher, dino_loss, ema


def random_crops(cfg, seed: int) -> list[torch.Tensor]:
    """A batch of crops of ``cfg``'s shapes (2 global, the locals), N(0, 1) from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    b, s, loc = cfg.data.batch_size_per_gpu, cfg.data.global_crop_size, cfg.data.local_crop_size
    return ([torch.randn(b, 3, s, s, generator=g) for _ in range(2)]
            + [torch.randn(b, 3, loc, loc, generator=g) for _ in range(cfg.data.local_crops_number)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_slurm_port() -> int:
    """A free port that a SLURM job id can name (dino_fast.dist: SLURM_PORT_BASE + job id mod 20000)."""
    from dino_fast.dist import SLURM_PORT_BASE, SLURM_PORT_SPAN

    for port in random.Random().sample(range(SLURM_PORT_BASE, SLURM_PORT_BASE + SLURM_PORT_SPAN), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in the SLURM range")


def run_main(args: list[str], capsys) -> tuple[int, str]:
    """``dino_fast.train.main(args)`` in this process: its exit code and stderr, which must hold no traceback."""
    from dino_fast.train import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exc.value.code, err


@contextlib.contextmanager
def trainer_process(overrides: list[str], *, launcher: list[str] | None = None) -> Iterator[subprocess.Popen]:
    """The trainer as a child in its own session, so a test can signal its whole process tree as SLURM does; the
    tree is killed on the way out if it is still running (a failed test leaves no trainer behind)."""
    cmd = (launcher or [sys.executable, "-m", "dino_fast.train"]) + overrides
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
                            start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def wait_for_steps(run: Path, proc: subprocess.Popen, steps: int, timeout: float = 300) -> None:
    """Until the run's metrics file holds ``steps`` lines (the trainer failing first is a test failure)."""
    metrics = run / "metrics.jsonl"
    deadline = time.time() + timeout
    while not metrics.exists() or len(metrics.read_text().splitlines()) < steps:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the trainer ended early (rc {proc.returncode}): {err[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"no {steps} steps in {timeout} s")
        time.sleep(0.2)


def steps_logged(run: Path) -> int:
    return sum(1 for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line)
