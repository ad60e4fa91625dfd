"""The one audio front-end: loading, saving, spectrograms, embedder mels.

``Audio(hp)`` computes exactly what the original computed (numpy/librosa,
reflect padding at the edges, as librosa 0.7 did by default) and the same
transforms batched in torch on any device, for training, validation and
inference. Shapes follow the original: spectrograms are ``[time, freq]``,
embedder mels ``[num_mels, time]``.
"""
import functools
import logging
import os
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf
import torch

from reverse_voicefilter.core.atomic import atomic_path
from reverse_voicefilter.core.errors import UserError

logger = logging.getLogger(__name__)

# Peak amplitude under which a file counts as silent (-100 dBFS).
SILENCE_PEAK = 1e-5


# Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, logarithmic above.
_MEL_LINEAR_STEP = 200.0 / 3  # Hz per mel below 1 kHz
_MEL_LOG_START_HZ = 1000.0
_MEL_LOG_START = _MEL_LOG_START_HZ / _MEL_LINEAR_STEP
_MEL_LOG_STEP = np.log(6.4) / 27.0


def _hz_to_mel(hz):
    hz = np.asanyarray(hz, dtype=np.float64)
    mel = hz / _MEL_LINEAR_STEP
    above = hz >= _MEL_LOG_START_HZ
    return np.where(above, _MEL_LOG_START + np.log(np.maximum(hz, _MEL_LOG_START_HZ) / _MEL_LOG_START_HZ)
                    / _MEL_LOG_STEP, mel)


def _mel_to_hz(mel):
    mel = np.asanyarray(mel, dtype=np.float64)
    hz = _MEL_LINEAR_STEP * mel
    return np.where(mel >= _MEL_LOG_START, _MEL_LOG_START_HZ * np.exp(_MEL_LOG_STEP * (mel - _MEL_LOG_START)), hz)


@functools.lru_cache(maxsize=8)
def mel_basis(sample_rate, n_fft, n_mels):
    """Slaney-normalized mel filterbank [n_mels, 1 + n_fft // 2] float32, equal to
    ``librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels)``.

    Built here in numpy, as ``librosa.filters.mel`` builds it, because importing any of
    librosa's conversion modules pulls in numba and llvmlite (0.3-0.4 s of CPU, the
    largest part of inference.py's start-up besides torch); tests/test_audio.py holds the
    two equal.
    """
    fft_f = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2.0), n_mels + 2))
    ramps = mel_f[:, None] - fft_f[None, :]  # [n_mels + 2, bins]
    fdiff = np.diff(mel_f)[:, None]
    lower = -ramps[:-2] / fdiff[:-1]
    upper = ramps[2:] / fdiff[1:]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    weights = weights.astype(np.float32)
    weights.setflags(write=False)  # shared by every caller through the cache
    return weights


class AudioError(UserError):
    """An audio file that cannot be used: missing, unreadable, empty or silent."""


def sf_name(path):
    """A path as soundfile should get it: the file system's own bytes on POSIX, so that a name that is
    not valid UTF-8 (a Latin-1 byte, read by Python as a surrogate) opens, where soundfile's
    strict encoding of a str would fail."""
    return os.fsencode(path) if os.name == "posix" else str(path)


