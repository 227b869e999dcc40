"""Ctrl-C and SIGTERM (SLURM preemption, `kill`) stop a training run at the
next step with a checkpoint, instead of losing every step since the last one."""
from __future__ import annotations

import signal
import threading

import torch

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """The run stopped on a signal after writing a checkpoint; the message says
    how to go on. ``daae train`` exits 130 with it."""


class StopRequest:
    """Signal handlers, from ``install()`` to ``restore()``, that only note the
    request; the training loop asks ``requested()`` between steps. A second
    signal stops at once, as the default handler would. Outside the main
    thread (a Tune trial) Python cannot take signals: nothing is installed."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    @classmethod
    def install(cls) -> "StopRequest":
        request = cls()
        if threading.current_thread() is threading.main_thread():
            for number in SIGNALS:
                request._previous[number] = signal.signal(number, request._note)
        return request

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _note(self, number, frame) -> None:
        if self.signal_name is not None:  # asked twice: stop now
            self.restore()
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(number).name

    def requested(self, device, processes: int) -> bool:
        """Whether any process was asked to stop. With several processes this
        is a collective: call it on every process at the same steps."""
        if processes == 1:
            return self.signal_name is not None
        flag = torch.tensor([self.signal_name is not None], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and self.signal_name is None:
            self.signal_name = "a signal to another process"
        return bool(flag.item())
