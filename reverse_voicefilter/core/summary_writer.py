"""A tensorboardX ``SummaryWriter`` that survives a full disk.

tensorboardX writes from a thread, which a write error (a full disk) ends. Every event added after
that would wait forever for it, and so would the interpreter at exit: logging then stops with one
warning and the training goes on (its checkpoints report a full disk themselves). Both trainers
(the VoiceFilter's and the embedder's) write through this class.
"""
import contextlib
import logging

from tensorboardX import SummaryWriter

from reverse_voicefilter.core.atomic import NEARLY_FULL_BYTES, free_bytes

logger = logging.getLogger(__name__)


class SafeSummaryWriter(SummaryWriter):
    """``SummaryWriter`` whose events are dropped, with one warning, once its writing thread died."""

    def __init__(self, logdir, purge_step=None):
        """``purge_step``: the first step this run writes. TensorBoard then hides the events an
        earlier run wrote in this folder at that step or later, so a run resumed from an older
        checkpoint (or started over) does not show those steps twice."""
        super().__init__(logdir, purge_step=purge_step)
        self.stopped = False

    def _events(self):
        """tensorboardX's EventFileWriter (its thread and queue), or None where it has another shape."""
        return getattr(getattr(self, "file_writer", None), "event_writer", None)

    def writing(self):
        """Whether events still reach the file; checked before each one (see the module docstring)."""
        if self.stopped:
            return False
        thread = getattr(self._events(), "_worker", None)
        if thread is None or thread.is_alive():
            return True
        self.stopped = True
        why = "no space left on its device" if free_bytes(self.logdir) < NEARLY_FULL_BYTES else "a write failed"
        logger.warning("TensorBoard logging stopped: %s (%s); the training goes on", self.logdir, why)
        return False

    def scalar(self, tag, value, step):
        """``add_scalar`` while events still reach the file."""
        if self.writing():
            self.add_scalar(tag, value, step)

    def close(self):
        events = self._events()
        if self.writing() or events is None:
            super().close()
            return
        # its thread is gone: close() would wait for it to take a last event, and the exit for the
        # queue's feeder, blocked on a pipe nobody reads
        queue = getattr(events, "_event_queue", None)
        if queue is not None:
            queue.cancel_join_thread()
        events._closed = True
        with contextlib.suppress(OSError):
            events._ev_writer.close()
