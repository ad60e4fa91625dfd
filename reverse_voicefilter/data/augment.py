"""Optional changes to how on-the-fly mixing makes a training sample, all off by default (the
original's recipe: the first ``audio_len`` seconds of each utterance, summed at their own levels):

* ``data.crop: random``: a window of ``audio_len`` seconds at a random place of each utterance,
  rather than its first seconds (a piece of 8 s gives many different targets, not one);
* ``data.gain_db: G``: the interference scaled by a random gain in [-G, +G] dB;
* ``data.snr_start_db: S`` with ``data.snr_steps: N``: an SNR curriculum, the interference S dB
  quieter than its own level at the first step, the difference falling linearly to 0 at step N
  (steps of ``train.batch_size`` samples).

Every draw comes from ``(mixing_seed, epoch, index)`` alone, so a sample is the same in any loader
worker and after a resume, and the stream stays exact.
"""
from dataclasses import dataclass

import numpy as np

AUGMENT_TAG = 0xA06  # seeds a sample's augmentation apart from its candidates


@dataclass(frozen=True)
class Augmentation:
    random_crop: bool = False
    gain_db: float = 0.0
    snr_start_db: float = 0.0
    snr_samples: int = 0  # the curriculum's length in samples

    @classmethod
    def from_hp(cls, hp):
        d = hp.data
        return cls(d.crop == "random", float(d.gain_db), float(d.snr_start_db), int(d.snr_steps) * hp.train.batch_size)

    @property
    def active(self):
        return self.random_crop or self.gain_db > 0 or (self.snr_start_db > 0 and self.snr_samples > 0)

    def draw(self, seed, epoch, index, epoch_samples):
        """``(target offset, interference offset, interference gain)`` of sample ``index`` of ``epoch``: the
        offsets as fractions in [0, 1) of the room each utterance leaves (None: the head), the gain a factor."""
        if not self.active:
            return None
        rng = np.random.default_rng([seed, epoch, index, AUGMENT_TAG])
        u_target, u_interference, u_gain = rng.random(3)
        offsets = (u_target, u_interference) if self.random_crop else (None, None)
        db = (2 * u_gain - 1) * self.gain_db
        if self.snr_start_db > 0 and self.snr_samples > 0:
            position = epoch * epoch_samples + index
            db -= self.snr_start_db * max(0.0, 1.0 - position / self.snr_samples)
        return (*offsets, float(10 ** (db / 20)))


def window(audio, length, offset):
    """``length`` samples of ``audio`` starting at ``offset`` (a fraction of the room it leaves; None:
    the start)."""
    if offset is None:
        return audio[:length]
    start = min(int(offset * (audio.shape[0] - length + 1)), audio.shape[0] - length)
    return audio[start:start + length]
