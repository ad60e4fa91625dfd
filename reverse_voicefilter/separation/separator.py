"""Separation with a trained VoiceFilter: the separator, its batches and long inputs.

What the original ``inference.py`` did for one mixture, as a library::

    dvec = embedder(get_mel(reference))
    mag, phase = wav2spec(mixed)                 # [T, F] each
    mask = model(mag[None], dvec[None])[0]       # [T, F] in [0, 1]
    est = mag * mask                             # or an inverse mode below
    wav = spec2wav(est, phase)

The mask modes are :mod:`~reverse_voicefilter.separation.masks`' (the original's three);
loading a checkpoint is :mod:`~reverse_voicefilter.separation.loading`'s, separating files
:mod:`~reverse_voicefilter.separation.files`'.

Beyond the original: spectrograms and the inverse STFT run batched on the
model's device (``Audio.wav2spec_torch``/``spec2wav_torch``, parity with the
original's numpy path well above 40 dB SNR), same-length mixtures go through
the network together, and long recordings are processed in chunks of frames
with context on both sides and a crossfade, so memory stays bounded.
"""
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from reverse_voicefilter.core.audio import Audio, load_wav
from reverse_voicefilter.core.errors import UserError
from reverse_voicefilter.core.precision import autocast, check_precision
from reverse_voicefilter.separation.masks import apply_mask
from reverse_voicefilter.separation.options import (
    BATCH_SIZE,
    CHUNK_SECONDS,
    DEFAULT_FACTOR,
    INV_DIV_EPS,
    OVERLAP_SECONDS,
)

logger = logging.getLogger(__name__)


def min_samples(hp):
    """The shortest mixture the STFT's reflect padding accepts."""
    return hp.audio.n_fft // 2 + 1


def load_mixture(path, hp):
    wav = load_wav(path, hp.audio.sample_rate)
    if wav.size < min_samples(hp):
        raise UserError(f"audio file {path} is too short ({wav.size} samples at {hp.audio.sample_rate} Hz; "
                        f"at least {min_samples(hp)} needed)")
    return wav



@dataclass
class Separation:
    """One mixture's outputs: ``wavs[mode]`` [N] float32, and spectra [T, F] for pictures
    (of the first chunk only for a chunked input; ``spectra_note`` says so). With ``keep_mask``:
    the whole input's normalized magnitude ``mag`` and ``mask`` [T, F] float32 (chunks joined)."""

    wavs: dict
    spectra: dict = field(default_factory=dict)
    spectra_note: str = ""
    mag: np.ndarray | None = None
    mask: np.ndarray | None = None


