"""Synthetic multi-speaker speech corpus in the LibriSpeech layout, for demos and tests.

Real LibriSpeech is gigabytes; a demo that trains a tiny separation model on a
laptop CPU needs a few hundred short utterances of voices that differ from each
other the way real voices do.  This module synthesizes them with numpy alone:

* a glottal pulse train (band-limited impulses) following a pitch contour with
  declination, accents on stressed syllables, jitter and shimmer;
* a cascade of five formant resonators whose targets move smoothly from vowel
  to vowel, nasal murmurs, fricative noise and plosive bursts, pauses between
  words and a syllable-rate amplitude envelope;
* stable per-speaker traits drawn from the speaker's seed: mean pitch, pitch
  range, vocal tract length (formant scaling), personal vowel colouring,
  speaking rate, spectral tilt, breathiness and fricative colour.

The filtering is a time-varying filter applied frame by frame in the frequency
domain (windowed excitation, FFT, multiply by the frame's spectral envelope,
inverse FFT, overlap-add), which keeps one utterance in the tens of
milliseconds.

Files land in ``ROOT/SUBSET/SPEAKER/CHAPTER/SPEAKER-CHAPTER-UTT-norm.wav``
(16 kHz, mono, PCM_16), the layout and names ``normalize-resample.sh`` gives
real LibriSpeech, so ``generator.py -d ROOT`` reads both alike.  Every file
depends only on (seed, speaker, chapter, utterance): the same seed gives
byte-identical files, in any order and with any number of workers.

Usage::

    python -m reverse_voicefilter.prepare.demo_corpus -o demo/librispeech
    python -m reverse_voicefilter.prepare.demo_corpus -o DIR --seed 1 --speakers train-clean-100=40x6 dev-clean=10x6
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from reverse_voicefilter.core.atomic import atomic_path, remove_stale_temporaries
from reverse_voicefilter.core.cli import UserErrorParser, check_writable_dir
from reverse_voicefilter.core.errors import UserError, run_cli
from reverse_voicefilter.prepare.synthetic_voice import SAMPLE_RATE, speaker_traits, synthesize_utterance

logger = logging.getLogger(__name__)

DEFAULT_SUBSETS = {"train-clean-100": (40, 6), "dev-clean": (10, 6)}
DEFAULT_DURATION = (4.0, 6.0)  # ~97% stay >= 3 s (audio_len) after the generator trims edge silence
UTTS_PER_CHAPTER = 4  # real LibriSpeech speakers read several chapters; the generator must recurse
FIRST_SPEAKER_ID = 1001
SPEAKER_ID_STRIDE = 1000  # subset k gets ids 1001 + 1000*k ...: ids never collide across subsets
FIRST_CHAPTER_ID = 100

# ----------------------------------------------------------------------------- corpus on disk


@dataclass(frozen=True)
class UtteranceJob:
    """Everything one file depends on; pickled to worker processes."""

    path: str
    seed: int
    speaker_id: int
    chapter_id: int
    utt_index: int
    duration: tuple


def render_file(job: UtteranceJob) -> float:
    """Synthesize `job` and write it atomically; returns its duration in seconds.

    Module-level so any multiprocessing start method can pickle it; its randomness comes only
    from the job's ids, so workers and reruns agree.
    """
    spk = speaker_traits(job.seed, job.speaker_id)
    rng = np.random.default_rng([job.seed, job.speaker_id, job.chapter_id, job.utt_index])
    seconds = rng.uniform(*job.duration)
    n_samples = int(round(seconds * SAMPLE_RATE))
    wav = synthesize_utterance(spk, rng, n_samples)
    pcm = np.round(np.clip(wav, -1.0, 1.0) * 32767.0).astype(np.int16)
    with atomic_path(job.path) as tmp:  # the temporary's name never ends in '-norm.wav': never taken for data
        sf.write(tmp, pcm, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return n_samples / SAMPLE_RATE


def plan_corpus(root: str | os.PathLike, subsets: dict, seed: int, duration: tuple) -> list[UtteranceJob]:
    """All files of the corpus, in a fixed order; subset k gets speaker ids from 1001 + 1000*k."""
    jobs = []
    for k, (subset, (n_speakers, n_utts)) in enumerate(subsets.items()):
        for s in range(n_speakers):
            speaker_id = FIRST_SPEAKER_ID + SPEAKER_ID_STRIDE * k + s
            for u in range(n_utts):
                chapter_id = FIRST_CHAPTER_ID + u // UTTS_PER_CHAPTER
                utt = u % UTTS_PER_CHAPTER
                name = f"{speaker_id}-{chapter_id}-{utt:04d}-norm.wav"
                path = Path(root) / subset / str(speaker_id) / str(chapter_id) / name
                jobs.append(UtteranceJob(str(path), seed, speaker_id, chapter_id, utt, tuple(duration)))
    return jobs


def _check_arguments(subsets: dict, duration: tuple) -> None:
    """Raise ValueError with a user-facing sentence for impossible corpus sizes or durations."""
    if not subsets:
        raise ValueError("no subsets requested")
    for subset, (n_speakers, n_utts) in subsets.items():
        if not re.fullmatch(r"[A-Za-z0-9._-]+", subset):
            raise ValueError(f"subset name {subset!r} must be a plain folder name")
        if not 1 <= n_speakers < SPEAKER_ID_STRIDE:
            raise ValueError(f"{subset}: speakers must be between 1 and {SPEAKER_ID_STRIDE - 1}, "
                             f"got {n_speakers}")
        if n_utts < 1:
            raise ValueError(f"{subset}: utterances per speaker must be at least 1, got {n_utts}")
    low, high = duration
    if not 1.0 <= low <= high <= 60.0:
        raise ValueError(f"duration must satisfy 1 <= min <= max <= 60 seconds, got {low}..{high}")


def make_corpus(root: str | os.PathLike, subsets: dict | None = None, seed: int = 0,
                duration: tuple = DEFAULT_DURATION, jobs: int | None = None, progress: bool = True) -> dict:
    """Write the synthetic corpus under `root`; files already there are kept, not rewritten.

    Parameters
    ----------
    root : folder that receives ``SUBSET/SPEAKER/CHAPTER/*-norm.wav``.
    subsets : {subset name: (n_speakers, n_utterances per speaker)}; default 40x6 train, 10x6 dev.
    seed : corpus seed; the same seed writes byte-identical files.
    duration : (min, max) utterance length in seconds.
    jobs : worker processes (default: all cores); 1 renders in this process.
    progress : show a tqdm bar.

    Returns
    -------
    dict with ``root``, ``files`` (total), ``written``, ``skipped``, ``seconds`` (audio written)
    and ``speakers`` ({subset: [speaker ids]}).
    """
    from tqdm import tqdm

    subsets = dict(DEFAULT_SUBSETS if subsets is None else subsets)
    _check_arguments(subsets, duration)
    all_jobs = plan_corpus(root, subsets, seed, duration)
    todo = [job for job in all_jobs if not os.path.exists(job.path)]
    for folder in sorted({Path(job.path).parent for job in todo}):  # what a killed run left there
        remove_stale_temporaries(folder)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(todo) or 1))
    logger.info("writing %d of %d files under %s with %d worker(s)", len(todo), len(all_jobs), root, jobs)
    start = time.perf_counter()
    seconds = 0.0
    with tqdm(total=len(todo), unit="file", desc="demo corpus", disable=not progress) as bar:
        if jobs == 1:
            results = map(render_file, todo)
            for s in results:
                seconds += s
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                for s in pool.map(render_file, todo, chunksize=4):
                    seconds += s
                    bar.update()
    speakers = {}
    for job in all_jobs:
        subset = Path(job.path).relative_to(root).parts[0]
        speakers.setdefault(subset, [])
        if job.speaker_id not in speakers[subset]:
            speakers[subset].append(job.speaker_id)
    summary = {"root": str(root), "files": len(all_jobs), "written": len(todo),
               "skipped": len(all_jobs) - len(todo), "seconds": seconds, "speakers": speakers,
               "elapsed": time.perf_counter() - start}
    logger.info("demo corpus: %d files written (%.0f s of audio), %d already present, in %.1f s",
                summary["written"], seconds, summary["skipped"], summary["elapsed"])
    return summary


# ----------------------------------------------------------------------------- command line


def _parse_subset(text: str) -> tuple[str, tuple[int, int]]:
    """'train-clean-100=40x6' -> ('train-clean-100', (40, 6))."""
    match = re.fullmatch(r"([^=]+)=(\d+)x(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected SUBSET=SPEAKERSxUTTERANCES (e.g. dev-clean=10x6), "
                                         f"got {text!r}")
    return match.group(1), (int(match.group(2)), int(match.group(3)))


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of ``python -m reverse_voicefilter.prepare.demo_corpus``."""
    default = " ".join(f"{k}={n}x{m}" for k, (n, m) in DEFAULT_SUBSETS.items())
    parser = UserErrorParser(
        prog="python -m reverse_voicefilter.prepare.demo_corpus",
        description="Write a synthetic multi-speaker speech corpus in the LibriSpeech layout "
                    "(ROOT/SUBSET/SPEAKER/CHAPTER/*-norm.wav, 16 kHz mono).")
    parser.add_argument("-o", "--output", required=True, help="corpus root folder")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    parser.add_argument("--speakers", nargs="+", type=_parse_subset, metavar="SUBSET=NxM",
                        help=f"N speakers with M utterances each per subset (default: {default})")
    parser.add_argument("--duration", nargs=2, type=float, metavar=("MIN", "MAX"),
                        default=list(DEFAULT_DURATION), help="utterance length in seconds (default 4 6)")
    parser.add_argument("-j", "--jobs", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


class CorpusWriteError(UserError):
    """Writing failed after the folder was found writable (a full disk): one line, exit 1."""

    exit_code = 1


def main(argv: list[str] | None = None) -> int:
    """Entry point; raises UserError for what the user can fix (printed as one line by run_cli)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    subsets = dict(args.speakers) if args.speakers else None
    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {args.jobs}")
    try:
        _check_arguments(DEFAULT_SUBSETS if subsets is None else subsets, tuple(args.duration))
    except ValueError as err:
        raise UserError(str(err)) from None
    check_writable_dir(args.output, "-o")
    try:
        summary = make_corpus(args.output, subsets, seed=args.seed, duration=tuple(args.duration),
                              jobs=args.jobs, progress=not args.quiet)
    except OSError as err:
        raise CorpusWriteError(f"cannot write the corpus under {args.output}: {err.strerror or err}") from None
    counts = ", ".join(f"{k}: {len(v)} speakers" for k, v in summary["speakers"].items())
    print(f"{summary['files']} files under {summary['root']} ({counts}); "
          f"{summary['written']} written, {summary['skipped']} already present")
    return 0


def console():
    """The command line's entry point (``python -m`` and the installed command)."""
    run_cli(main, interrupted="interrupted; rerun the same command to finish (written files are kept)")


if __name__ == "__main__":
    console()
