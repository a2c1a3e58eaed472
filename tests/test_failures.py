"""The failures users hit on clusters end in one line with a documented exit code, lose nothing, and stop every rank:
CUDA out of memory in the step (exit 5), a full disk while writing a checkpoint (exit 6), either on one rank of two."""

from __future__ import annotations

import errno
import subprocess
import sys
import time

import pytest
import torch

from dino_fast.config import load_config
from dino_fast.train import train

import faults
from child_env import clean_env
from runs import REPO, ckpt_dir, free_slurm_port, latest_tag, run_main

LEVERS = ("data.batch_size_per_gpu (halve it), model.grad_checkpointing=true, model.packed_crops=true, "
          "deepspeed.zero_stage=1 or 2, deepspeed.offload_optimizer=cpu")


def test_out_of_memory_in_the_step_is_one_line_naming_the_levers_and_the_checkpoint(tiny_overrides, capsys,
                                                                                   monkeypatch, tmp_path):
    run = tmp_path / "run"
    faults.inject(monkeypatch, "oom@3")
    code, err = run_main(tiny_overrides + [f"checkpoint.output_dir={run}", "optim.max_steps=6",
                                           "checkpoint.every_steps=1"], capsys)
    assert code == 5 and err.count("\n") == 1, err
    assert err.startswith("error: step 3 ran out of device memory (CUDA out of memory. Tried to allocate 2.00 GiB")
    assert f"Lower the memory in this order: {LEVERS} (docs/memory.md)" in err
    assert f"rerun the same command: it resumes from {ckpt_dir(run, 2)}" in err
    assert latest_tag(run) == "step_00000002"
    log = (run / "error-rank0.log").read_text()  # the traceback is kept in the run folder, not on the console
    assert log.startswith("5\n") and "torch.OutOfMemoryError" in log and "Traceback" in log


class _DiskFull:
    """``torch.save`` that writes part of the file and then fails as a full disk does, at its ``at``-th call."""

    def __init__(self, original, at: int, exc: BaseException):
        self.original, self.at, self.exc, self.calls = original, at, exc, 0

    def __call__(self, obj, f, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04 half a zip")
            raise self.exc
        return self.original(obj, f, *args, **kwargs)


def _full_disk_run(tiny_overrides, run, capsys, monkeypatch, exc: BaseException, at: int) -> str:
    # 4 saves per checkpoint of this run: DeepSpeed's model + optimizer file, then ours (rank state, teacher, state);
    # checkpoint 2 (step 4) starts with the 5th
    monkeypatch.setattr(torch, "save", _DiskFull(torch.save, at, exc))
    overrides = tiny_overrides + [f"checkpoint.output_dir={run}", "optim.max_steps=4", "checkpoint.every_steps=2"]
    code, err = run_main(overrides, capsys)
    assert code == 6 and err.count("\n") == 1, err
    monkeypatch.undo()
    return err


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint_and_the_same_command_resumes(
        tiny_overrides, capsys, monkeypatch, tmp_path):
    run = tmp_path / "run"
    err = _full_disk_run(tiny_overrides, run, capsys, monkeypatch, OSError(errno.ENOSPC, "No space left on device"),
                         at=7)  # our teacher.pt, after DeepSpeed's files of that checkpoint were written
    assert err.startswith(f"error: cannot write checkpoint step_00000004 to {run / 'checkpoints'}: the disk is full")
    assert "MiB free); free space there or set checkpoint.output_dir on a larger disk" in err
    assert f"it resumes from {ckpt_dir(run, 2)} (intact)" in err
    assert latest_tag(run) == "step_00000002" and not ckpt_dir(run, 4).exists()
    assert list((run / "checkpoints" / ".tmp").iterdir()) == []  # no half-written files left behind
    # The same command, with room on the disk: resumes from step 2 and finishes.
    train(load_config(None, tiny_overrides + [f"checkpoint.output_dir={run}", "optim.max_steps=4",
                                               "checkpoint.every_steps=2"]))
    assert latest_tag(run) == "step_00000004"
    assert torch.load(ckpt_dir(run, 4) / "dino_state.pt")["global_step"] == 4


def test_torchs_own_write_failure_counts_as_a_full_disk(tiny_overrides, capsys, monkeypatch, tmp_path):
    """torch's zip writer reports a short write without an errno ("file write failed", "unexpected pos"); here it
    fails inside DeepSpeed's own save of the engine state."""
    run = tmp_path / "run"
    err = _full_disk_run(tiny_overrides, run, capsys, monkeypatch,
                         RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4480 vs 4376"), at=5)
    assert "the disk is full or over its quota" in err and latest_tag(run) == "step_00000002"


@pytest.mark.slow
def test_out_of_memory_on_one_rank_stops_both_with_its_message(tiny_overrides, tmp_path):
    """Rank 1's step 3 runs out of memory; rank 0, waiting for it in the gradient all-reduce, sees the connection
    close, finds rank 1's message in the run folder and ends with it. Started as srun starts tasks (no launcher
    that would kill the other rank): nobody hangs."""
    from dino_fast.dist import SLURM_PORT_BASE

    run = tmp_path / "run"
    overrides = [o for o in tiny_overrides if not o.startswith("checkpoint.output_dir")] + [
        f"checkpoint.output_dir={run}", "optim.max_steps=8", "data.batch_size_per_gpu=4", "checkpoint.every_steps=1"]
    job = {"SLURM_NTASKS": "2", "SLURM_JOB_ID": str(free_slurm_port() - SLURM_PORT_BASE),
           "SLURM_JOB_NODELIST": "localhost", "DINO_FAST_TEST_FAULT": "oom@3:1"}
    t0 = time.time()
    tasks = [subprocess.Popen([sys.executable, str(REPO / "tests" / "fault_train.py"), *overrides], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=clean_env(**job, SLURM_PROCID=str(r), SLURM_LOCALID=str(r))) for r in range(2)]
    try:
        outs = [t.communicate(timeout=240) for t in tasks]
    finally:
        for t in tasks:
            t.kill()
    assert time.time() - t0 < 240
    errs = [o[1] for o in outs]
    assert [t.returncode for t in tasks] == [5, 5], errs
    assert all("Traceback" not in e for e in errs), errs
    assert errs[1].strip().startswith("error: step 3 ran out of device memory")
    assert errs[0].strip().startswith("error: rank 1 failed: step 3 ran out of device memory")
    assert latest_tag(run) == "step_00000002"