class Separator:
    """A loaded model + embedder on one device: reference d-vectors and separated waveforms.

    Parameters
    ----------
    chunk_seconds : inputs longer than chunk + 2 * overlap are processed in chunks of this
        length (0: never chunk).
    overlap_seconds : context frames on each side of a chunk; the chunks' outputs are
        crossfaded over up to this length around each boundary.
    batch_size : most mixtures per network call (same-length ones only).
    source : where the model came from (:class:`~reverse_voicefilter.separation.loading.ModelSource`),
        reported by evaluate.py; None for a model built in memory.
    """

    def __init__(self, hp, model, embedder, device, precision="fp32", chunk_seconds=CHUNK_SECONDS,
                 overlap_seconds=OVERLAP_SECONDS, batch_size=BATCH_SIZE, eps=INV_DIV_EPS, source=None):
        precision = check_precision(precision, device, "--precision")  # fp32 where a CPU cannot run bf16
        self.hp, self.model, self.embedder, self.device = hp, model, embedder, device
        self.source = source  # where the model came from (loading.ModelSource), when loaded from a file
        self.audio = Audio(hp)
        self.precision, self.eps, self.batch_size = precision, eps, max(1, int(batch_size))
        frames_per_second = hp.audio.sample_rate / hp.audio.hop_length
        self.context_frames = max(0, round(overlap_seconds * frames_per_second))
        self.chunk_frames = max(0, round(chunk_seconds * frames_per_second))
        if self.chunk_frames:
            # the crossfade plus the inverse STFT's window must fit inside the context
            least = 2 * math.ceil(hp.audio.win_length / hp.audio.hop_length) + 2
            if self.context_frames < least:
                raise UserError(f"--overlap_seconds must be at least {least / frames_per_second:.2f} s "
                                f"when chunking")
            if self.chunk_frames < self.context_frames:
                raise UserError("--chunk_seconds must be at least --overlap_seconds (or 0 to never chunk)")
        # frames of a whole (unchunked) network call: the memory bound of every call
        self.max_frames = self.chunk_frames + 2 * self.context_frames if self.chunk_frames else 0

    # -- d-vectors and masks -------------------------------------------------------------------
    def reference_dvec(self, wav):
        """Reference waveform (numpy [N]) -> d-vector [E] on the device."""
        return self.embedder.embed(wav).float()

    @torch.inference_mode()
    def mask(self, mag, dvec):
        """mag [B, T, F], dvec [B, E] on the device -> mask [B, T, F] float32."""
        with autocast(self.device, self.precision):  # the network only: the STFTs stay float32
            mask = self.model(mag, dvec)
        return mask.float()

    @torch.inference_mode()
    def separate_batch(self, mixed, dvec, modes, factor=DEFAULT_FACTOR, keep_spectra=False):
        """Same-length mixtures [B, N] and d-vectors [B, E] (on the device) -> ``{mode: [B, N]}``
        waveforms on the device, and (``keep_spectra``) ``{name: [B, T, F]}`` spectra."""
        mag, phase = self.audio.wav2spec_torch(mixed)  # [B, T, F] each
        mask = self.mask(mag, dvec)
        wavs, spectra = {}, {}
        for mode in modes:
            est = apply_mask(mag, mask, mode, factor, self.eps)
            wavs[mode] = self.audio.spec2wav_torch(est, phase, length=mixed.size(-1))
            if keep_spectra:
                spectra[f"result ({mode})"] = est.clamp(0.0, 1.0)
        if keep_spectra:
            spectra = {"mixture": mag, "mask": mask, **spectra}
        return wavs, spectra

    def is_long(self, n_samples):
        frames = 1 + n_samples // self.hp.audio.hop_length
        return bool(self.max_frames) and frames > self.max_frames

    def batch_limit(self, n_samples):
        """How many mixtures of this length go through the network together."""
        if not self.max_frames:
            return self.batch_size
        frames = 1 + n_samples // self.hp.audio.hop_length
        return max(1, min(self.batch_size, self.max_frames // frames))

    def separate(self, wav, dvec, modes, factor=DEFAULT_FACTOR, keep_spectra=False):
        """One mixture (numpy [N]) and its d-vector [E] -> :class:`Separation` (chunked when long)."""
        ((_, result),) = self.separate_stream([(0, wav, dvec)], modes, factor, keep_spectra)
        return result

    def separate_stream(self, items, modes, factor=DEFAULT_FACTOR, keep_spectra=False, keep_mask=False):
        """``(key, wav numpy [N], dvec [E])`` items -> ``(key, Separation)`` in input order.

        Consecutive mixtures of the same length are batched (never padded: with the BLSTM
        and the dilated convolutions, padding would change the real frames' masks); long
        ones are chunked. ``keep_mask``: each :class:`Separation` holds the whole ``mag``
        and ``mask``.
        """
        pending = []
        for key, wav, dvec in items:
            if pending and (pending[0][1].size != wav.size or len(pending) >= self.batch_limit(wav.size)):
                yield from self._run_batch(pending, modes, factor, keep_spectra, keep_mask)
                pending = []
            if self.is_long(wav.size):
                yield key, self._separate_long(wav, dvec, modes, factor, keep_spectra, keep_mask)
            else:
                pending.append((key, wav, dvec))
        if pending:
            yield from self._run_batch(pending, modes, factor, keep_spectra, keep_mask)

    def _run_batch(self, pending, modes, factor, keep_spectra, keep_mask=False):
        mixed = torch.from_numpy(np.stack([w for _, w, _ in pending])).to(self.device)  # [B, N]
        dvec = torch.stack([d.to(self.device) for _, _, d in pending]).float()  # [B, E]
        wavs, spectra = self.separate_batch(mixed, dvec, modes, factor, keep_spectra or keep_mask)
        wavs = {m: w.float().cpu().numpy() for m, w in wavs.items()}
        spectra = {k: s.float().cpu().numpy() for k, s in spectra.items()}
        for i, (key, _, _) in enumerate(pending):
            whole = {"mag": spectra["mixture"][i], "mask": spectra["mask"][i]} if keep_mask else {}
            yield key, Separation(wavs={m: w[i] for m, w in wavs.items()},
                                  spectra={k: s[i] for k, s in spectra.items()} if keep_spectra else {}, **whole)

    @torch.inference_mode()
    def _separate_long(self, wav, dvec, modes, factor, keep_spectra, keep_mask=False):
        """Chunked separation of one long mixture, in bounded memory.

        The frames of chunk k are [c0, c1); the network sees [a, b) = c0 - X .. c1 + X (X
        context frames). Its STFT is taken on the waveform segment that makes those frames
        equal to the whole-file STFT's (a few frames of margin beyond [a, b), dropped, so
        the reflect padding only acts at the file's own ends), and its inverse STFT gives the
        waveform from sample a * hop on. Chunk k contributes samples
        [c0 * hop - W/2, c1 * hop + W/2) with linear ramps of W samples at inner
        boundaries; the ramps of neighbours sum to one.
        """
        a_hp = self.hp.audio
        hop, n = a_hp.hop_length, wav.size
        total = 1 + n // hop
        n_chunks = math.ceil(total / self.chunk_frames)
        bounds = [round(k * total / n_chunks) for k in range(n_chunks + 1)]
        context = self.context_frames
        margin = math.ceil((a_hp.n_fft // 2) / hop)  # frames whose STFT window reaches the segment edge
        shortest = min(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
        fade = min(context * hop - 2 * a_hp.win_length, shortest * hop) // 2 * 2  # W, even
        ramp = ((np.arange(fade) + 0.5) / fade).astype(np.float32)
        wav_t = torch.from_numpy(wav)
        dvec = dvec.to(self.device).float()[None]
        outputs = {m: np.zeros(n, dtype=np.float32) for m in modes}
        spectra, note, core = {}, "", []  # core: each chunk's own frames [c0, c1) of (mag, mask)
        for k in range(n_chunks):
            c0, c1 = bounds[k], bounds[k + 1]
            a, b = max(0, c0 - context), min(total, c1 + context)
            fa, fb = max(0, a - margin), min(total, b + margin)
            s0, s1 = fa * hop, (n if fb == total else (fb - 1) * hop + 1)
            mag, phase = self.audio.wav2spec_torch(wav_t[s0:s1].to(self.device)[None])
            mag, phase = mag[:, a - fa:b - fa], phase[:, a - fa:b - fa]  # [1, b - a, F]
            mask = self.mask(mag, dvec)
            if keep_mask:
                core.append((mag[0, c0 - a:c1 - a].float().cpu().numpy(), mask[0, c0 - a:c1 - a].cpu().numpy()))
            length = (n - a * hop) if b == total else (b - a - 1) * hop
            lo = 0 if k == 0 else c0 * hop - fade // 2
            hi = n if k == n_chunks - 1 else min(n, c1 * hop + fade // 2)
            weight = np.ones(hi - lo, dtype=np.float32)
            if k > 0:
                weight[:fade] = ramp
            if k < n_chunks - 1:
                weight[-fade:] = 1.0 - ramp
            for mode in modes:
                est = apply_mask(mag, mask, mode, factor, self.eps)
                piece = self.audio.spec2wav_torch(est, phase, length=length)[0].float().cpu().numpy()
                outputs[mode][lo:hi] += weight * piece[lo - a * hop:hi - a * hop]
                if keep_spectra and k == 0:
                    spectra[f"result ({mode})"] = est[0, :c1 - a].clamp(0.0, 1.0).float().cpu().numpy()
            if keep_spectra and k == 0:
                spectra = {"mixture": mag[0, :c1].float().cpu().numpy(),
                           "mask": mask[0, :c1].float().cpu().numpy(), **spectra}
                note = f"first {c1 * hop / a_hp.sample_rate:.0f} s"
        whole = {"mag": np.concatenate([m for m, _ in core]), "mask": np.concatenate([k for _, k in core])} \
            if keep_mask else {}
        return Separation(wavs=outputs, spectra=spectra, spectra_note=note, **whole)

