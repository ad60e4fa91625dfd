"""Download, verify and unpack LibriSpeech subsets from OpenSLR.

Usage::

    python -m reverse_voicefilter.prepare.librispeech -o DIR [--subsets dev-clean train-clean-100 ...]
                                [--base-url URL] [--keep-archive] [--md5 SUBSET=HASH]

Each subset ``S`` is fetched from ``{base_url}/S.tar.gz`` into ``DIR/S.tar.gz.part``,
resumed with an HTTP Range request when a previous run was cut off, checked
against the MD5 that OpenSLR publishes, and unpacked.  The archives hold
``LibriSpeech/S/SPEAKER/CHAPTER/*.flac``, so the files land in
``DIR/LibriSpeech/S/...`` (with ``README.TXT``, ``SPEAKERS.TXT`` ... in
``DIR/LibriSpeech/``): that folder is the LibriSpeech root that
``normalize-resample.sh`` and ``generator.py -d`` expect.

A subset whose folder already exists is skipped; unpacking goes to a temporary
folder first, so an interrupted extraction never looks finished.  The archive
is deleted after a successful extraction unless ``--keep-archive``, and after a
failed one (no .tar.gz, damaged, unsafe or another subset's, though its MD5 was
right), as a rerun would only trust it again.

Why not pooch for the transfer: ``pooch.retrieve`` (1.9) streams into a
temporary file that it deletes when the connection drops, and its retries start
again from byte 0 without a Range header, so a cut at 5 of 6 GB costs 5 GB.
The one thing kept by hand here is that transfer: resuming ``.part`` with a
Range request, checking the server's Content-Range, growing waits between
tries.  The MD5 is pooch's ``file_hash``; extraction is tarfile's ``"data"``
filter.
"""

from __future__ import annotations

import argparse
import http.client
import logging
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

from reverse_voicefilter.core.cli import UserErrorParser, check_writable_dir
from reverse_voicefilter.core.errors import UserError, run_cli

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://www.openslr.org/resources/12"
ARCHIVE_ROOT = "LibriSpeech"  # top-level folder inside every subset tarball

# MD5 checksums published by OpenSLR (https://www.openslr.org/12, md5sum.txt).
LIBRISPEECH_MD5 = {
    "dev-clean": "42e2234ba48799c1f50f24a7926300a1",
    "dev-other": "c8d0bcc9cca99d4f8b62fcc847357931",
    "test-clean": "32fa31d27d2e1cad72775fee3f4849a9",
    "test-other": "fb5a50374b501bb3bac4815ee91d3135",
    "train-clean-100": "2a93770f6d5c6c964bc36631d331a522",
    "train-clean-360": "c0e676e450a7ff2f54aeade5171606fa",
    "train-other-500": "d1a0fd59409feb2c614ce4d30c387708",
}
DEFAULT_SUBSETS = ["dev-clean", "train-clean-100"]

CHUNK_SIZE = 1 << 20
TIMEOUT_S = 60
RETRIES = 4  # tries per run; a dropped connection is resumed from where it stopped
BACKOFF_S = 5.0  # wait after the first failed try, doubled after each further one
BACKOFF_MAX_S = 60.0
TRANSIENT_HTTP = {429, 500, 502, 503, 504}  # a busy or restarting server: worth another try
URL_SCHEMES = ("http", "https", "ftp", "file")  # what urllib opens; file:// serves a local mirror


class DownloadError(UserError):
    """A download, checksum or extraction problem, told to the user as one sentence (exit 1)."""

    exit_code = 1


class BadArchive(DownloadError):
    """The archive cannot give the subset (no .tar.gz, damaged, unsafe, another subset's) though it
    passed its MD5 check: a rerun would trust it and fail the same way, so it must not stay."""


# What tarfile and gzip raise for a file that is not a (complete) .tar.gz, at open or midway.
_NOT_A_TARBALL = (tarfile.ReadError, tarfile.CompressionError, EOFError, zlib.error)


# ----------------------------------------------------------------------------- download


def backoff_s(failed_tries: int) -> float:
    """Seconds to wait after `failed_tries` failures: 5, 10, 20 ... up to BACKOFF_MAX_S."""
    return min(BACKOFF_S * 2 ** (failed_tries - 1), BACKOFF_MAX_S)


def _retry_after_s(err, failed_tries: int) -> float:
    """The wait a busy server asks for (``Retry-After`` in seconds), else the usual backoff;
    never over BACKOFF_MAX_S."""
    asked = (getattr(err, "headers", None) or {}).get("Retry-After", "")
    if str(asked).strip().isdigit():
        return min(float(asked), BACKOFF_MAX_S)
    return backoff_s(failed_tries)


