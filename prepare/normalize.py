"""Loudness-normalize and resample every .flac below a folder to 16 kHz mono ``*-norm.wav``.

The Python twin of ``normalize-resample.sh`` (same command per file, same
skip and failure rules), with a progress bar and usable from other code::

    python -m prepare.normalize ROOT [-j JOBS]

Each ``NAME.flac`` gets ``NAME-norm.wav`` next to it, made by
``ffmpeg-normalize NAME.flac -ar 16000 -ac 1`` (EBU R128 loudness
normalization at its defaults, as the original).  The output is written as
``NAME-norm.partial.wav`` and renamed when complete; files whose output exists
are skipped; failures are listed at the end and make the exit status 1.
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

from utils.errors import UserError, run_cli

logger = logging.getLogger(__name__)

SUFFIX = "-norm.wav"
PARTIAL_SUFFIX = "-norm.partial.wav"  # does not match *-norm.wav, so no reader takes it for data
SAMPLE_RATE = 16000
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def output_path(flac: Path) -> Path:
    """``a/b.flac`` -> ``a/b-norm.wav``."""
    return flac.with_name(flac.stem + SUFFIX)


def partial_path(flac: Path) -> Path:
    """Temporary name of the output while ffmpeg-normalize writes it."""
    return flac.with_name(flac.stem + PARTIAL_SUFFIX)


def find_flacs(root: str | os.PathLike) -> list[Path]:
    """Every .flac below `root`, sorted."""
    return sorted(p for p in Path(root).rglob("*.flac") if p.is_file())


def ffmpeg_normalize_command() -> list[str]:
    """How to run ffmpeg-normalize: this interpreter's module if installed, else the one on PATH."""
    if importlib.util.find_spec("ffmpeg_normalize") is not None:
        return [sys.executable, "-m", "ffmpeg_normalize"]
    exe = shutil.which("ffmpeg-normalize")
    if exe:
        return [exe]
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
    out, tmp = output_path(flac), partial_path(flac)
    args = [*command, str(flac), "-ar", str(SAMPLE_RATE), "-ac", "1", "-f", "-o", str(tmp)]
    try:
        result = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
        if result.returncode == 0 and tmp.exists() and tmp.stat().st_size > 0:
            os.replace(tmp, out)
            return None
        message = _ANSI.sub("", (result.stderr or result.stdout or "").strip())
        return " ".join(message.split())[:300] or f"ffmpeg-normalize exited with {result.returncode}"
    except OSError as err:
        return f"cannot run ffmpeg-normalize: {err}"
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class NormalizeSummary:
    """What `normalize_tree` did."""

    normalized: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)  # flac -> reason


def normalize_tree(root: str | os.PathLike, jobs: int | None = None,
                   progress: bool = True) -> NormalizeSummary:
    """Normalize every .flac below `root` with `jobs` parallel ffmpeg-normalize processes.

    Threads suffice: each job waits on a subprocess.  Returns only when all jobs are done.
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    if not Path(root).is_dir():
        raise UserError(f"no such folder: {root}")
    jobs = jobs or os.cpu_count() or 1
    if jobs < 1:
        raise UserError(f"the number of jobs must be at least 1, got {jobs}")
    summary = NormalizeSummary()
    todo = []
    for flac in find_flacs(root):
        (summary.skipped if output_path(flac).exists() else todo).append(flac)
    logger.info("normalize: %d to do, %d already done, %d parallel jobs",
                len(todo), len(summary.skipped), jobs)
    if not todo:
        return summary
    command, env = ffmpeg_normalize_command(), ffmpeg_environment()
    with ThreadPoolExecutor(max_workers=jobs) as pool, logging_redirect_tqdm(), \
            tqdm(total=len(todo), unit="file", desc="normalize", disable=not progress) as bar:
        futures = {pool.submit(normalize_file, flac, command, env): flac for flac in todo}
        for future in as_completed(futures):
            flac, error = futures[future], future.result()
            if error is None:
                summary.normalized.append(flac)
            else:
                summary.failed[flac] = error
                logger.error("failed: %s: %s", flac, error)
            bar.update()
    summary.normalized.sort()
    summary.failed = dict(sorted(summary.failed.items()))
    logger.info("normalize: %d normalized, %d skipped, %d failed",
                len(summary.normalized), len(summary.skipped), len(summary.failed))
    return summary


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of ``python -m prepare.normalize``."""
    parser = argparse.ArgumentParser(
        prog="python -m prepare.normalize",
        description="Write NAME-norm.wav (EBU R128 loudness-normalized, 16 kHz mono) next to every "
                    "NAME.flac below ROOT with ffmpeg-normalize.")
    parser.add_argument("root", help="folder to search for .flac files (e.g. the LibriSpeech root)")
    parser.add_argument("-j", "--jobs", type=int, default=None, help="parallel jobs (default: all cores)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 1 when some files failed."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    summary = normalize_tree(args.root, args.jobs, progress=not args.quiet)
    if summary.failed:
        names = " ".join(str(p) for p in summary.failed)
        print(f"error: {len(summary.failed)} file(s) failed: {names}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main, interrupted="interrupted; rerun the same command to continue (finished files are skipped)")
