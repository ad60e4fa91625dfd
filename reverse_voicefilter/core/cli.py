"""Small pieces every entry script shares: boolean flags, device choice, logging, output folders."""
import argparse
import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path

from reverse_voicefilter.core.errors import UserError

_TRUE = {"true", "t", "yes", "y", "1", "on"}
_FALSE = {"false", "f", "no", "n", "0", "off"}


def str2bool(text):
    """Parse a boolean flag as people write it (the original's ``type=bool`` read 'False' as True)."""
    value = str(text).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False, 1/0, yes/no), got {text!r}")


def add_bool_flag(parser, *names, default=False, help=None):
    """``--flag`` alone means True; ``--flag False`` / ``--flag 0`` / ``--flag no`` mean False."""
    parser.add_argument(*names, type=str2bool, nargs="?", const=True, default=default, metavar="BOOL", help=help)


def add_device_flag(parser):
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where to compute (auto: CUDA, then MPS, then CPU)")


def pick_device(name="auto"):
    """Choose the one device of a run; a device asked for but absent is a user error."""
    import torch  # here, not at the top: --help and flag errors answer without loading torch

    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available (try --device cpu)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for but MPS is not available (try --device cpu)")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise UserError(f"unknown device {name!r} (use auto, cpu, cuda or mps)")
    return torch.device(name)


def check_writable_dir(path, flag):
    """Create folder ``path`` if needed and prove it writable now, before any compute: a run that
    would only fail when writing its results is one line naming the flag (exit 2) instead."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"cannot write to {flag} folder {path}: {err.strerror or err}") from None
    return path


@contextlib.contextmanager
def new_folders(*folders, flag):
    """:func:`check_writable_dir` for each folder; on the way out, those this call created (parents
    included) that are still empty are removed again, so a run refused at its start leaves
    nothing behind (a run that wrote something keeps its folders)."""
    created = set()
    try:
        for folder in map(Path, folders):
            created.update(p for p in (folder, *folder.parents) if not p.exists())
            check_writable_dir(folder, flag)
        yield
    finally:
        for path in sorted(created, key=lambda p: len(p.parts), reverse=True):  # the deepest first
            with contextlib.suppress(OSError):  # not empty (or gone): it stays
                path.rmdir()


class UserErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (argparse's own usage + error, exit 2)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def setup_console_logging(level=logging.INFO):
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def add_threads_flag(parser):
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch (default: OMP_NUM_THREADS, else the cores that other processes "
                             "leave free at start, with idle threads sleeping rather than spinning)")


def apply_threads(threads, log=None):
    """Set torch's intra-op thread count and say how many are used and why (core.threads: ``--threads``,
    else OMP_NUM_THREADS, else the cores other processes leave free), so a slow run on a loaded
    machine shows why. The choice is made by :func:`~reverse_voicefilter.core.threads.configure`, which
    the commands call before torch loads; made here where they did not. Returns the count in effect."""
    from reverse_voicefilter.core import threads as thread_choice

    if thread_choice.current() != (threads,):
        thread_choice.configure(threads)
    return thread_choice.apply(log)
