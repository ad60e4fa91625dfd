"""TensorBoard summaries under ``logs/NAME``, with the original's tags.

Scalars ``train_loss``, ``test_loss``, ``SDR`` (median over the validation
set), plus ``step_time`` (seconds per step) and ``learning_rate``; audio
``mixed_wav``, ``target_wav``, ``estimated_wav``; images
``data/mixed_spectrogram``, ``data/target_spectrogram``,
``result/estimated_spectrogram``, ``result/estimated_mask``,
``result/estimation_error_sq``.

Written through :class:`reverse_voicefilter.core.summary_writer.SafeSummaryWriter`: a full disk
stops the logging with one warning, never the training.
"""
import numpy as np

from reverse_voicefilter.core.plotting import spectrogram_image
from reverse_voicefilter.core.summary_writer import SafeSummaryWriter


class MyWriter(SafeSummaryWriter):
    """The original's writer (same name, same tags), on tensorboardX."""

    def __init__(self, hp, logdir, purge_step=None):
        super().__init__(logdir, purge_step=purge_step)
        self.hp = hp

    def log_training(self, train_loss, step, step_time=None, learning_rate=None):
        self.scalar("train_loss", train_loss, step)
        if step_time is not None:
            self.scalar("step_time", step_time, step)
        if learning_rate is not None:
            self.scalar("learning_rate", learning_rate, step)

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
        self.scalar("test_loss", test_loss, step)
        self.scalar("SDR", sdr, step)
        self._audio("mixed_wav", mixed_wav, step)
        self._audio("target_wav", target_wav, step)
        self._audio("estimated_wav", est_wav, step)
        self._image("data/mixed_spectrogram", mixed_spec, step)
        self._image("data/target_spectrogram", target_spec, step)
        self._image("result/estimated_spectrogram", est_spec, step)
        self._image("result/estimated_mask", est_mask, step)
        self._image("result/estimation_error_sq", np.square(est_spec - target_spec), step)
