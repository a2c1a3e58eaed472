"""Stopping and resuming under what long runs meet: a stop signal sent to the whole process tree (SLURM, a launcher,
a terminal's Ctrl-C), a signal that reaches one rank only, a loader worker killed by the OOM killer, a checkpoint
that does not read back after a machine crash, and a resume with other settings."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from dino_fast.checkpoint import CheckpointError
from dino_fast.config import load_config
from dino_fast.train import train

from child_env import clean_env
from runs import (
    REPO,
    ckpt_dir,
    free_port,
    latest_tag,
    run_main,
    steps_logged,
    student_state,
    trainer_process,
    wait_for_steps,
)


def _child_overrides(tiny_overrides: list[str], run: Path, workers: int) -> list[str]:
    keep = [o for o in tiny_overrides if not o.startswith(("checkpoint.output_dir", "data.num_workers"))]
    return keep + [f"checkpoint.output_dir={run}", f"data.num_workers={workers}", "optim.epochs=50",
                   "checkpoint.every_steps=0", "logging.progress=plain"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_process_tree_finishes_the_step_and_checkpoints(sig, tiny_overrides, tmp_path):
    """The DataLoader workers get the signal too. Before, SIGTERM killed them and torch's SIGCHLD handler raised
    their death mid-checkpoint: a traceback and no checkpoint."""
    run = tmp_path / "run"
    with trainer_process(_child_overrides(tiny_overrides, run, workers=2)) as proc:
        wait_for_steps(run, proc, 2)
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    steps = steps_logged(run)
    assert f"stopped by signal {int(sig)}: {steps} steps" in out
    assert latest_tag(run) == f"step_{steps:08d}"
    assert torch.load(ckpt_dir(run, steps) / "dino_state.pt")["global_step"] == steps
    assert not list((run / "checkpoints" / ".tmp").iterdir())


@pytest.mark.slow
def test_a_killed_loader_worker_checkpoints_every_finished_step_then_fails_clearly(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    with trainer_process(_child_overrides(tiny_overrides, run, workers=2)) as proc:
        wait_for_steps(run, proc, 2)
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        workers[0].kill()  # as the kernel's OOM killer does
        out, err = proc.communicate(timeout=300)
    steps = steps_logged(run)
    assert proc.returncode == 4, err[-3000:]
    assert "Traceback" not in err and f"the data loader failed before step {steps + 1}" in err
    assert f"step_{steps:08d}" in err and latest_tag(run) == f"step_{steps:08d}"


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tiny_overrides, tmp_path):
    """Ranks agree between steps. Before, the signalled rank went into the checkpoint's barrier while the other
    went on into the next step's all-reduce, and both waited for each other until killed."""
    run = tmp_path / "run"
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                str(REPO / "dino_fast" / "train.py")]
    overrides = _child_overrides(tiny_overrides, run, workers=0) + ["data.batch_size_per_gpu=4"]
    with trainer_process(overrides, launcher=launcher) as proc:
        wait_for_steps(run, proc, 2)
        rank1 = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank=1" in p.cmdline()]
        assert len(rank1) == 1
        rank1[0].send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    steps = steps_logged(run)
    ckpt = ckpt_dir(run, steps)
    assert latest_tag(run) == ckpt.name and f"stopped by signal {int(signal.SIGTERM)}" not in out  # rank 0 was not
    r0, r1 = (torch.load(ckpt / f"rank{r}_state.pt", weights_only=False) for r in (0, 1))
    assert torch.equal(r0["fingerprint"], r1["fingerprint"])


@pytest.mark.slow
def test_a_loader_failure_on_one_rank_stops_every_rank_within_two_steps(tiny_overrides, tmp_path):
    """Rank 1's loader fails where step 3's batch would come (tests/faults.py). The ranks agree on the host (a gloo
    all-reduce, never a wait for the device): rank 0, which has its batch, stops too, both checkpoint step 2 and the
    run ends with the loader's exit code and message; none hangs in a collective."""
    run = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "fault_train.py"),
           *_child_overrides(tiny_overrides, run, workers=0), "data.batch_size_per_gpu=4"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=clean_env(DINO_FAST_TEST_FAULT="loader@3:1"))
    assert proc.returncode == 4, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the data loader failed before step 3 (InjectedLoaderError: injected loader failure at step 3)" in \
        proc.stderr
    assert steps_logged(run) == 2 and latest_tag(run) == "step_00000002"
    r0, r1 = (torch.load(ckpt_dir(run, 2) / f"rank{r}_state.pt", weights_only=False) for r in (0, 1))
    assert torch.equal(r0["fingerprint"], r1["fingerprint"])


