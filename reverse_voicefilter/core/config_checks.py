"""What a config's values may be: one table of ranges for every number, the choices of every
named option, and the rules between keys. Checked when a config is read (core.hparams), so a
negative size or a NaN level is one line naming the key, not a traceback hours later (or an
all-NaN result written with exit 0).
"""
import math
from dataclasses import dataclass

from reverse_voicefilter.core.errors import UserError


@dataclass(frozen=True)
class Range:
    """``lo <= x <= hi`` (strict where ``lo_open`` / ``hi_open``); None: unbounded. Floats must be
    finite."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, value):
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def describe(self):
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'above' if self.lo_open else 'at least'} {self.lo:g}"
        if self.hi is not None:
            return f"{'below' if self.hi_open else 'at most'} {self.hi:g}"
        return "a finite number"


AT_LEAST_1, AT_LEAST_0, POSITIVE, ANY = Range(1), Range(0), Range(0, lo_open=True), Range()
FRACTION = Range(0, 1)

# every numeric key of config/default.yaml and config/ge2e-defaults.yaml (tests/test_config_checks.py
# fails for a numeric key missing here)
RANGES = {
    "audio.n_fft": Range(16),
    "audio.num_freq": Range(9),  # n_fft // 2 + 1 (a rule below)
    "audio.sample_rate": Range(1000, 384000),
    "audio.hop_length": AT_LEAST_1,
    "audio.win_length": AT_LEAST_1,
    "audio.min_level_db": Range(-300, 0, hi_open=True),  # the normalization divides by it
    "audio.ref_level_db": Range(-300, 300),
    "audio.preemphasis": FRACTION,
    "audio.power": Range(0, 2, lo_open=True),
    "model.lstm_dim": AT_LEAST_1,
    "model.fc1_dim": AT_LEAST_1,
    "model.fc2_dim": AT_LEAST_1,
    "model.conv_channels": AT_LEAST_1,
    "data.audio_len": Range(0, 3600, lo_open=True),
    "data.epoch_samples": AT_LEAST_0,
    "data.mixing_seed": AT_LEAST_0,
    "data.audio_cache_mb": AT_LEAST_0,
    "data.gain_db": Range(0, 40),
    "data.snr_start_db": Range(0, 60),
    "data.snr_steps": AT_LEAST_0,
    "train.batch_size": AT_LEAST_1,
    "train.num_workers": AT_LEAST_0,
    "train.adam": POSITIVE,
    "train.adabound.initial": POSITIVE,
    "train.adabound.final": POSITIVE,
    "train.summary_interval": AT_LEAST_1,
    "train.checkpoint_interval": AT_LEAST_1,
    "train.max_steps": AT_LEAST_0,
    "train.seed": AT_LEAST_0,
    "train.validation_samples": AT_LEAST_0,
    "train.warmup_steps": AT_LEAST_0,
    "train.lr_final_ratio": FRACTION,
    "embedder.num_mels": AT_LEAST_1,
    "embedder.n_fft": Range(16),
    "embedder.emb_dim": AT_LEAST_1,
    "embedder.lstm_hidden": AT_LEAST_1,
    "embedder.lstm_layers": AT_LEAST_1,
    "embedder.window": AT_LEAST_1,
    "embedder.stride": AT_LEAST_1,
    "ge2e.speakers_per_batch": Range(2),
    "ge2e.utterances_per_speaker": Range(2),
    "ge2e.crop_frames": AT_LEAST_1,
    "ge2e.lr": POSITIVE,
    "ge2e.grad_clip": POSITIVE,
    "ge2e.init_w": POSITIVE,
    "ge2e.init_b": ANY,
    "ge2e.wb_grad_scale": AT_LEAST_0,
    "ge2e.max_steps": AT_LEAST_0,
    "ge2e.seed": AT_LEAST_0,
    "ge2e.summary_interval": AT_LEAST_1,
    "ge2e.checkpoint_interval": AT_LEAST_1,
    "ge2e.val_speakers": AT_LEAST_0,
    "ge2e.val_utterances": AT_LEAST_0,
    "ge2e.val_trials": AT_LEAST_0,
    "ge2e.num_workers": AT_LEAST_0,
}

CHOICES = {
    "train.optimizer": ("adam", "adabound"),
    "train.loss": ("mse", "power_law"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.lr_schedule": ("constant", "warmup_cosine"),
    "data.mixing": ("precomputed", "online"),
    "data.crop": ("head", "random"),
    "ge2e.architecture": ("original", "resemblyzer"),
}

# (keys, holds(values), what it says): each rule between keys, in the words of its message
RULES = [
    (("audio.n_fft", "audio.num_freq"), lambda n_fft, num_freq: num_freq == n_fft // 2 + 1,
     "audio.num_freq must be audio.n_fft // 2 + 1"),
    (("audio.num_freq", "model.fc2_dim"), lambda num_freq, fc2: fc2 == num_freq,
     "model.fc2_dim must equal audio.num_freq"),
    (("audio.win_length", "audio.n_fft"), lambda win, n_fft: win <= n_fft,
     "audio.win_length must not exceed audio.n_fft"),
    (("audio.hop_length", "audio.win_length"), lambda hop, win: hop <= win,
     "audio.hop_length must not exceed audio.win_length (the inverse STFT needs overlapping windows)"),
    (("audio.min_level_db", "audio.ref_level_db"), lambda lo, ref: lo < ref,
     "audio.min_level_db must be below audio.ref_level_db"),
]


def get(sections, key):
    value = sections
    for part in key.split("."):
        value = value[part]
    return value


def check_config(sections, source):
    """Raise a :class:`UserError` naming the first key of ``sections`` (a merged config, as plain
    dicts) out of its range, not one of its choices, or breaking a rule between keys."""
    for key, allowed in RANGES.items():
        if key.split(".")[0] not in sections:
            continue  # the ge2e section of a VoiceFilter config
        value = get(sections, key)
        if not allowed.contains(value):
            raise UserError(f"{source}: {key} must be {allowed.describe()}, got {value!r}")
    for key, allowed in CHOICES.items():
        if key.split(".")[0] in sections and get(sections, key) not in allowed:
            raise UserError(f"{source}: {key} must be one of {', '.join(allowed)}, got {get(sections, key)!r}")
    for keys, holds, message in RULES:
        values = [get(sections, k) for k in keys]
        if not holds(*values):
            shown = ", ".join(f"{k} is {v!r}" for k, v in zip(keys, values, strict=True))
            raise UserError(f"{source}: {message} ({shown})")
    for key in ("data.train_subsets", "data.test_subsets"):
        value = get(sections, key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{source}: {key} must be a list of subset folder names, got {value!r}")
