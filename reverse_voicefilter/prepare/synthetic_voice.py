"""Synthetic voices for the demo corpus (:mod:`~reverse_voicefilter.prepare.demo_corpus`): per-speaker
traits drawn from a seed, an utterance plan (syllables, pitch, pauses), and the source-filter rendering
(glottal pulses through moving formant resonators, fricative noise, overlap-add), numpy alone."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16000

# Synthesis frames: 16 ms excitation windows every 8 ms, filtered in a 64 ms FFT
# buffer so a formant's ringing (a few ms at 60 Hz bandwidth) never wraps around.
FRAME_HOP = 128
FRAME_LEN = 2 * FRAME_HOP
FFT_SIZE = 1024
N_FORMANTS = 5
TARGET_RMS = 0.06  # about -24 dBFS on speech, near what EBU R128 normalization gives LibriSpeech
NOISE_SCALE = 0.14  # white noise at noise gain 1 about as loud as a full vowel: fricatives sit 8-16 dB below
NOISE_FLOOR = 2e-4  # far below the generator's top_db=20 silence threshold, but not digital silence

# Vowel formants (F1, F2, F3 in Hz) of an adult male voice (Peterson & Barney style averages).
VOWELS = np.array(
    [
        [270, 2290, 3010],  # i
        [390, 1990, 2550],  # I
        [530, 1840, 2480],  # E
        [660, 1720, 2410],  # ae
        [730, 1090, 2440],  # a
        [570, 840, 2410],  # O
        [440, 1020, 2240],  # U
        [300, 870, 2240],  # u
        [520, 1190, 2390],  # V
        [490, 1350, 1690],  # 3r
    ],
    dtype=np.float64,
)
VOWEL_BANDWIDTHS = np.array([70.0, 90.0, 130.0, 180.0, 250.0])
HIGH_FORMANTS = np.array([3500.0, 4500.0])
NASAL_FORMANTS = np.array([[250, 1000, 2300], [250, 1500, 2500], [250, 2000, 2700]], dtype=np.float64)
FRICATIVES = np.array([[6500, 1500], [3200, 900], [4500, 3000]], dtype=np.float64)  # s, sh, f: centre, width


@dataclass(frozen=True)
class Speaker:
    """Stable voice traits of one synthetic speaker (drawn by `speaker_traits`)."""

    speaker_id: int
    f0_mean: float  # Hz
    f0_range: float  # semitones of accent excursion
    formant_scale: float  # 1 / vocal tract length, relative to the reference male voice
    vowel_offsets: np.ndarray  # [n_vowels, 3] personal multiplicative colouring of each vowel
    rate: float  # syllables per second
    tilt: float  # dB per octave above 300 Hz
    breathiness: float  # aspiration noise relative to the pulses
    jitter: float  # relative period perturbation
    fricative_scale: float  # scales fricative centre frequencies
    high_formants: np.ndarray  # [2] F4, F5 of the reference-length tract, Hz (vary more between people)
    colour: np.ndarray  # [4, 2] amplitude (dB) and phase of ripples of the voice's long-term spectrum
    pause: float  # mean pause between words, seconds


def speaker_traits(seed: int, speaker_id: int) -> Speaker:
    """Draw the voice of `speaker_id`; the same (seed, speaker_id) always gives the same voice."""
    rng = np.random.default_rng([seed, speaker_id, 0x5EED])
    high_voice = rng.random() < 0.5
    if high_voice:
        f0_mean = rng.uniform(170.0, 250.0)
        formant_scale = rng.uniform(1.08, 1.24)
    else:
        f0_mean = rng.uniform(85.0, 150.0)
        formant_scale = rng.uniform(0.88, 1.04)
    return Speaker(
        speaker_id=speaker_id,
        f0_mean=f0_mean,
        f0_range=rng.uniform(1.5, 5.0),
        formant_scale=formant_scale,
        vowel_offsets=np.exp(rng.normal(0.0, 0.06, size=(len(VOWELS), 3))),
        rate=rng.uniform(3.5, 6.0),
        tilt=rng.uniform(-9.0, -3.0),
        breathiness=rng.uniform(0.02, 0.35),
        jitter=rng.uniform(0.003, 0.02),
        fricative_scale=rng.uniform(0.85, 1.15),
        pause=rng.uniform(0.08, 0.25),
        high_formants=HIGH_FORMANTS * rng.uniform(0.9, 1.1, size=2),
        colour=np.stack([rng.normal(0.0, 3.5, size=4), rng.uniform(0.0, 2.0 * np.pi, size=4)], axis=1),
    )


# ----------------------------------------------------------------------------- utterance plan


@dataclass
class Tracks:
    """Frame-rate control tracks of one utterance (one row per 8 ms frame)."""

    voiced_gain: np.ndarray  # [F]
    noise_gain: np.ndarray  # [F]
    formants: np.ndarray  # [F, 5] Hz
    bandwidths: np.ndarray  # [F, 5] Hz
    fric_centre: np.ndarray  # [F] Hz
    fric_width: np.ndarray  # [F] Hz
    stress: list  # (centre frame, width frames, height semitones) of pitch accents


def _segment(tracks: Tracks, start: int, stop: int, **values) -> None:
    """Write constant (or start/stop interpolated, given as 2-tuples) values into frames [start, stop)."""
    n = stop - start
    if n <= 0:
        return
    for name, value in values.items():
        array = getattr(tracks, name)
        if isinstance(value, tuple):  # glide from value[0] to value[1]
            w = np.linspace(0.0, 1.0, n)[:, None] if array.ndim == 2 else np.linspace(0.0, 1.0, n)
            a, b = np.asarray(value[0]), np.asarray(value[1])
            array[start:stop] = a * (1.0 - w) + b * w
        else:
            array[start:stop] = value


def _vowel_formants(spk: Speaker, vowel: int) -> np.ndarray:
    """F1..F5 (Hz) of `vowel` in this speaker's voice."""
    low = VOWELS[vowel] * spk.vowel_offsets[vowel]
    return np.concatenate([low, spk.high_formants]) * spk.formant_scale