def load_wav(path, sample_rate=16000):
    """Read any file soundfile can, as mono float32 at ``sample_rate``.

    Stereo is averaged to mono; other rates are resampled (soxr, see
    :func:`resample`). Raises :class:`AudioError` for a missing, unreadable, empty or
    silent file, naming the file. A truncated file (its header promises more than it holds)
    is read as far as it goes, with a warning giving both lengths.
    """
    path = Path(path)
    if path.is_dir():
        raise AudioError(f"{path} is a folder, not an audio file (give a file: wav, flac, ...)")
    if not path.is_file():
        raise AudioError(f"audio file not found: {path}")
    try:
        with sf.SoundFile(sf_name(path)) as f:
            rate = f.samplerate
            data = f.read(dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as err:
        raise AudioError(f"cannot read audio file {path}: {err}") from None
    if data.shape[0] == 0:
        raise AudioError(f"audio file {path} is empty (no samples)")
    promised = wav_header_frames(path)
    if promised is not None and data.shape[0] < promised:
        logger.warning("audio file %s is truncated: its header promises %.2f s (%d frames), it holds %.2f s "
                       "(%d frames); using what it holds", path, promised / rate, promised, data.shape[0] / rate,
                       data.shape[0])
    wav = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.all(np.isfinite(wav)):
        raise AudioError(f"audio file {path} holds NaN or infinite samples")
    if np.max(np.abs(wav)) < SILENCE_PEAK:
        raise AudioError(f"audio file {path} is silent")
    if rate != sample_rate:
        wav = resample(wav, rate, sample_rate)
    return np.ascontiguousarray(wav, dtype=np.float32)


# A writer that streams a WAV (to a pipe) cannot know its length and writes a placeholder of 2 GiB or
# more in the data chunk's size: no promise, so no truncation to report.
_STREAMING_DATA_SIZE = 0x7FFF0000
_MOST_CHUNKS = 64


def wav_header_frames(path):
    """The frames a RIFF WAV's data chunk says it holds, or None (another format, a streamed WAV, a
    header that cannot be read). libsndfile reports a truncated WAV's frames as what the file
    holds, so the header is read here to tell the two apart."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            block_align = None
            for _ in range(_MOST_CHUNKS):
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                kind, size = chunk[:4], int.from_bytes(chunk[4:], "little")
                if kind == b"data":
                    if not block_align or size >= _STREAMING_DATA_SIZE:
                        return None
                    return size // block_align
                if kind == b"fmt ":
                    fmt = f.read(min(size, 64))
                    block_align = int.from_bytes(fmt[12:14], "little") if len(fmt) >= 14 else None
                    size -= len(fmt)
                f.seek(size + (size & 1), os.SEEK_CUR)  # chunks are padded to an even size
    except OSError:
        return None
    return None


def resample(wav, rate, target_rate):
    """``librosa.resample(wav, orig_sr=rate, target_sr=target_rate)`` (soxr's high quality, the
    length fixed to ceil(N * target / rate)), calling soxr itself: librosa.core.audio imports
    numba, 0.3-0.4 s of CPU at start-up for one call."""
    import soxr

    size = int(np.ceil(wav.shape[-1] * float(target_rate) / rate))
    out = soxr.resample(wav, rate, target_rate, quality="soxr_hq")
    out = out[:size] if out.shape[-1] >= size else np.pad(out, (0, size - out.shape[-1]))
    return np.asarray(out, dtype=wav.dtype)


def save_wav(path, wav, sample_rate=16000, subtype="FLOAT"):
    """Write a mono WAV atomically (temporary file, then rename).

    Float WAV by default, as the original's ``librosa.output.write_wav`` wrote. The same
    audio always gives the same bytes (see :func:`_write_float_wav`).
    """
    wav = np.asarray(wav, dtype=np.float32)
    with atomic_path(path) as tmp:
        if subtype == "FLOAT":
            _write_float_wav(tmp, wav, sample_rate)
        else:
            sf.write(sf_name(tmp), wav, sample_rate, subtype=subtype, format="WAV")


_SFC_SET_ADD_PEAK_CHUNK = 0x1050  # libsndfile's sf_command() code (sndfile.h)


def _write_float_wav(path, wav, sample_rate):
    """libsndfile puts a PEAK chunk holding the time of writing into float WAVs, so the same audio
    would give different bytes on every run; it is switched off through libsndfile's command
    interface, which soundfile keeps private. Where that is missing, scipy writes the file (same
    samples, but importing scipy.io costs ~0.2 s of start-up)."""
    if not (hasattr(sf, "_snd") and hasattr(sf, "_ffi")):
        import scipy.io.wavfile

        scipy.io.wavfile.write(path, sample_rate, wav)
        return
    with sf.SoundFile(sf_name(path), "w", sample_rate, 1, subtype="FLOAT", format="WAV") as f:
        sf._snd.sf_command(f._file, _SFC_SET_ADD_PEAK_CHUNK, sf._ffi.NULL, 0)
        f.write(wav)


class Audio:
    """Spectrogram transforms of the original, in numpy and batched torch."""

    def __init__(self, hp):
        self.hp = hp
        self._torch_cache = {}

    @property
    def _mel_basis(self):
        return mel_basis(self.hp.audio.sample_rate, self.hp.embedder.n_fft, self.hp.embedder.num_mels)

    # ---- numpy, as the original ------------------------------------------------
    def stft(self, y):
        a = self.hp.audio
        return librosa.stft(
            y=y, n_fft=a.n_fft, hop_length=a.hop_length, win_length=a.win_length,
            window="hann", center=True, pad_mode="reflect",
        )

    def istft(self, mag, phase):
        a = self.hp.audio
        stft_matrix = mag * np.exp(1j * phase)
        return librosa.istft(stft_matrix, hop_length=a.hop_length, win_length=a.win_length, window="hann")

    def amp_to_db(self, x):
        return 20.0 * np.log10(np.maximum(1e-5, x))

    def db_to_amp(self, x):
        return np.power(10.0, x * 0.05)

    def normalize(self, S):
        return np.clip(S / -self.hp.audio.min_level_db, -1.0, 0.0) + 1.0

    def denormalize(self, S):
        return (np.clip(S, 0.0, 1.0) - 1.0) * -self.hp.audio.min_level_db

    def wav2spec(self, y):
        """Waveform [N] -> (normalized log magnitude [T, F], phase [T, F]), float32."""
        D = self.stft(np.asarray(y, dtype=np.float32))
        S = self.amp_to_db(np.abs(D)) - self.hp.audio.ref_level_db
        S, phase = self.normalize(S), np.angle(D)
        return S.T.astype(np.float32), phase.T.astype(np.float32)

    def spec2wav(self, spectrogram, phase):
        """(normalized magnitude [T, F], phase [T, F]) -> waveform [hop * (T - 1)]."""
        spectrogram, phase = np.asarray(spectrogram).T, np.asarray(phase).T
        S = self.db_to_amp(self.denormalize(spectrogram) + self.hp.audio.ref_level_db)
        return self.istft(S, phase).astype(np.float32)

    def get_mel(self, y):
        """Waveform [N] -> log10 mel [num_mels, T] for the original embedder."""
        e, a = self.hp.embedder, self.hp.audio
        D = librosa.stft(
            y=np.asarray(y, dtype=np.float32), n_fft=e.n_fft, hop_length=a.hop_length,
            win_length=a.win_length, window="hann", center=True, pad_mode="reflect",
        )
        mel = np.dot(self._mel_basis, np.abs(D) ** 2)
        return np.log10(mel + 1e-6).astype(np.float32)

    # ---- torch, batched, on the input's device ------------------------------------
    def _window(self, device):
        key = ("window", device)
        if key not in self._torch_cache:
            self._torch_cache[key] = torch.hann_window(self.hp.audio.win_length, device=device)
        return self._torch_cache[key]

    def _mel_basis_on(self, device):
        key = ("mel", device)
        if key not in self._torch_cache:
            self._torch_cache[key] = torch.from_numpy(self._mel_basis.copy()).to(device)
        return self._torch_cache[key]

    def wav2spec_torch(self, wav, phase=True):
        """Waveforms [B, N] (or [N]) -> (magnitude, phase), each [B, T, F], float32.

        ``phase=False`` returns the magnitude alone, for training, which never uses the phase
        (its ``angle`` is a large part of the transform's time)."""
        a = self.hp.audio
        with torch.autocast(wav.device.type, enabled=False):
            D = torch.stft(
                wav.float(), n_fft=a.n_fft, hop_length=a.hop_length, win_length=a.win_length,
                window=self._window(wav.device), center=True, pad_mode="reflect", return_complex=True,
            )
            S = 20.0 * torch.log10(torch.clamp(D.abs(), min=1e-5)) - a.ref_level_db
            S = torch.clamp(S / -a.min_level_db, -1.0, 0.0) + 1.0
            mag = S.transpose(-1, -2).contiguous()
            if not phase:
                return mag
            return mag, torch.angle(D).transpose(-1, -2).contiguous()

    def spec2wav_torch(self, spectrogram, phase, length=None):
        """(magnitude [B, T, F], phase [B, T, F]) -> waveforms [B, hop * (T - 1)] (or ``length``)."""
        a = self.hp.audio
        with torch.autocast(spectrogram.device.type, enabled=False):
            S = (torch.clamp(spectrogram.float(), 0.0, 1.0) - 1.0) * -a.min_level_db + a.ref_level_db
            mag = torch.pow(10.0, S * 0.05).transpose(-1, -2)
            D = torch.polar(mag, phase.float().transpose(-1, -2))
            return torch.istft(
                D, n_fft=a.n_fft, hop_length=a.hop_length, win_length=a.win_length,
                window=self._window(spectrogram.device), center=True, length=length,
            )

    def get_mel_torch(self, wav):
        """Waveforms [B, N] (or [N]) -> log10 mels [B, num_mels, T]."""
        e, a = self.hp.embedder, self.hp.audio
        with torch.autocast(wav.device.type, enabled=False):
            D = torch.stft(
                wav.float(), n_fft=e.n_fft, hop_length=a.hop_length, win_length=a.win_length,
                window=self._window(wav.device), center=True, pad_mode="reflect", return_complex=True,
            )
            power = D.real ** 2 + D.imag ** 2
            return torch.log10(torch.matmul(self._mel_basis_on(wav.device), power) + 1e-6)