def _sleep(seconds: float) -> None:
    """The wait between tries; a module function so tests can replace it."""
    time.sleep(seconds)


def _open(url: str, start: int, timeout: float):
    """GET `url`, asking for bytes from `start` on when resuming."""
    request = urllib.request.Request(url, headers={"User-Agent": "reverse-voicefilter-downloader"})
    if start > 0:
        request.add_header("Range", f"bytes={start}-")
    return urllib.request.urlopen(request, timeout=timeout)


def _resume_offset(response, start: int) -> int:
    """Where the body of `response` starts in the file: `start` if the server honoured Range, else 0."""
    if start > 0 and response.status == 206:
        content_range = response.headers.get("Content-Range", "")  # "bytes START-END/TOTAL"
        try:
            first = int(content_range.split()[1].split("-")[0])
        except (IndexError, ValueError):
            first = -1
        if first == start:
            return start
        logger.warning("server answered the range request with %r; restarting the download", content_range)
        raise _RangeMismatch()
    if start > 0:
        logger.info("server ignored the range request; downloading from the start")
    return 0


class _RangeMismatch(Exception):
    """The server sent a different range than asked for; the only safe fix is to restart."""


def _total_size(response, offset: int) -> int | None:
    """Size of the whole file from Content-Length (plus the resumed offset), if the server says."""
    length = response.headers.get("Content-Length")
    return offset + int(length) if length and length.isdigit() else None


def _copy_body(response, part: Path, offset: int, total: int | None, desc: str, progress: bool) -> int:
    """Append (or, at offset 0, write) the response body to `part`; returns the final size."""
    from tqdm import tqdm

    mode = "ab" if offset else "wb"
    size = offset
    with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                     unit_divisor=1024, desc=desc, disable=not progress) as bar:
        if offset:
            f.truncate(offset)  # a partial trailing write of a killed run must not stay in the file
        for chunk in iter(lambda: response.read(CHUNK_SIZE), b""):
            f.write(chunk)
            size += len(chunk)
            bar.update(len(chunk))
    return size


def _check_space(folder: Path, needed: int | None) -> None:
    """Fail before downloading when the disk cannot hold the rest of the file."""
    if needed is None:
        return
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DownloadError(f"not enough disk space in {folder}: {needed / 1e9:.1f} GB more needed, "
                            f"{free / 1e9:.1f} GB free")


def _fetch_once(url: str, part: Path, desc: str, progress: bool, timeout: float) -> None:
    """One attempt to bring `part` up to the full file; raises OSError/URLError when cut off."""
    start = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, start, timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and start > 0:  # nothing left to send: the part file is already complete
            logger.info("%s is already complete", part)
            return
        raise
    with response:
        try:
            offset = _resume_offset(response, start)
        except _RangeMismatch:
            response.close()
            part.unlink()
            return _fetch_once(url, part, desc, progress, timeout)
        total = _total_size(response, offset)
        _check_space(part.parent, None if total is None else total - offset)
        size = _copy_body(response, part, offset, total, desc, progress)
    if total is not None and size < total:
        raise ConnectionError(f"connection closed after {size} of {total} bytes")


