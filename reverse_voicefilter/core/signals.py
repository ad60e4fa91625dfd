"""Stopping a long run cleanly: SIGINT (Ctrl-C) and SIGTERM ask the loop to stop after the current
step and write a checkpoint; the exit code then says which signal it was (130, 143)."""
import logging
import signal
import threading

logger = logging.getLogger(__name__)

SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopSignals:
    """SIGINT/SIGTERM ask the loop to stop after the current step and checkpoint; a second
    Ctrl-C aborts at once without saving."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNAL_EXIT:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        if self.signum:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # second Ctrl-C: abort without a checkpoint
            return  # e.g. torchrun's SIGTERM after the terminal's SIGINT: already stopping
        self.signum = signum
        logger.warning("%s received: stopping after this step and writing a checkpoint (Ctrl-C again aborts "
                       "without saving)", signal.Signals(signum).name)


def signal_exit_code(signum):
    """The exit code of a run stopped by ``signum`` (128 + its number, as a shell reports it)."""
    return SIGNAL_EXIT.get(signum, 128 + signum)
