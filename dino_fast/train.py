"""DINO training with DeepSpeed: ``deepspeed dino_fast/train.py --config <yaml> [key=value ...]``.

Also runs as a single process without a launcher (``python -m dino_fast.train ...``). Device and communication
backend come from DeepSpeed's accelerator (CUDA + NCCL on GPUs, CPU + gloo/shared memory without one).

This module is the loop, read top to bottom as dinov2's ``do_train``: what a run is made of is built by
``dino_fast/engine.py``, one iteration is ``dino_fast/step.py``, what is written about it is ``dino_fast/report.py``,
and how a run ends when it cannot go on is ``dino_fast/errors.py``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the deepspeed launcher: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from dino_fast import dist, errors
from dino_fast.checkpoint import Checkpointer, TrainPosition, check_resumable, state_is_finite
from dino_fast.config import Config, load_config, save_config
from dino_fast.dist import any_rank
from dino_fast.engine import Run, build_run
from dino_fast.eval.attention import periodic_attention
from dino_fast.eval.knn import check_knn_split, periodic_knn
from dino_fast.eval.summary import summarise_run
from dino_fast.report import Reporter
from pipelines.folder import DataError


class _Stop:
    """Stop requests: the first SIGINT/SIGTERM names the stop (a launcher may follow Ctrl-C with SIGTERM) and the run
    ends after the current step with a checkpoint; a second Ctrl-C quits at once, without one."""

    def __init__(self):
        self.signal: int | None = None
        self.agreed = False  # every rank has agreed to stop (a signal that reached any one of them)

    def __call__(self, signum, _frame):
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if self.signal is None:
            self.signal = signum


class _Checkpoints:
    """Checkpoints that never hold a non-finite state: the newest step's metrics and the weights are checked first."""

    def __init__(self, run: Run, report: Reporter, pos: TrainPosition, store: Checkpointer):
        self.run, self.report, self.pos, self.store = run, report, pos, store
        self.saved_step = pos.global_step  # the newest step a checkpoint holds (0: none yet, nothing to keep)

    def save(self) -> None:
        run = self.run
        self.report.flush()
        run.dino_loss.apply_center_update()
        if self.report.bad is None and not state_is_finite(run.engine.module, run.teacher,
                                                           extra=(run.dino_loss.center,)):
            self.report.bad = f"the weights after step {self.pos.global_step} are not finite (its loss was)"
        if any_rank(self.report.bad is not None)[0]:
            raise errors.non_finite(self.report.bad, self.store.latest())
        self.store.save(run.engine, run.teacher, run.dino_loss, self.pos, run.cfg, run.steps_per_epoch)
        self.saved_step = self.pos.global_step


def _resume(run: Run, store: Checkpointer) -> tuple[TrainPosition, Path | None]:
    """The position to start from: the checkpoint ``checkpoint.resume`` names (auto: the newest), loaded, or step 0."""
    resume_from = store.resolve(run.cfg.checkpoint.resume)
    if resume_from is None:
        return TrainPosition(0, 0, 0), None
    check_resumable(resume_from, run.cfg, run.world, run.steps_per_epoch)
    pos = Checkpointer.load(resume_from, run.engine, run.teacher, run.dino_loss)
    if pos.step_in_epoch >= run.steps_per_epoch:  # the dataset shrank since: that epoch is done
        pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0
    return pos, resume_from


def _agreed_batches(batches, stop: _Stop, report: Reporter, ckpt: _Checkpoints):
    """This epoch's batches, each once all ranks agreed to go on (one host all-reduce, dino_fast.dist.any_rank): a
    signal, a failed loader or a non-finite step on any rank stops every rank here, between steps, where the state is
    whole (and checkpointed)."""
    while True:
        try:
            batch, failure = next(batches), None
        except StopIteration:
            return
        except Exception as exc:  # a worker died or raised (e.g. the OOM killer); the last step is whole
            batch, failure = None, exc
        # A worker that died with a stop signal (SLURM and launchers signal the whole process tree) is part of that
        # stop, not a failure.
        signalled = stop.signal is not None
        stop.agreed, failed, bad = any_rank(signalled, failure is not None and not signalled, report.bad is not None)
        if bad:
            raise errors.non_finite(report.bad, ckpt.store.latest())
        if stop.agreed or failed:
            if ckpt.pos.global_step > ckpt.saved_step:
                ckpt.save()
            if failed:
                raise errors.loader_failed(failure, ckpt.store.latest(), ckpt.pos.global_step + 1) from None
            return
        yield batch


