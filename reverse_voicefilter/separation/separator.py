"""Separation with a trained VoiceFilter: model loading, mask modes, batches, long inputs.

What the original ``inference.py`` did for one mixture, as a library::

    dvec = embedder(get_mel(reference))
    mag, phase = wav2spec(mixed)                 # [T, F] each
    mask = model(mag[None], dvec[None])[0]       # [T, F] in [0, 1]
    est = mag * mask                             # or an inverse mode below
    wav = spec2wav(est, phase)

The three mask modes act in the normalized log-magnitude domain (SPEC §4):

* ``org``      est = mag * mask                       (keep the reference speaker)
* ``inv_div``  est = factor * mag / max(mask, eps)    (remove the reference speaker)
* ``inv_sub``  est = mag * (1 - mask) / factor        (remove the reference speaker)

``spec2wav`` clips est to [0, 1] before the inverse STFT, as the original did.
The ``eps`` floor of ``inv_div`` (:data:`INV_DIV_EPS`) only guards against a
division by a mask of (nearly) zero: any mask below it gives est = 1 (the
clip's ceiling) already for every bin whose magnitude exceeds eps / factor,
so the floor changes nothing the original could output in practice.

Beyond the original: spectrograms and the inverse STFT run batched on the
model's device (``Audio.wav2spec_torch``/``spec2wav_torch``, parity with the
original's numpy path well above 40 dB SNR), same-length mixtures go through
the network together, and long recordings are processed in chunks of frames
with context on both sides and a crossfade, so memory stays bounded.
"""
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from reverse_voicefilter.core.audio import Audio, load_wav, save_wav
from reverse_voicefilter.core.checkpoint import load_checkpoint, load_model_weights
from reverse_voicefilter.core.errors import UserError
from reverse_voicefilter.core.hparams import HParam, config_changes
from reverse_voicefilter.core.precision import autocast, check_precision
from reverse_voicefilter.model.embedder import RESEMBLYZER, ResemblyzerEncoder, load_embedder
from reverse_voicefilter.model.model import VoiceFilter
from reverse_voicefilter.separation.options import (  # noqa: F401 (re-exported: the library's one namespace)
    ALL_MODES,
    BATCH_SIZE,
    CHUNK_SECONDS,
    DEFAULT_FACTOR,
    INV_DIV_EPS,
    MASK_MODES,
    OVERLAP_SECONDS,
    add_model_arguments,
    expand_inputs,
    non_negative_float,
    non_negative_int,
    output_plan,
    pair_references,
    parse_modes,
    positive_float,
    positive_int,
    result_names,
)

logger = logging.getLogger(__name__)

# Config sections a checkpoint's hp_str must agree with; audio.preemphasis and
# audio.power play no part at inference (power only shapes a training loss).
CHECKED_SECTIONS = ("audio", "model", "embedder")
IGNORED_KEYS = {"audio.preemphasis", "audio.power"}

def apply_mask(mag, mask, mode, factor=DEFAULT_FACTOR, eps=INV_DIV_EPS):
    """Estimated normalized magnitude from the mixture's ``mag`` and the ``mask`` (same shape)."""
    if mode == "org":
        return mag * mask
    if mode == "inv_div":
        return factor * mag / torch.clamp(mask, min=eps)
    if mode == "inv_sub":
        return mag * (1.0 - mask) / factor
    raise ValueError(f"unknown mask mode {mode!r}")


# ---- loading -----------------------------------------------------------------------------------
@dataclass
class ModelSource:
    """Where a loaded model came from: the checkpoint, its step, its stored config (``hp_str``),
    and which config the run uses (``config``: the -c path, or "checkpoint")."""

    checkpoint: str
    step: object
    hp_str: str
    config: str


