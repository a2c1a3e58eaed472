"""How DataLoader worker processes meet stop signals and die, so that the trainer decides when a run ends.

A terminal's Ctrl-C, SLURM's ``scancel``, a Kubernetes pod stop and the DeepSpeed launcher all signal the whole
process tree, DataLoader workers included. A worker killed that way made the trainer fail mid-step or
mid-checkpoint ("DataLoader worker is killed by signal") instead of finishing its step and checkpointing, because
torch's SIGCHLD handler raises a dead worker's error wherever the main process happens to be. Two habits fix that:

- workers ignore SIGINT (:func:`ignore_interrupts`, a ``worker_init_fn``): after Ctrl-C they keep serving the
  main process until it has finished its step. SIGTERM is left alone: multiprocessing and torch end workers with it;
- a worker that dies anyway (SIGTERM, the kernel's OOM killer, a segfault in a decoder) is reported by the next
  ``next()`` call, between steps, instead of by torch's SIGCHLD handler
  (:func:`report_worker_failures_at_next`); torch's loader notices a dead worker within its 5 s status interval.
  A worker that dies after the main process received its last batch of the epoch is not noticed by torch until
  the next epoch's first batch (and not at all after the last epoch), so the epoch's end checks how its workers ended
  (:func:`raise_if_a_worker_died`): the same death gets the same report, whenever it falls.
  The trainer then checkpoints every finished step before it stops (a signal) or fails (anything else).
"""

from __future__ import annotations

import signal
import threading


def ignore_interrupts(_worker_id: int = 0) -> None:
    """``worker_init_fn``: SIGINT is the main process's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def report_worker_failures_at_next() -> None:
    """Remove torch's SIGCHLD handler (installed once per process by the first multi-worker iterator; call this
    after creating one). Only a handler from ``torch.utils.data`` is removed, and only from the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return
    handler = signal.getsignal(signal.SIGCHLD)
    if callable(handler) and getattr(handler, "__module__", "").startswith("torch.utils.data"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def raise_if_a_worker_died(iterator) -> None:
    """After a multi-worker DataLoader iterator ran out: raise as torch does for a worker that did not end normally.

    torch checks none of the workers' exit codes when the epoch's last batch is read, so a worker killed after it
    delivered its last batch (by the OOM killer, say) would go unnoticed until the next epoch, or for good after the
    last one. ``_workers`` is the iterator's list of worker processes (torch ≥ 1.2); an iterator without one (no
    workers) passes.
    """
    for worker in getattr(iterator, "_workers", ()):
        code = worker.exitcode
        if code is None and _is_dead(worker.pid):  # killed, its threads still exiting: not yet waitable (workers
            worker.join(timeout=5)                # kept between epochs have not been joined at the epoch's end)
            code = worker.exitcode
        if code is None or code == 0:
            continue
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            raise RuntimeError(f"DataLoader worker (pid {worker.pid}) is killed by signal: {name}")
        raise RuntimeError(f"DataLoader worker (pid {worker.pid}) exited with code {code}")


def _is_dead(pid: int) -> bool:
    """Linux: the process is a zombie (``Z``) or dying (``X``) by ``/proc/<pid>/stat``; elsewhere False."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False
