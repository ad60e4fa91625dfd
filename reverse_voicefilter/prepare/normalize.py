"""Loudness-normalize and resample every .flac below a folder to 16 kHz mono ``*-norm.wav``.

The one implementation: ``utils/normalize-resample.sh`` only finds a python
and this module and runs it::

    python -m reverse_voicefilter.prepare.normalize ROOT [-j JOBS] [-v] [-q]

Each ``NAME.flac`` gets ``NAME-norm.wav`` next to it, made by
``ffmpeg-normalize NAME.flac -ar 16000 -ac 1`` (EBU R128 loudness
normalization at its defaults, as the original).  The output is written under
a reverse_voicefilter.core.atomic temporary name and renamed when complete; files whose output
exists and is a complete WAV (judged from its header) are skipped, an incomplete
one (empty, cut short, unreadable: left by another tool or an older version) is
done again; failures are listed at the end and make the exit status 1, as does a
folder without any .flac file.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf

from reverse_voicefilter.core.atomic import atomic_path, remove_stale_temporaries
from reverse_voicefilter.core.cli import UserErrorParser
from reverse_voicefilter.core.errors import UserError, run_cli

logger = logging.getLogger(__name__)

SUFFIX = "-norm.wav"
LEGACY_PARTIAL_SUFFIX = "-norm.partial.wav"  # what earlier versions left behind when killed
SAMPLE_RATE = 16000
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
MAX_RIFF_CHUNKS = 64  # chunks before "data" in a header; ffmpeg writes fmt and LIST


def output_path(flac: Path) -> Path:
    """``a/b.flac`` -> ``a/b-norm.wav``."""
    return flac.with_name(flac.stem + SUFFIX)


def find_flacs(root: str | os.PathLike) -> list[Path]:
    """Every .flac below `root`, sorted."""
    return sorted(p for p in Path(root).rglob("*.flac") if p.is_file())


def incomplete_reason(wav: Path) -> str | None:
    """Why `wav` is not a complete WAV file, or None when it is; from its header only (a few reads).

    soundfile must open it and count frames > 0, and the data size its RIFF header declares must
    be in the file and hold exactly those frames: libsndfile quietly shortens the frame count of
    a file cut short to what is there, so its count alone would pass a half-copied file.
    """
    try:
        frames = sf.info(str(wav)).frames
    except (RuntimeError, OSError) as err:  # sf.LibsndfileError is a RuntimeError
        return f"soundfile cannot open it ({' '.join(str(err).split())})"
    if frames <= 0:
        return "it holds no audio frames"
    data = _riff_data_chunk(wav)
    if data is None:
        return "no RIFF WAVE header with fmt and data chunks"
    start, size, block_align = data
    missing = start + size - os.path.getsize(wav)
    if missing > 0:
        return f"its header declares {size} bytes of audio, {missing} more than the file holds"
    if size // block_align != frames:
        return f"its header declares {size // block_align} frames, soundfile reads {frames}"
    return None


def _riff_data_chunk(wav: Path) -> tuple[int, int, int] | None:
    """(offset, declared size, block align) of the data chunk of a RIFF WAVE file; None if absent."""
    block_align = 0
    with open(wav, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:] != b"WAVE":
            return None
        for _ in range(MAX_RIFF_CHUNKS):
            header = f.read(8)
            if len(header) < 8:
                return None
            chunk, size = header[:4], int.from_bytes(header[4:], "little")
            if chunk == b"data":
                return (f.tell(), size, block_align) if block_align else None
            if chunk == b"fmt ":
                body = f.read(16)
                if len(body) < 16:
                    return None
                block_align = int.from_bytes(body[12:14], "little")
                size -= len(body)
            f.seek(size + (size & 1), os.SEEK_CUR)  # chunks are padded to an even size
    return None


def ffmpeg_normalize_command() -> list[str]:
    """How to run ffmpeg-normalize: the one on PATH (an activated venv's), else this interpreter's module."""
    exe = shutil.which("ffmpeg-normalize")
    if exe:
        return [exe]
    if importlib.util.find_spec("ffmpeg_normalize") is not None:
        return [sys.executable, "-m", "ffmpeg_normalize"]
    raise UserError("ffmpeg-normalize not found: pip install ffmpeg-normalize")


def ffmpeg_environment(env: dict | None = None) -> dict:
    """Environment for ffmpeg-normalize; FFMPEG_PATH is imageio-ffmpeg's binary if PATH lacks ffmpeg."""
    env = dict(os.environ if env is None else env)
    if env.get("FFMPEG_PATH") or shutil.which("ffmpeg", path=env.get("PATH")):
        return env
    try:
        import imageio_ffmpeg

        env["FFMPEG_PATH"] = imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as err:
        raise UserError("ffmpeg not found: install ffmpeg or pip install imageio-ffmpeg") from err
    return env


def normalize_file(flac: Path, command: list[str], env: dict) -> str | None:
    """Normalize one file; returns None on success, else a one-line reason."""
    try:
        with atomic_path(output_path(flac)) as tmp:  # ends in .wav: ffmpeg-normalize picks the format by it
            args = [*command, str(flac), "-ar", str(SAMPLE_RATE), "-ac", "1", "-f", "-o", tmp]
            result = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
            if result.returncode == 0 and os.path.getsize(tmp) > 0:
                return None
            message = _ANSI.sub("", (result.stderr or result.stdout or "").strip())
            raise _Failed(" ".join(message.split())[:300] or f"ffmpeg-normalize exited with {result.returncode}")
    except _Failed as failure:
        return str(failure)
    except OSError as err:
        return f"cannot run ffmpeg-normalize: {err}"


class _Failed(Exception):
    """Leaves atomic_path without renaming the temporary into place."""


@dataclass
class NormalizeSummary:
    """What `normalize_tree` did."""

    normalized: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)  # flac -> reason