def test_resume_refuses_another_model_shape_and_another_global_batch(tiny_overrides, tmp_path, capsys):
    train(load_config(None, tiny_overrides + ["optim.max_steps=2"]))
    run = Path(next(o for o in tiny_overrides if o.startswith("checkpoint.output_dir")).split("=", 1)[1])
    before = {p.name: p.stat().st_mtime_ns for p in ckpt_dir(run, 2).iterdir()}
    resume = tiny_overrides + ["optim.max_steps=4", "checkpoint.resume=auto"]
    code, err = run_main(resume + ["model.out_dim=512"], capsys)
    assert code == 2 and "model.out_dim=256 (this run: 512)" in err and "checkpoint.resume=none" in err
    code, err = run_main(resume + ["data.batch_size_per_gpu=4"], capsys)
    assert code == 2 and "global batch of 8 (1 rank(s) × data.batch_size_per_gpu=8)" in err
    assert "set data.batch_size_per_gpu=8" in err
    assert {p.name: p.stat().st_mtime_ns for p in ckpt_dir(run, 2).iterdir()} == before
    assert latest_tag(run) == "step_00000002"


def test_a_checkpoint_from_before_a_shape_key_existed_resumes(tiny_overrides, tmp_path):
    """optim.name and model.use_bn_in_head came after checkpoints were written without them: such a checkpoint had
    their defaults (AdamW, no BatchNorm head) and resumes; another value is refused."""
    run = tmp_path / "run"
    common = tiny_overrides + [f"checkpoint.output_dir={run}", "checkpoint.every_steps=1"]
    train(load_config(None, common + ["optim.max_steps=2"]))
    for ckpt in (ckpt_dir(run, 1), ckpt_dir(run, 2)):
        text = (ckpt / "config.yaml").read_text()
        old = "\n".join(line for line in text.splitlines() if not line.strip().startswith(("name:", "use_bn_in_head:")))
        (ckpt / "config.yaml").write_text(old + "\n")
    train(load_config(None, common + ["optim.max_steps=3", "checkpoint.resume=auto"]))
    assert latest_tag(run) == "step_00000003"
    with pytest.raises(CheckpointError, match="optim.name='adamw' \\(this run: 'sgd'\\)"):
        train(load_config(None, common + ["optim.max_steps=4", "checkpoint.resume=auto", "optim.name=sgd"]))


def test_resume_passes_over_a_checkpoint_that_does_not_read_back(tiny_overrides, tmp_path):
    """A machine that lost power can leave a zero-length file in the newest checkpoint: resume=auto sets it aside
    and resumes from the one before, on exactly the trajectory of an uninterrupted run."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    base = tiny_overrides + ["checkpoint.every_steps=1"]
    train(load_config(None, base + [f"checkpoint.output_dir={straight}", "optim.max_steps=3"]))
    train(load_config(None, base + [f"checkpoint.output_dir={split}", "optim.max_steps=2"]))
    (ckpt_dir(split, 2) / "teacher.pt").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"step_00000002' cannot be read back \(teacher.pt: .*resuming from step_0+1"):
        train(load_config(None, base + [f"checkpoint.output_dir={split}", "optim.max_steps=3",
                                        "checkpoint.resume=auto"]))
    assert (split / "checkpoints" / "step_00000002.corrupt").is_dir() and latest_tag(split) == "step_00000003"
    a, b = ckpt_dir(straight, 3), ckpt_dir(split, 3)
    teacher_a, teacher_b = torch.load(a / "teacher.pt"), torch.load(b / "teacher.pt")
    student_a, student_b = student_state(a), student_state(b)
    for k in teacher_a:
        torch.testing.assert_close(teacher_b[k], teacher_a[k], rtol=1e-6, atol=1e-7, msg=k)
        torch.testing.assert_close(student_b[k], student_a[k], rtol=1e-6, atol=1e-7, msg=k)


def test_an_unreadable_checkpoint_named_explicitly_is_a_clear_error(tiny_overrides, capsys):
    train(load_config(None, tiny_overrides + ["optim.max_steps=1"]))
    run = Path(next(o for o in tiny_overrides if o.startswith("checkpoint.output_dir")).split("=", 1)[1])
    ckpt = ckpt_dir(run, 1)
    data = (ckpt / "mp_rank_00_model_states.pt").read_bytes()
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(data[: len(data) // 2])  # truncated
    code, err = run_main(tiny_overrides + ["optim.max_steps=2", f"checkpoint.resume={ckpt}"], capsys)
    assert code == 2 and "mp_rank_00_model_states.pt" in err and "cannot be read back" in err


def test_resume_after_the_dataset_shrank_goes_on_with_the_next_epoch(tiny_image_root, tiny_overrides, tmp_path):
    """96 images (12 steps per epoch) stopped after step 11, then 16 images removed (10 steps per epoch): the
    resumed run starts epoch 1 instead of asking the loader for batch 12 of 10 forever."""
    data = tmp_path / "data"
    shutil.copytree(tiny_image_root / "train", data)
    run = tmp_path / "shrink"
    common = tiny_overrides + [f"data.path={data}", f"checkpoint.output_dir={run}", "checkpoint.every_steps=0"]
    train(load_config(None, common + ["optim.max_steps=11"]))
    for cls in sorted(p for p in data.iterdir() if p.is_dir())[:2]:
        for f in sorted(cls.iterdir())[:8]:
            f.unlink()
    with pytest.warns(UserWarning, match="12 steps per epoch then, 10 now"):
        train(load_config(None, common + ["optim.max_steps=13", "checkpoint.resume=auto"]))
    state = torch.load(ckpt_dir(run, 13) / "dino_state.pt")
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 2, 13)
