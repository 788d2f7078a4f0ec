"""SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) end the run at the end of the current step, after a
checkpoint, on every rank together: the handler only raises a flag, and the ranks agree on it after each step.
A second SIGINT interrupts at once, as Python does by default."""

import signal

from promoe.training.ranks import any_rank

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Installs the handlers; `agreed()` (every rank, once per step) is true on all ranks once one was signalled."""

    def __init__(self):
        self.signal: int | None = None
        self.previous = {number: signal.signal(number, self._handle) for number in SIGNALS}

    def _handle(self, number, frame) -> None:
        self.signal = number
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

    def agreed(self) -> bool:
        return any_rank(self.signal is not None)

    def exit_status(self) -> int:
        """128 + the signal's number, the shell's convention for a process ended by a signal (SIGTERM on another
        rank counts as SIGTERM here)."""
        return 128 + (self.signal or signal.SIGTERM)

    def restore(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
