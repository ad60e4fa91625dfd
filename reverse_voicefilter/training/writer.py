"""TensorBoard summaries under ``logs/NAME``, with the original's tags.

Scalars ``train_loss``, ``test_loss``, ``SDR`` (median over the validation
set), plus ``step_time`` (seconds per step) and ``learning_rate``; audio
``mixed_wav``, ``target_wav``, ``estimated_wav``; images
``data/mixed_spectrogram``, ``data/target_spectrogram``,
``result/estimated_spectrogram``, ``result/estimated_mask``,
``result/estimation_error_sq``.

tensorboardX writes from a thread, which a write error (a full disk) ends. Every event added
after that would wait forever for it, and so would the interpreter at exit: logging then stops
with one warning and the training goes on (its checkpoints report a full disk themselves).
"""
import contextlib
import logging

import numpy as np
from tensorboardX import SummaryWriter

from reverse_voicefilter.core.atomic import NEARLY_FULL_BYTES, free_bytes
from reverse_voicefilter.core.plotting import spectrogram_image

logger = logging.getLogger(__name__)


class MyWriter(SummaryWriter):
    """The original's writer (same name, same tags), on tensorboardX."""

    def __init__(self, hp, logdir, purge_step=None):
        """``purge_step``: the first step this run writes. TensorBoard then hides the events an
        earlier run wrote in this folder at that step or later, so a run resumed from an older
        checkpoint (or started over) does not show those steps twice."""
        super().__init__(logdir, purge_step=purge_step)
        self.hp = hp
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

    def _scalar(self, tag, value, step):
        if self.writing():
            self.add_scalar(tag, value, step)

    def log_training(self, train_loss, step, step_time=None, learning_rate=None):
        self._scalar("train_loss", train_loss, step)
        if step_time is not None:
            self._scalar("step_time", step_time, step)
        if learning_rate is not None:
            self._scalar("learning_rate", learning_rate, step)

    def _audio(self, tag, wav, step):
        if self.writing():
            wav = np.clip(np.asarray(wav, dtype=np.float32), -1.0, 1.0)  # TensorBoard plays [-1, 1]
            self.add_audio(tag, wav, step, sample_rate=self.hp.audio.sample_rate)

    def _image(self, tag, spec, step):
        if self.writing():
            self.add_image(tag, spectrogram_image(spec), step, dataformats="HWC")

    def log_evaluation(self, test_loss, sdr, mixed_wav, target_wav, est_wav,
                       mixed_spec, target_spec, est_spec, est_mask, step):
        """Scores over the validation set and one example (wavs [N], spectrograms [T, F])."""
        self._scalar("test_loss", test_loss, step)
        self._scalar("SDR", sdr, step)
        self._audio("mixed_wav", mixed_wav, step)
        self._audio("target_wav", target_wav, step)
        self._audio("estimated_wav", est_wav, step)
        self._image("data/mixed_spectrogram", mixed_spec, step)
        self._image("data/target_spectrogram", target_spec, step)
        self._image("result/estimated_spectrogram", est_spec, step)
        self._image("result/estimated_mask", est_mask, step)
        self._image("result/estimation_error_sq", np.square(est_spec - target_spec), step)
