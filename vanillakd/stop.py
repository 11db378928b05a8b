"""SIGTERM and SIGINT: what a batch system (SLURM, Kubernetes) sends before it kills a preempted job, and
Ctrl-C. The signal only sets a flag; the epoch loop reads it after each step, finishes the optimizer update
in progress, writes a recovery checkpoint and stops, so that ``--resume`` continues exactly there.

Under DDP every rank must stop after the same step. Ranks agree through an all-reduce of their flags, issued
after each step without waiting, and read one step later: no rank waits on it, and since every rank reads
the same reduction, all of them stop after the same step.
"""
from __future__ import annotations

import logging
import signal
import threading

import torch
import torch.distributed as dist

from .errors import RunStopped

__all__ = ["RunStopped", "StopSignals", "StopVote", "signal_name"]

log = logging.getLogger("vanillakd")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Handlers for SIGTERM / SIGINT that record the signal (a second Ctrl-C interrupts at once)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopSignals:
        # signal handlers can only be set from the main thread (an in-process caller may run us elsewhere)
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                if signal.getsignal(sig) is signal.SIG_IGN:
                    continue  # ignored by whoever started us (a background job's SIGINT): it stays ignored
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the step
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopVote:
    """Whether the run should stop now, agreed by every rank: ``poll()`` is called once per step on each rank
    and returns the signal number some rank had received one step earlier (or None)."""

    def __init__(self, signals: StopSignals, distributed: bool):
        self.signals = signals
        self.distributed = distributed
        self._group = None
        self._buf: torch.Tensor | None = None
        self._work = None
        self.agreed: int | None = None
        if distributed and dist.get_backend() != "gloo":
            # a CPU group for the vote: an NCCL reduction would need a device tensor and a host sync per step
            self._group = dist.new_group(backend="gloo")

    def poll(self) -> int | None:
        if self.agreed is not None:
            return self.agreed
        local = self.signals.signum or 0
        if not self.distributed:
            self.agreed = local or None
            return self.agreed
        if self._work is not None:
            self._work.wait()
            self.agreed = int(self._buf.item()) or None
        self._buf = torch.tensor([local], dtype=torch.int64)
        self._work = dist.all_reduce(self._buf, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return self.agreed

    def close(self) -> None:
        """Wait for the vote in flight, so no collective is left pending when the group goes."""
        if self._work is not None:
            self._work.wait()
            self._work = None