def train(cfg: Config) -> dict:
    """Run training as configured; returns the last logged step's metrics.

    The loop: batch → all ranks agree to go on → schedules → step (queued on the device) → log the previous step
    (its metrics have reached the host by now) → k-NN and attention maps → checkpoint (after reading the newest
    step's metrics).
    """
    knn = cfg.eval.knn_at_start or cfg.eval.knn_at_end or cfg.eval.knn_every_epochs
    run = build_run(cfg, before_loader=check_knn_split if knn else None)  # the k-NN's split: now, not after training
    cfg, out_dir = run.cfg, Path(run.cfg.checkpoint.output_dir)
    store = Checkpointer(out_dir, cfg.checkpoint.keep_last)
    pos, resume_from = _resume(run, store)
    report = Reporter(cfg, run.rank, run.total_steps, out_dir, run.global_batch, run.steps_per_epoch,
                      pos.global_step)
    ckpt = _Checkpoints(run, report, pos, store)
    if run.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        report.progress.info(f"{run.describe}, output {out_dir.resolve()}"
                             + (f", resumed from {resume_from}" if resume_from else ""))
    stop, batches = _Stop(), None
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if cfg.eval.knn_at_start and pos.global_step == 0:
            report.log_knn(periodic_knn(cfg, run.teacher, run.device, run.rank, run.world), 0, 0, "initial",
                           cfg.eval.knn_k)
        while pos.global_step < run.total_steps and not stop.agreed:
            epoch, steps_before = pos.epoch, pos.global_step
            run.loader.set_epoch(epoch, pos.step_in_epoch)
            run.engine.train()
            batches, t_prev = iter(run.loader), time.perf_counter()
            for batch in _agreed_batches(batches, stop, report, ckpt):
                t_data = time.perf_counter()
                # ---- schedules
                values = run.schedules.at(epoch * run.steps_per_epoch + pos.step_in_epoch, epoch)
                # ---- the step: queued on the device, nothing here waits for it
                crops = [c.to(run.device, non_blocking=True) for c in batch.crops]
                try:
                    step_metrics = run.step(crops, values)
                except RuntimeError as exc:  # torch.OutOfMemoryError: one line naming the levers, not a traceback
                    if not errors.is_out_of_memory(exc):
                        raise
                    raise errors.out_of_memory(exc, store.latest(), pos.global_step + 1) from exc
                pos.step_in_epoch, pos.global_step = pos.step_in_epoch + 1, pos.global_step + 1
                end_of_epoch = pos.step_in_epoch == run.steps_per_epoch
                if end_of_epoch:
                    pos.epoch, pos.step_in_epoch = epoch + 1, 0
                done = pos.global_step >= run.total_steps
                # ---- log the previous step (read now, while this one runs)
                report.push(pos, epoch, values, step_metrics, t_prev, t_data)
                if stop.signal is not None and run.rank == 0:
                    report.progress.info(
                        f"signal {stop.signal}: stopping after step {pos.global_step} with a checkpoint"
                        + (" (Ctrl-C again quits at once, without it)" if stop.signal == signal.SIGINT else ""))
                # ---- evaluation: k-NN and attention maps at the epochs asked for
                every_knn, every_attn = cfg.eval.knn_every_epochs, cfg.eval.attention_every_epochs
                if (end_of_epoch and every_knn and (epoch + 1) % every_knn == 0) or (done and cfg.eval.knn_at_end):
                    report.flush()
                    if report.bad is None:  # (a non-finite step stops at the checkpoint below)
                        report.log_knn(periodic_knn(cfg, run.teacher, run.device, run.rank, run.world),
                                       pos.global_step, epoch, f"epoch {epoch}", cfg.eval.knn_k)
                if end_of_epoch and every_attn and (epoch + 1) % every_attn == 0 and run.rank == 0:
                    png = periodic_attention(cfg, run.teacher, out_dir, pos.global_step, run.device, report.metrics)
                    report.progress.info(f"epoch {epoch} attention maps: {png}")
                # ---- checkpoint: every checkpoint.every_steps, at the end, and at epoch ends unless epochs are
                # shorter than every_steps (resume is exact mid-epoch: a small set's 2-step epochs need no save each)
                every = cfg.checkpoint.every_steps
                if (end_of_epoch and (not every or run.steps_per_epoch >= every)) or done or \
                        (every and pos.global_step % every == 0):
                    ckpt.save()
                if done:
                    break
                t_prev = time.perf_counter()
            if pos.global_step == steps_before and not stop.agreed:  # would spin forever on the same position
                raise DataError(f"the {cfg.data.backend} loader yielded no batch for epoch {epoch} from step "
                                f"{pos.step_in_epoch} of {run.steps_per_epoch}; check data.path and the loader")
        report.flush()
    finally:
        if batches is not None and hasattr(batches, "close"):
            batches.close()  # shuts the loader's workers down now, not when an exception's traceback is freed
        run.loader.close()
        report.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    if run.rank == 0:  # where everything went, then the run's summary (k-NN before → after, loss against ln K)
        metrics = out_dir / cfg.logging.metrics_file
        how = f"stopped by signal {stop.signal}" if stop.signal is not None else "done"
        report.progress.info(f"{how}: {pos.global_step} steps; checkpoint {store.latest()}; metrics {metrics}; "
                             f"output {out_dir.resolve()}")
        for line in summarise_run(metrics, cfg.model.out_dim) if cfg.logging.summary else ():
            report.progress.info(line)
    return report.last


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dino_fast.train", description="Train a DINO ViT. Overrides are dotted key=value, e.g. optim.lr=1e-3.")
    parser.add_argument("--config", default=None, help="YAML recipe (dino_fast/configs/*.yaml); overrides only")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started, out_dir = time.time(), None
    try:
        cfg = load_config(args.config, args.overrides)
        out_dir = cfg.checkpoint.output_dir
        train(cfg)
        if torch.distributed.is_initialized():  # a clean exit for NCCL/gloo (the process ends here anyway)
            torch.distributed.destroy_process_group()
    except KeyboardInterrupt:
        print(errors.INTERRUPTED_MESSAGE, file=sys.stderr)
        sys.exit(errors.INTERRUPTED)
    except Exception as exc:
        code, message = errors.exit_code(exc), str(exc)
        if code is None:  # not one of ours: another rank's failure seen here as a broken collective, or a bug
            peer = errors.peer_failure(out_dir, dist.rank(), dist.world_size(), started)
            if peer is None:
                raise
            code, message = peer
        else:
            errors.report(exc, code, out_dir, dist.rank(), dist.world_size())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