def download(url: str, dest: str | os.PathLike, expected_md5: str | None = None, progress: bool = True,
             retries: int = RETRIES, timeout: float = TIMEOUT_S) -> Path:
    """Download `url` to `dest` through ``dest.part``, resuming a previous partial download.

    The checksum is verified before the file gets its final name; on a mismatch the
    part file is deleted (so a rerun starts clean) and DownloadError is raised.
    Network failures keep the part file, so the next try (after a growing wait) or the
    next run resumes. The part file outlives failed runs on purpose, which is why it is
    not one of reverse_voicefilter.core.atomic's temporaries; the final name appears in one rename.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(1, retries + 1):
        try:
            _fetch_once(url, part, dest.name, progress, timeout)
        except urllib.error.HTTPError as err:
            if err.code not in TRANSIENT_HTTP or attempt == retries:
                raise DownloadError(f"cannot download {url}: HTTP {err.code} {err.reason}") from err
            reason, wait = f"HTTP {err.code} {err.reason}", _retry_after_s(err, attempt)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", None) or err
            if attempt == retries:
                raise DownloadError(f"cannot download {url}: {reason} (rerun to resume from "
                                    f"{part.stat().st_size if part.exists() else 0} bytes)") from err
            wait = backoff_s(attempt)
        else:
            break
        logger.warning("download of %s interrupted (%s); resuming in %.0f s (try %d of %d)",
                       url, reason, wait, attempt + 1, retries)
        _sleep(wait)
    if expected_md5:
        verify_md5(part, expected_md5, name=url)
    os.replace(part, dest)
    return dest


def verify_md5(path: Path, expected: str, name: str | None = None) -> None:
    """Raise DownloadError (after deleting `path`) unless its MD5 is `expected`."""
    import pooch  # here: only a download needs it

    logger.info("verifying the MD5 of %s", path)
    actual = pooch.file_hash(str(path), alg="md5")
    if actual != expected.lower():
        path.unlink()
        raise DownloadError(f"checksum mismatch for {name or path}: expected MD5 {expected}, got {actual}; "
                            f"the corrupt file was deleted, rerun to download it again")


# ----------------------------------------------------------------------------- extraction


def _librispeech_member(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's "data" filter, which refuses '..', links out of `dest` and device files, plus one
    rule: an absolute name, which that filter would quietly make relative, is refused too."""
    if member.name.startswith(("/", "\\")):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, dest)


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Extract a .tar.gz into `dest` in one pass, raising BadArchive for a file that is no .tar.gz
    or a damaged one, and at the first unsafe member (what was extracted before stays in `dest`:
    callers extract into a temporary folder)."""
    if not hasattr(tarfile, "data_filter"):
        raise DownloadError("safe extraction needs Python 3.11.4 or newer (tarfile extraction filters)")
    try:
        tar = tarfile.open(archive, "r:*")
    except _NOT_A_TARBALL as err:  # its message lists every compression tried, one per line
        raise BadArchive(f"cannot unpack {archive}: it is not a .tar.gz archive") from err
    with tar:
        try:
            tar.extractall(dest, filter=_librispeech_member)
        except tarfile.FilterError as err:
            raise BadArchive(f"refusing to extract {archive}: {err}") from err
        except _NOT_A_TARBALL as err:
            reason = " ".join(str(err).split()) or type(err).__name__
            raise BadArchive(f"cannot unpack {archive}: it is damaged ({reason})") from err


def subset_dir(out_dir: str | os.PathLike, subset: str) -> Path:
    """Where `subset` lands: ``OUT/LibriSpeech/SUBSET``."""
    return Path(out_dir) / ARCHIVE_ROOT / subset


def extract_subset(archive: Path, out_dir: Path, subset: str) -> Path:
    """Unpack `archive` into a temporary folder in `out_dir`, then move its parts into place.

    The subset folder appears in one rename, so its existence means "fully extracted".
    Metadata files (SPEAKERS.TXT ...) already present from another subset are kept.
    """
    with tempfile.TemporaryDirectory(prefix=f".extract-{subset}-", dir=out_dir) as tmp:
        safe_extract(archive, tmp)
        unpacked = Path(tmp) / ARCHIVE_ROOT
        if not (unpacked / subset).is_dir():
            raise BadArchive(f"{archive} does not contain {ARCHIVE_ROOT}/{subset}/: is it the right file?")
        target_root = Path(out_dir) / ARCHIVE_ROOT
        target_root.mkdir(exist_ok=True)
        for entry in sorted(unpacked.iterdir()):
            target = target_root / entry.name
            if entry.name == subset or not target.exists():
                os.replace(entry, target)
    return subset_dir(out_dir, subset)


# ----------------------------------------------------------------------------- whole subsets


def check_base_url(base_url: str) -> None:
    """Raise UserError unless `base_url` is a URL urllib can open: found before any download, not
    as urllib's ValueError traceback at the first request."""
    try:
        parts = urllib.parse.urlsplit(base_url)
        _host, _port = parts.hostname, parts.port  # a non-numeric port raises ValueError only when read
    except ValueError as err:
        raise UserError(f"--base-url {base_url!r} is not a URL: {err}") from None
    if parts.scheme not in URL_SCHEMES or (parts.scheme != "file" and not parts.hostname):
        raise UserError(f"--base-url {base_url!r} is not a URL: expected http(s)://HOST/PATH, ftp://HOST/PATH "
                        f"or file:///FOLDER (the default is {DEFAULT_BASE_URL})")


def check_subsets(subsets: list[str], md5_table: dict[str, str]) -> None:
    """Raise UserError for a subset name without a known checksum."""
    for subset in subsets:
        if subset not in md5_table:
            raise UserError(f"unknown LibriSpeech subset {subset!r} (known: {', '.join(sorted(md5_table))}; "
                            f"or give its checksum with --md5 {subset}=HASH)")