def config_mismatches(hp_str, hp):
    """Keys of the audio/model/embedder sections where a checkpoint's ``hp_str`` and ``hp``
    differ, as ``['model.lstm_dim: 400 in the checkpoint, 64 in -c', ...]``; [] when they agree
    or the checkpoint holds no readable config."""
    if not hp_str:
        return []
    try:
        changes = config_changes(hp_str, hp, CHECKED_SECTIONS)
    except UserError as err:
        logger.debug("cannot read the checkpoint's hp_str: %s", err)
        return []
    return [f"{k}: {old!r} in the checkpoint, {new!r} in -c" for k, old, new in changes if k not in IGNORED_KEYS]


# First bytes of files people pass by mistake where a checkpoint goes: torch.load's own
# message for them is useless (a WAV gives "pop from empty list").
_FILE_SIGNATURES = ((b"RIFF", "a WAV audio file"), (b"fLaC", "a FLAC audio file"), (b"OggS", "an Ogg audio file"),
                    (b"ID3", "an MP3 audio file"), (b"\x89PNG", "a PNG picture"), (b"%PDF", "a PDF document"),
                    (b"\x1f\x8b", "a gzip archive"))


def describe_non_checkpoint(path):
    """What a file is when it is plainly not a PyTorch file (audio, picture, text...), else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head:
        return "an empty file"
    if head.startswith((b"PK\x03\x04", b"\x80")):  # torch's zip format, or a legacy pickle
        return None
    for magic, what in _FILE_SIGNATURES:
        if head.startswith(magic):
            return what
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if all(c.isprintable() or c.isspace() for c in text):
        looks_yaml = any(line.rstrip().endswith(":") for line in text.splitlines())
        return "a text file (a YAML config? give that with -c)" if looks_yaml else "a text file"
    return None


def read_checkpoint(path, device="cpu"):
    """:func:`load_checkpoint`, with a file that is plainly no checkpoint named for what it is,
    and an embedder's weights given in the checkpoint's place recognised as such."""
    path = Path(path)
    what = describe_non_checkpoint(path) if path.is_file() else None
    if what:
        raise UserError(f"--checkpoint_path {path} is {what}, not a VoiceFilter checkpoint "
                        f"(chkpt_STEP.pt or best.pt from trainer.py)")
    state = load_checkpoint(path, map_location=device, mmap=True)  # the optimizer's state stays unread
    keys = set(state["model"])
    if any(k.startswith("proj.") for k in keys) and all(k.startswith(("lstm.", "proj.")) for k in keys):
        raise UserError(f"--checkpoint_path {path} holds a speaker embedder's weights, not a VoiceFilter "
                        f"checkpoint: give it with -e, and the trainer's checkpoint with --checkpoint_path")
    return state


def run_config(config_path, state, checkpoint_path):
    """The run's hyper-parameters: ``-c`` when given, else the config the checkpoint stores."""
    if config_path:
        return HParam(config_path)
    hp_str = state.get("hp_str")
    if not hp_str:
        raise UserError(f"checkpoint {checkpoint_path} stores no config (hp_str): pass the config it was "
                        f"trained with as -c")
    try:
        return HParam.from_string(hp_str)
    except UserError as err:
        raise UserError(f"cannot read the config stored in checkpoint {checkpoint_path} ({err}): pass the "
                        f"config it was trained with as -c") from None


def load_model(hp, checkpoint_path, device, channels_last=False, state=None):
    """A VoiceFilter on ``device`` with the checkpoint's weights, ready for inference
    (:meth:`VoiceFilter.for_inference`: batch norms folded; channels_last when asked for or
    when the config sets ``train.channels_last``). ``state``: the checkpoint, already read.

    A checkpoint that does not fit the config is a :class:`UserError` asking for
    the training config; a config that fits but differs from the checkpoint's
    own (hop length, embedder...) is logged as a warning.
    """
    if state is None:
        state = read_checkpoint(checkpoint_path, device)
    differences = config_mismatches(state.get("hp_str"), hp)
    with torch.device("meta"):  # no random initialisation of weights the checkpoint replaces
        model = VoiceFilter(hp)
    try:
        load_model_weights(model, state["model"], checkpoint_path, assign=True)
    except UserError as err:
        if differences:
            raise UserError(f"{err}; its stored config differs from -c in {'; '.join(differences[:4])}") from None
        raise
    if differences:
        logger.warning("checkpoint %s was trained with another config than -c (%s): pass the training "
                       "config for faithful results", checkpoint_path, "; ".join(differences))
    # float(): the checkpoint's tensors are taken as they are (assign), so fp16/bf16 ones become fp32 here
    return model.float().to(device).for_inference(channels_last)