def normalize_tree(root: str | os.PathLike, jobs: int | None = None, progress: bool = True,
                   verbose: bool = False) -> NormalizeSummary:
    """Normalize every .flac below `root` with `jobs` parallel ffmpeg-normalize processes.

    Threads suffice: each job waits on a subprocess.  Returns only when all jobs are done;
    Ctrl-C cancels the files not yet started.  An empty summary means no .flac was found.
    """
    if not Path(root).is_dir():
        raise UserError(f"no such folder: {root}")
    jobs = (os.cpu_count() or 1) if jobs is None else jobs
    if jobs < 1:
        raise UserError(f"-j must be at least 1 (the default is one job per core), got {jobs}")
    summary = NormalizeSummary()
    todo, redo = [], []
    for flac in find_flacs(root):
        out = output_path(flac)
        if not out.exists():
            todo.append(flac)
        elif (reason := incomplete_reason(out)) is None:
            summary.skipped.append(flac)
        else:
            todo.append(flac)
            redo.append((out, reason))
    if not todo and not summary.skipped:
        return summary
    if redo:  # one line, not one per file: a broken earlier run may have left thousands
        logger.warning("normalize: %d existing %s file(s) are incomplete and will be done again (%s: %s)",
                       len(redo), SUFFIX, *redo[0])
        if verbose:
            for out, reason in redo[1:]:
                logger.info("incomplete: %s: %s", out, reason)
    logger.info("normalize: %d to do, %d already done, %d parallel jobs", len(todo), len(summary.skipped), jobs)
    if todo:
        for folder in sorted({flac.parent for flac in todo}):  # what a killed run left there
            remove_stale_temporaries(folder, legacy_suffixes=(LEGACY_PARTIAL_SUFFIX,))
        _run_jobs(todo, jobs, summary, progress, verbose)
    logger.info("normalize: %d normalized, %d skipped, %d failed",
                len(summary.normalized), len(summary.skipped), len(summary.failed))
    return summary


def _run_jobs(todo: list[Path], jobs: int, summary: NormalizeSummary, progress: bool, verbose: bool) -> None:
    """Normalize `todo` in a pool of `jobs` threads, recording each result in `summary`."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    command, env = ffmpeg_normalize_command(), ffmpeg_environment()
    with ThreadPoolExecutor(max_workers=jobs) as pool, logging_redirect_tqdm(), \
            tqdm(total=len(todo), unit="file", desc="normalize", disable=not progress) as bar:
        futures = {pool.submit(normalize_file, flac, command, env): flac for flac in todo}
        try:
            for future in as_completed(futures):
                flac, error = futures[future], future.result()
                if error is None:
                    summary.normalized.append(flac)
                    if verbose:
                        logger.info("done: %s", output_path(flac))
                else:
                    summary.failed[flac] = error
                    logger.error("failed: %s: %s", flac, error)
                bar.update()
        except KeyboardInterrupt:
            pool.shutdown(wait=True, cancel_futures=True)  # else the queued files would still all run
            raise
    summary.normalized.sort()
    summary.failed = dict(sorted(summary.failed.items()))


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of ``python -m reverse_voicefilter.prepare.normalize``."""
    parser = UserErrorParser(
        prog="python -m reverse_voicefilter.prepare.normalize",
        description="Write NAME-norm.wav (EBU R128 loudness-normalized, 16 kHz mono) next to every "
                    "NAME.flac below ROOT with ffmpeg-normalize.")
    parser.add_argument("root", help="folder to search for .flac files (e.g. the LibriSpeech root)")
    parser.add_argument("-j", "--jobs", type=int, default=None,
                        help="parallel jobs, at least 1 (default: one per core)")
    parser.add_argument("-v", "--verbose", action="store_true", help="name each file as it is finished")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 1 when some files failed."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    summary = normalize_tree(args.root, args.jobs, progress=not args.quiet, verbose=args.verbose)
    if not (summary.normalized or summary.skipped or summary.failed):
        print(f"warning: no .flac file below {args.root} (looked for *.flac in all its subfolders; "
              f"is it the LibriSpeech root?)", file=sys.stderr)
        return 1
    if summary.failed:
        names = " ".join(str(p) for p in summary.failed)
        print(f"error: {len(summary.failed)} file(s) failed: {names}", file=sys.stderr)
        return 1
    return 0


def console():
    """The command line's entry point (``python -m`` and the installed command)."""
    run_cli(main, interrupted="interrupted; rerun the same command to continue (finished files are skipped)")


if __name__ == "__main__":
    console()
