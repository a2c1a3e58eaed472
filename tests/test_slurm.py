"""`srun python -m dino_fast.train ...` without a launcher: ranks, master address and port from SLURM's environment,
its compressed host lists, the GPU of each task, and a faked 2-task SLURM run that trains what the DeepSpeed launcher
trains, bit for bit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dino_fast.dist import (
    SLURM_PORT_BASE,
    SlurmEnvironmentError,
    local_device_index,
    parse_hostlist,
    slurm_environment,
)

from child_env import clean_env
from runs import REPO, ckpt_dir, free_port, free_slurm_port

SLURM_TASK = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
              "SLURM_JOB_NODELIST": "gpu-a[07-08],gpu-b3", "SLURM_STEP_NODELIST": "gpu-a[08],gpu-b3"}


@pytest.mark.parametrize("hostlist, hosts", [
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("gpu-a[1-2],gpu-b3", ["gpu-a1", "gpu-a2", "gpu-b3"]),
    ("localhost", ["localhost"]),
    ("r[1-2]n[08-09]", ["r1n08", "r1n09", "r2n08", "r2n09"]),
    ("dgx[009-011],login1", ["dgx009", "dgx010", "dgx011", "login1"]),
])
def test_slurm_host_lists_expand_as_slurm_writes_them(hostlist, hosts):
    assert parse_hostlist(hostlist) == hosts


def test_a_task_places_itself_from_slurms_variables():
    env = slurm_environment(SLURM_TASK)
    port = str(SLURM_PORT_BASE + 123456 % 20000)
    assert env == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu-a08", "MASTER_PORT": port}
    job_wide = {k: v for k, v in SLURM_TASK.items() if k != "SLURM_STEP_NODELIST"}
    assert slurm_environment(job_wide)["MASTER_ADDR"] == "gpu-a07"  # the step's first host, else the job's
    explicit = slurm_environment({**SLURM_TASK, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    assert (explicit["MASTER_ADDR"], explicit["MASTER_PORT"]) == ("10.0.0.1", "29500")
    assert slurm_environment({**SLURM_TASK, "RANK": "0"}) is None  # a launcher (torchrun, deepspeed) set it up
    assert slurm_environment({"HOME": "/root"}) is None  # no SLURM task


def test_an_incomplete_slurm_environment_is_a_one_line_error(tiny_overrides):
    with pytest.raises(SlurmEnvironmentError, match="SLURM_NTASKS, SLURM_LOCALID"):
        slurm_environment({"SLURM_PROCID": "0", "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1"})
    env = clean_env(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0")
    proc = subprocess.run([sys.executable, "-m", "dino_fast.train", *tiny_overrides], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: SLURM_PROCID is set but SLURM_STEP_NODELIST or SLURM_JOB_NODELIST, "
                                   "SLURM_JOB_ID (or MASTER_PORT) not: start one task per GPU with srun "
                                   "(docs/slurm.md), or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT "
                                   "yourself")


def test_each_task_finds_its_gpu_with_all_or_one_visible():
    assert [local_device_index(r, 4) for r in range(4)] == [0, 1, 2, 3]  # one task per GPU, all GPUs visible
    assert [local_device_index(r, 1) for r in range(4)] == [0, 0, 0, 0]  # --gpus-per-task=1: each sees its own
    with pytest.raises(SlurmEnvironmentError, match="local rank 4 but only 4 GPUs visible"):
        local_device_index(4, 4)


@pytest.mark.slow
def test_two_slurm_tasks_train_what_the_deepspeed_launcher_trains(tiny_overrides, tmp_path):
    """2 CPU ranks started as srun starts them (no launcher: each process its SLURM_PROCID) against the same run
    under `deepspeed --num_gpus 2`: after 10 steps the same teacher, bit for bit."""
    common = [o for o in tiny_overrides if not o.startswith("checkpoint.output_dir")] + [
        "optim.max_steps=10", "data.batch_size_per_gpu=4", "checkpoint.every_steps=0"]
    launcher = tmp_path / "launcher"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "dino_fast" / "train.py"), *common, f"checkpoint.output_dir={launcher}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]

    slurm = tmp_path / "slurm"
    job = {"SLURM_NTASKS": "2", "SLURM_JOB_ID": str(free_slurm_port() - SLURM_PORT_BASE),
           "SLURM_JOB_NODELIST": "localhost", "SLURM_STEP_NODELIST": "localhost"}
    tasks = [subprocess.Popen([sys.executable, "-m", "dino_fast.train", *common, f"checkpoint.output_dir={slurm}"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=clean_env(**job, SLURM_PROCID=str(r), SLURM_LOCALID=str(r))) for r in range(2)]
    outs = [t.communicate(timeout=600) for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert torch.load(ckpt_dir(slurm, 10) / "dino_state.pt")["world_size"] == 2
    a, b = (torch.load(ckpt_dir(run, 10) / "teacher.pt") for run in (launcher, slurm))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for r in range(2):
        ra, rb = (torch.load(ckpt_dir(run, 10) / f"rank{r}_state.pt", weights_only=False) for run in (launcher, slurm))
        assert torch.equal(ra["fingerprint"], rb["fingerprint"])
