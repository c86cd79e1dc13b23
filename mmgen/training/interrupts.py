"""Stop requests (Ctrl-C, SIGTERM, SIGUSR1) deferred to the next step boundary, so a checkpoint is never taken in
the middle of a step (half-applied optimizer update, RNG state of a half-finished step).

SIGTERM is how SLURM and Kubernetes preempt a job and SIGUSR1 is what SLURM's `--signal` sends ahead of the time
limit: both finish the step, checkpoint and exit with EXIT_PREEMPTED, which a requeue script can test for. A second
Ctrl-C stops at once, without a checkpoint.
"""

from __future__ import annotations

import signal
import threading

from ..errors import UserError

EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM / SIGUSR1 after a checkpoint; run again with --resume
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class Interrupted(UserError):
    """Training stopped on request at a step boundary (after a checkpoint)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def ignore_stop_signals(_worker_id: int | None = None) -> None:
    """For DataLoader workers: leave stop signals to the main process, which shuts the workers down itself."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


class DeferredStop:
    """While active, stop signals only set `requested` (the signal's number); the loop checks it between steps.

    Outside the main thread (where Python cannot install handlers) it does nothing and `requested` stays None."""

    def __init__(self):
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "DeferredStop":
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, _frame) -> None:
        if self.requested is not None and number == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.requested = number

    def exit_code(self) -> int:
        """EXIT_INTERRUPTED for Ctrl-C, EXIT_PREEMPTED for SIGTERM / SIGUSR1."""
        return EXIT_INTERRUPTED if self.requested == signal.SIGINT else EXIT_PREEMPTED

    def name(self) -> str:
        """'Ctrl-C' or the signal's name."""
        return "Ctrl-C" if self.requested == signal.SIGINT else signal.Signals(self.requested).name
