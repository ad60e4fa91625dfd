"""Separating files as inference.py does: each reference's d-vector once, mixtures read one at a time,
results (and pictures) written, the inputs that fail named and skipped."""
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reverse_voicefilter.core.audio import load_wav, save_wav
from reverse_voicefilter.core.errors import UserError
from reverse_voicefilter.separation.loading import embedder_window_seconds
from reverse_voicefilter.separation.options import DEFAULT_FACTOR, output_plan, pair_references
from reverse_voicefilter.separation.separator import load_mixture

logger = logging.getLogger(__name__)



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
        if ref.is_dir():
            dvecs[key] = UserError(f"reference {ref} is a folder: -r takes an audio file of the speaker (wav, flac, "
                                   f"...), one for all mixtures or one per mixture")
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
                   progress=True, on_written=None):
    """Separate files and write the results; returns a :class:`SeparationRun`.

    ``on_written(path)`` is called as each file is written (a long folder run shows its results as
    they come, and one stopped midway has named what it wrote).

    ``references`` pairs with ``inputs`` (see :func:`pair_references`); each distinct
    reference's d-vector is computed once. Mixtures are loaded one at a time. An input that
    cannot be read or used (or whose reference cannot) is skipped and named in ``failed``;
    the others are separated and written all the same.
    """
    from tqdm import tqdm

    hp = separator.hp
    rate = hp.audio.sample_rate
    references = pair_references(inputs, references)
    plan = output_plan(inputs, out_dir, modes, references)
    clock = time.perf_counter()
    dvecs = reference_dvecs(separator, references)
    logger.info("%d reference d-vector(s) in %.2f s", len(dvecs), time.perf_counter() - clock)
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

    def wrote(out_path):
        written.append(out_path)
        if on_written is not None:
            on_written(out_path)

    started = time.perf_counter()
    # disable=None: a bar on a terminal only
    with tqdm(total=len(plan), desc="separating", unit="file", disable=None if progress else True) as bar:
        for i, result in separator.separate_stream(items(), modes, factor, keep_spectra=plot):
            path, outputs, picture = plan[i]
            for mode, out_path in outputs.items():
                save_wav(out_path, result.wavs[mode], rate)
                wrote(out_path)
            if plot:
                save_result_picture(picture, result, path, references[i], modes, factor, hp)
                wrote(picture)
            if not bar.n:  # the first network call pays for choosing its kernels: shown apart in -v
                logger.info("first mixture written %.2f s after the start of separation", time.perf_counter() - started)
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