def min_samples(hp):
    """The shortest mixture the STFT's reflect padding accepts."""
    return hp.audio.n_fft // 2 + 1


def load_mixture(path, hp):
    wav = load_wav(path, hp.audio.sample_rate)
    if wav.size < min_samples(hp):
        raise UserError(f"audio file {path} is too short ({wav.size} samples at {hp.audio.sample_rate} Hz; "
                        f"at least {min_samples(hp)} needed)")
    return wav


# ---- the separator -----------------------------------------------------------------------------
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
    """

    def __init__(self, hp, model, embedder, device, precision="fp32", chunk_seconds=CHUNK_SECONDS,
                 overlap_seconds=OVERLAP_SECONDS, batch_size=BATCH_SIZE, eps=INV_DIV_EPS):
        precision = check_precision(precision, device, "--precision")  # fp32 where a CPU cannot run bf16
        self.hp, self.model, self.embedder, self.device = hp, model, embedder, device
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


def load_separator(hp, checkpoint_path, embedder_spec, device, channels_last=False, config_path=None,
                   **options):
    """Model and embedder from files -> :class:`Separator` (``options`` go to its constructor).

    ``hp`` None: the config is ``config_path`` (-c) when given, else the one stored in the
    checkpoint. ``separator.source`` (:class:`ModelSource`) says which.
    """
    started = time.perf_counter()
    state = read_checkpoint(checkpoint_path, device)
    if hp is not None or config_path:
        hp = hp if hp is not None else run_config(config_path, state, checkpoint_path)
        config = str(config_path or getattr(hp, "path", None) or "given")
    else:
        hp, config = run_config(None, state, checkpoint_path), "checkpoint"
    model = load_model(hp, checkpoint_path, device, channels_last, state=state)
    embedder = load_embedder(embedder_spec, hp, device)
    separator = Separator(hp, model, embedder, device, **options)
    separator.source = ModelSource(str(checkpoint_path), state.get("step"), state.get("hp_str") or "", config)
    logger.info("model: %s (step %s, config from %s), embedder %s, on %s, %s; loaded in %.1f s", checkpoint_path,
                state.get("step", "?"), "the checkpoint" if config == "checkpoint" else config, embedder.name,
                device, separator.precision, time.perf_counter() - started)
    return separator


def embedder_window_seconds(embedder, hp):
    """The span one d-vector window covers: a reference shorter than it gives a poor d-vector."""
    if embedder.kind == RESEMBLYZER:
        return ResemblyzerEncoder.PARTIAL_FRAMES * ResemblyzerEncoder.HOP / ResemblyzerEncoder.SAMPLE_RATE
    return hp.embedder.window * hp.audio.hop_length / hp.audio.sample_rate


def reference_dvecs(separator, references):
    """``{resolved path: d-vector [E] or the UserError that prevents one}``, each reference once;
    a reference shorter than the embedder's window is a warning."""
    hp = separator.hp
    rate = hp.audio.sample_rate
    window = embedder_window_seconds(separator.embedder, hp)
    dvecs = {}
    for ref in references:
        key = str(ref.resolve())
        if key in dvecs:
            continue
        try:
            wav = load_wav(ref, rate)
            if wav.size < window * rate:
                logger.warning("reference %s is %.2f s long, shorter than the embedder's %.2f s window: its "
                               "d-vector may not represent the speaker well (use a few seconds of speech)",
                               ref, wav.size / rate, window)
            dvecs[key] = separator.reference_dvec(wav)
        except UserError as err:
            dvecs[key] = err
    return dvecs