def _plan_utterance(spk: Speaker, rng: np.random.Generator, n_frames: int) -> Tracks:
    """Lay out words, syllables and pauses over `n_frames` frames; return the raw (unsmoothed) tracks."""
    frames_per_s = SAMPLE_RATE / FRAME_HOP
    rest = _vowel_formants(spk, 8)  # schwa-like formants while silent, so transitions start somewhere
    tracks = Tracks(
        voiced_gain=np.zeros(n_frames),
        noise_gain=np.zeros(n_frames),
        formants=np.tile(rest, (n_frames, 1)),
        bandwidths=np.tile(VOWEL_BANDWIDTHS, (n_frames, 1)),
        fric_centre=np.full(n_frames, 5000.0),
        fric_width=np.full(n_frames, 1500.0),
        stress=[],
    )
    # leading/trailing silence, at most a fifth of the utterance each so one word always fits
    lead = min(int(rng.uniform(0.15, 0.4) * frames_per_s), n_frames // 5)
    tail = min(int(rng.uniform(0.15, 0.4) * frames_per_s), n_frames // 5)
    pos = lead
    syllable = frames_per_s / spk.rate
    while True:
        n_syllables = int(rng.choice([1, 1, 2, 2, 2, 3, 3, 4]))
        word_frames = int(n_syllables * syllable * 1.3)
        if pos + word_frames > n_frames - tail:
            if pos > lead:
                break
            n_syllables = 1  # a very short utterance still gets its one (possibly clipped) word
        for k in range(n_syllables):
            stressed = k == 0 and rng.random() < 0.7
            pos = _plan_syllable(spk, rng, tracks, pos, syllable, stressed, n_frames - tail)
        pos += int(min(rng.exponential(spk.pause), 3 * spk.pause) * frames_per_s) + 2
    return tracks


def _plan_syllable(spk: Speaker, rng: np.random.Generator, tracks: Tracks, pos: int,
                   syllable: float, stressed: bool, limit: int) -> int:
    """Write one consonant-vowel(-consonant) syllable starting at frame `pos`; return the next frame."""
    length = syllable * rng.uniform(0.75, 1.3) * (1.25 if stressed else 1.0)
    vowel = int(rng.integers(len(VOWELS)))
    onset = rng.choice(["none", "fricative", "plosive", "nasal"], p=[0.25, 0.3, 0.3, 0.15])
    onset_frames = 0
    if onset == "fricative":
        onset_frames = int(length * rng.uniform(0.2, 0.35))
        centre, width = FRICATIVES[rng.integers(len(FRICATIVES))]
        _segment(tracks, pos, min(pos + onset_frames, limit), noise_gain=rng.uniform(0.15, 0.4),
                 fric_centre=centre * spk.fricative_scale, fric_width=width)
    elif onset == "plosive":
        closure = int(rng.uniform(3, 7))
        burst = int(rng.uniform(1, 3))
        onset_frames = closure + burst
        _segment(tracks, pos + closure, min(pos + onset_frames, limit), noise_gain=rng.uniform(0.3, 0.7),
                 fric_centre=rng.uniform(1500, 4500) * spk.fricative_scale, fric_width=2500.0)
    elif onset == "nasal":
        onset_frames = int(length * rng.uniform(0.15, 0.3))
        nasal = np.concatenate([NASAL_FORMANTS[rng.integers(len(NASAL_FORMANTS))], spk.high_formants])
        _segment(tracks, pos, min(pos + onset_frames, limit), voiced_gain=0.3,
                 formants=nasal * spk.formant_scale)
    pos += onset_frames
    nucleus = max(int(length) - onset_frames, 4)
    stop = min(pos + nucleus, limit)
    start_formants = _vowel_formants(spk, vowel)
    if rng.random() < 0.3:  # diphthong: glide to a second vowel
        end_formants = _vowel_formants(spk, int(rng.integers(len(VOWELS))))
    else:
        end_formants = start_formants
    loudness = rng.uniform(0.8, 1.0) * (1.0 if stressed else 0.6)
    _segment(tracks, pos, stop, voiced_gain=loudness, formants=(start_formants, end_formants))
    if stressed:
        tracks.stress.append(((pos + stop) / 2, max(nucleus / 2, 2), rng.uniform(0.5, 1.0) * spk.f0_range))
    pos = stop
    if rng.random() < 0.25:  # coda fricative
        coda = int(length * rng.uniform(0.15, 0.3))
        centre, width = FRICATIVES[rng.integers(len(FRICATIVES))]
        _segment(tracks, pos, min(pos + coda, limit), noise_gain=rng.uniform(0.1, 0.3),
                 fric_centre=centre * spk.fricative_scale, fric_width=width)
        pos += coda
    return pos


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    """Moving average along frames (axis 0), edge-padded, for coarticulation and click-free gains."""
    if width <= 1:
        return x
    kernel = np.hanning(width + 2)[1:-1]
    kernel /= kernel.sum()
    pad = width // 2
    if x.ndim == 1:
        padded = np.pad(x, (pad, width - 1 - pad), mode="edge")
        return np.convolve(padded, kernel, mode="valid")
    padded = np.pad(x, ((pad, width - 1 - pad), (0, 0)), mode="edge")
    return np.stack([np.convolve(padded[:, j], kernel, mode="valid") for j in range(x.shape[1])], axis=1)


def _pitch_track(spk: Speaker, rng: np.random.Generator, tracks: Tracks) -> np.ndarray:
    """F0 in Hz per frame: declination over the utterance, accents, and a slow random wander."""
    n = len(tracks.voiced_gain)
    t = np.linspace(0.0, 1.0, n)
    semitones = spk.f0_range * (0.5 - t) * 0.8  # declination from +0.4 to -0.4 ranges
    frames = np.arange(n)
    for centre, width, height in tracks.stress:
        semitones += height * np.exp(-0.5 * ((frames - centre) / width) ** 2)
    wander = _smooth(rng.normal(0.0, 1.0, n), 25)
    semitones += 0.6 * wander / (np.std(wander) + 1e-9)
    return spk.f0_mean * 2.0 ** (semitones / 12.0)


# ----------------------------------------------------------------------------- signal rendering


def _glottal_pulses(spk: Speaker, rng: np.random.Generator, f0_frames: np.ndarray,
                    n_samples: int) -> np.ndarray:
    """Band-limited pulse train following the frame-rate F0 track, with jitter and shimmer."""
    frame_t = np.arange(len(f0_frames)) * FRAME_HOP  # frame f is centred on sample f*FRAME_HOP
    f0 = np.interp(np.arange(n_samples), frame_t, f0_frames)
    f0 *= 1.0 + spk.jitter * _smooth(rng.normal(0.0, 1.0, n_samples // 64 + 2), 3).repeat(64)[:n_samples]
    phase = np.cumsum(f0 / SAMPLE_RATE)
    cycle = np.floor(phase)
    crossings = np.nonzero(np.diff(cycle) > 0)[0]
    # fractional crossing time between samples i and i+1, so pitch is not quantized to the sample grid
    frac = (cycle[crossings + 1] - phase[crossings]) / (phase[crossings + 1] - phase[crossings])
    times = crossings + frac
    amps = 1.0 + 0.1 * rng.normal(size=len(times))  # shimmer
    taps = np.arange(-8, 9)
    base = np.floor(times).astype(np.int64)
    offsets = base[:, None] + taps[None, :]  # [pulses, 17]
    delta = offsets - times[:, None]
    kernel = np.sinc(delta * 0.9) * np.hanning(len(taps) + 2)[1:-1][None, :] * amps[:, None]
    pulses = np.zeros(n_samples + 32)
    np.add.at(pulses, np.clip(offsets + 16, 0, n_samples + 31), kernel)
    return pulses[16:16 + n_samples]


def _resonator_envelopes(formants: np.ndarray, bandwidths: np.ndarray) -> np.ndarray:
    """Complex response [F, FFT_SIZE//2+1] of a cascade of 2-pole resonators (unity gain at DC).

    formants, bandwidths: [F, N_FORMANTS] Hz.  A formant that stays put over the utterance (F4, F5)
    is evaluated once instead of per frame: this function dominates the synthesis time.
    """
    omega = np.linspace(0.0, np.pi, FFT_SIZE // 2 + 1)
    z1 = np.exp(-1j * omega)[None, :]
    z2 = z1 * z1
    response = np.ones((formants.shape[0], len(omega)), dtype=np.complex128)
    for k in range(formants.shape[1]):
        freq, bw = formants[:, k:k + 1], bandwidths[:, k:k + 1]
        if np.ptp(freq) < 1e-6 and np.ptp(bw) < 1e-6:  # smoothing leaves float dust on constants
            freq, bw = freq[:1], bw[:1]
        r = np.exp(-np.pi * bw / SAMPLE_RATE)
        theta = 2.0 * np.pi * np.minimum(freq, 0.45 * SAMPLE_RATE) / SAMPLE_RATE
        c1 = -2.0 * r * np.cos(theta)
        c2 = r * r
        response *= (1.0 + c1 + c2) / (1.0 + c1 * z1 + c2 * z2)
    return response


def _spectral_tilt(tilt_db_per_octave: float) -> np.ndarray:
    """Magnitude [FFT_SIZE//2+1] falling `tilt` dB per octave above 300 Hz (glottal roll-off + radiation)."""
    freqs = np.linspace(0.0, SAMPLE_RATE / 2, FFT_SIZE // 2 + 1)
    octaves = np.log2(np.maximum(freqs, 300.0) / 300.0)
    highpass = freqs / np.sqrt(freqs ** 2 + 80.0 ** 2)  # no DC or rumble
    return 10.0 ** (tilt_db_per_octave * octaves / 20.0) * highpass


def _voice_colour(spk: Speaker) -> np.ndarray:
    """Magnitude [FFT_SIZE//2+1]: the speaker's spectral tilt times a smooth personal ripple.

    The ripple (a few dB, periodic in log frequency) stands for the side cavities and glottal
    source shape that make a voice recognisable beyond its formant scale.
    """
    freqs = np.linspace(0.0, SAMPLE_RATE / 2, FFT_SIZE // 2 + 1)
    position = np.log2(np.maximum(freqs, 100.0) / 100.0) / np.log2(80.0)  # 100 Hz..8 kHz -> 0..1
    ripple_db = sum(a * np.cos(2.0 * np.pi * (k + 1) * position + phase)
                    for k, (a, phase) in enumerate(spk.colour))
    return _spectral_tilt(spk.tilt) * 10.0 ** (ripple_db / 20.0)


def _fricative_envelopes(centre: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Magnitude [F, FFT_SIZE//2+1]: a broad band of noise around each frame's fricative centre."""
    freqs = np.linspace(0.0, SAMPLE_RATE / 2, FFT_SIZE // 2 + 1)[None, :]
    bump = np.exp(-0.5 * ((freqs - centre[:, None]) / width[:, None]) ** 2)
    return (bump + 0.02) * freqs ** 2 / (freqs ** 2 + 1000.0 ** 2)  # frication has little energy below 1 kHz


def _frames(signal: np.ndarray, n_frames: int) -> np.ndarray:
    """Hann-windowed frames [F, FFT_SIZE] of `signal`, frame f starting at f*FRAME_HOP - FRAME_HOP."""
    padded = np.zeros((n_frames + 2) * FRAME_HOP)
    padded[FRAME_HOP:FRAME_HOP + len(signal)] = signal[: len(padded) - FRAME_HOP]
    idx = np.arange(n_frames)[:, None] * FRAME_HOP + np.arange(FRAME_LEN)[None, :]
    window = np.hanning(FRAME_LEN + 1)[:-1]  # periodic Hann: shifted copies at half overlap sum to 1
    frames = np.zeros((n_frames, FFT_SIZE))
    frames[:, :FRAME_LEN] = padded[idx] * window
    return frames


def _overlap_add(frames: np.ndarray, n_samples: int) -> np.ndarray:
    """Sum filtered frames [F, FFT_SIZE] back into a signal, undoing `_frames`' one-hop lead."""
    n_frames = frames.shape[0]
    blocks_per_frame = FFT_SIZE // FRAME_HOP
    out = np.zeros((n_frames + blocks_per_frame, FRAME_HOP))
    blocks = frames.reshape(n_frames, blocks_per_frame, FRAME_HOP)
    for b in range(blocks_per_frame):
        out[b:b + n_frames] += blocks[:, b]
    return out.reshape(-1)[FRAME_HOP:FRAME_HOP + n_samples]


def synthesize_utterance(spk: Speaker, rng: np.random.Generator, n_samples: int) -> np.ndarray:
    """One utterance of `spk`, float64 [n_samples] at 16 kHz, speech RMS about TARGET_RMS."""
    n_frames = n_samples // FRAME_HOP + 2  # frames centred on 0, hop, ... past the last sample
    tracks = _plan_utterance(spk, rng, n_frames)
    formants = _smooth(tracks.formants, 7)  # ~50 ms coarticulation
    voiced_gain = _smooth(tracks.voiced_gain, 4)
    noise_gain = _smooth(tracks.noise_gain, 3)
    f0 = _pitch_track(spk, rng, tracks)

    pulses = _glottal_pulses(spk, rng, f0, n_samples)
    # aspiration noise, strongest at the glottal opening, mixed into the voiced source
    breath = spk.breathiness * rng.normal(0.0, 1.0, n_samples) * np.sqrt(np.mean(pulses ** 2))
    voiced_source = np.fft.rfft(_frames(pulses + breath, n_frames), axis=1)
    noise_source = np.fft.rfft(_frames(rng.normal(0.0, 1.0, n_samples), n_frames), axis=1)

    bandwidths = tracks.bandwidths * (1.0 + 0.3 * (spk.formant_scale - 1.0))
    voiced_filter = _resonator_envelopes(formants, bandwidths) * _voice_colour(spk)[None, :]
    noise_filter = _fricative_envelopes(tracks.fric_centre, tracks.fric_width)
    spectrum = (voiced_source * voiced_filter * voiced_gain[:, None]
                + noise_source * noise_filter * (NOISE_SCALE * noise_gain)[:, None])
    speech = _overlap_add(np.fft.irfft(spectrum, n=FFT_SIZE, axis=1), n_samples)

    active = np.abs(speech) > 0.05 * np.max(np.abs(speech)) + 1e-12
    if not active.any():  # cannot happen with the plan above; never divide by zero if it does
        active[:] = True
    speech *= TARGET_RMS / (np.sqrt(np.mean(speech[active] ** 2)) + 1e-12)
    speech += NOISE_FLOOR * rng.normal(0.0, 1.0, n_samples)
    peak = np.max(np.abs(speech))
    if peak > 0.95:
        speech *= 0.95 / peak
    return speech