def fetch_subset(subset: str, out_dir: str | os.PathLike, base_url: str = DEFAULT_BASE_URL,
                 md5_table: dict[str, str] | None = None, keep_archive: bool = False,
                 progress: bool = True) -> Path:
    """Download, verify and extract one subset; returns ``OUT/LibriSpeech/SUBSET``.

    Skips everything when that folder already exists; reuses a complete archive left
    by ``--keep-archive`` (after checking it) and resumes a partial one.
    """
    md5_table = LIBRISPEECH_MD5 if md5_table is None else md5_table
    check_subsets([subset], md5_table)
    out_dir = Path(out_dir)
    target = subset_dir(out_dir, subset)
    if target.is_dir():
        logger.info("%s already extracted at %s; skipping", subset, target)
        return target
    check_writable_dir(out_dir, "-o")
    archive = out_dir / f"{subset}.tar.gz"
    expected = md5_table[subset]
    if archive.exists():
        logger.info("found %s; checking it instead of downloading", archive)
        verify_md5(archive, expected)
    else:
        check_base_url(base_url)
        url = f"{base_url.rstrip('/')}/{subset}.tar.gz"
        logger.info("downloading %s", url)
        download(url, archive, expected_md5=expected, progress=progress)
    logger.info("extracting %s into %s", archive, out_dir / ARCHIVE_ROOT)
    try:
        extract_subset(archive, out_dir, subset)
    except BadArchive as err:
        archive.unlink(missing_ok=True)
        raise BadArchive(f"{err}; it was deleted, rerun to download it again (is the --md5 checksum "
                         f"the right one?)") from err
    if not keep_archive:
        archive.unlink()
    return target


def fetch_subsets(subsets: list[str], out_dir: str | os.PathLike, base_url: str = DEFAULT_BASE_URL,
                  md5_table: dict[str, str] | None = None, keep_archive: bool = False,
                  progress: bool = True) -> list[Path]:
    """`fetch_subset` for each name, after checking all names and the folder first."""
    md5_table = LIBRISPEECH_MD5 if md5_table is None else md5_table
    check_subsets(subsets, md5_table)
    check_base_url(base_url)
    check_writable_dir(out_dir, "-o")
    return [fetch_subset(s, out_dir, base_url, md5_table, keep_archive, progress) for s in subsets]


# ----------------------------------------------------------------------------- command line


def _parse_md5(text: str) -> tuple[str, str]:
    """'dev-clean=42e2...' -> ('dev-clean', '42e2...')."""
    subset, sep, digest = text.partition("=")
    digest = digest.strip().lower()
    if not sep or not subset or len(digest) != 32 or any(c not in "0123456789abcdef" for c in digest):
        raise argparse.ArgumentTypeError(f"expected SUBSET=MD5 (32 hex digits), got {text!r}")
    return subset, digest


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of ``python -m reverse_voicefilter.prepare.librispeech``."""
    parser = UserErrorParser(
        prog="python -m reverse_voicefilter.prepare.librispeech",
        description="Download LibriSpeech subsets, verify their MD5 and extract them into "
                    "OUTPUT/LibriSpeech/SUBSET.")
    parser.add_argument("-o", "--output", required=True,
                        help="folder receiving LibriSpeech/ (and the archives while downloading)")
    parser.add_argument("--subsets", nargs="+", default=DEFAULT_SUBSETS, metavar="SUBSET",
                        help=f"subsets to fetch (default: {' '.join(DEFAULT_SUBSETS)}; "
                             f"known: {', '.join(LIBRISPEECH_MD5)})")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"mirror (default {DEFAULT_BASE_URL})")
    parser.add_argument("--keep-archive", action="store_true", help="keep SUBSET.tar.gz after extracting")
    parser.add_argument("--md5", action="append", type=_parse_md5, default=[], metavar="SUBSET=HASH",
                        help="expected MD5 of a subset's archive (overrides or extends the built-in table)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; raises UserError for problems the user can fix (printed by run_cli)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    md5_table = {**LIBRISPEECH_MD5, **dict(args.md5)}
    subsets = list(dict.fromkeys(args.subsets))
    paths = fetch_subsets(subsets, args.output, args.base_url, md5_table, args.keep_archive,
                          progress=not args.quiet)
    for path in paths:
        print(f"{path.name}: {path}")
    return 0


def console():
    """The command line's entry point (``python -m`` and the installed command)."""
    run_cli(main, interrupted="interrupted; rerun the same command to resume the download")


if __name__ == "__main__":
    console()