@dataclass
class SeparationRun:
    """What :func:`separate_files` did: the written paths, and ``{input: reason}`` of the inputs
    that could not be separated."""

    written: list
    failed: dict


def separate_files(separator, inputs, references, out_dir, modes, factor=DEFAULT_FACTOR, plot=False,
                   progress=True):
    """Separate files and write the results; returns a :class:`SeparationRun`.

    ``references`` pairs with ``inputs`` (see :func:`pair_references`); each distinct
    reference's d-vector is computed once. Mixtures are loaded one at a time. An input that
    cannot be read or used (or whose reference cannot) is skipped and named in ``failed``;
    the others are separated and written all the same.
    """
    from tqdm import tqdm

    hp = separator.hp
    rate = hp.audio.sample_rate
    plan = output_plan(inputs, out_dir, modes)
    references = pair_references(inputs, references)
    dvecs = reference_dvecs(separator, references)
    failed = {}

    def items():
        for i, (path, _, _) in enumerate(plan):
            dvec = dvecs[str(references[i].resolve())]
            try:
                if isinstance(dvec, UserError):
                    raise dvec
                wav = load_mixture(path, hp)
            except UserError as err:
                failed[path] = str(err)
                logger.info("skipping %s: %s", path, err)
                continue
            logger.info("separating %s (%.1f s)", path, wav.size / rate)
            yield i, wav, dvec

    written = []
    started = time.perf_counter()
    # disable=None: a bar on a terminal only
    with tqdm(total=len(plan), desc="separating", unit="file", disable=None if progress else True) as bar:
        for i, result in separator.separate_stream(items(), modes, factor, keep_spectra=plot):
            path, outputs, picture = plan[i]
            for mode, out_path in outputs.items():
                save_wav(out_path, result.wavs[mode], rate)
                written.append(out_path)
            if plot:
                save_result_picture(picture, result, path, references[i], modes, factor, hp)
                written.append(picture)
            bar.update(1)
    done = len(plan) - len(failed)
    logger.info("separated %d of %d mixture(s) in %.1f s", done, len(plan), time.perf_counter() - started)
    return SeparationRun(written=written, failed=failed)


def save_result_picture(picture, result, mixture, reference, modes, factor, hp):
    """``result.png``: spectrograms of the mixture and of each output on one scale, and what
    each mode multiplied the mixture by (the mask for org; the gain actually applied for the
    inverse modes, after the clip to the spectrogram's ceiling)."""
    from reverse_voicefilter.core.plotting import save_spectrograms

    mag = result.spectra["mixture"]
    panels, gains = {"mixture": mag}, set()
    for mode in modes:
        est = result.spectra[f"result ({mode})"]
        if mode == "org":
            name = "mask (org: output = mixture x mask)"
            panels[name] = result.spectra["mask"]
        else:
            name = f"gain applied ({mode}, factor {factor:g}; after the clip to the ceiling)"
            panels[name] = applied_gain(mag, est)
        gains.add(name)
        panels[f"output ({mode})"] = est
    title = f"mixture {Path(mixture).name}, reference {Path(reference).name}"
    if result.spectra_note:
        title += f" ({result.spectra_note})"
    save_spectrograms(picture, panels, gain_panels=gains, title=title,
                      hop_seconds=hp.audio.hop_length / hp.audio.sample_rate, max_hz=hp.audio.sample_rate / 2)


def applied_gain(mag, est):
    """est / mag where the mixture has energy: the per-bin multiplier a mode really applied."""
    mag = np.asarray(mag)
    return np.where(mag > 1e-6, np.asarray(est) / np.maximum(mag, 1e-6), 0.0).astype(np.float32)
