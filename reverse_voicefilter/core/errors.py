"""User-facing errors and the guard that turns them into one line on stderr.

A ``UserError`` is a mistake the user can fix (a missing file, a bad flag, a
config typo). Entry scripts wrap their ``main`` in :func:`run_cli`, which
prints such errors as one ``error: ...`` line and exits non-zero; anything
else is a bug and keeps its traceback. A full disk is no bug either: it is one
line naming the folder, and exit status 1.
"""
import errno
import logging
import sys
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
EXIT_FAILURE = 1

# EDQUOT: the user's quota on that device is used up, which a writer meets as a full disk.
NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


class UserError(Exception):
    """A problem with the user's input, reported as one clear sentence."""

    exit_code = EXIT_USER_ERROR  # subclasses for other failures (a download) set their own


class TrainingDiverged(UserError):
    """The loss became NaN/inf or exceeded the limit: the run stops without writing a checkpoint.
    Not the user's typo, but reported the same way: one line, and exit status 1."""

    exit_code = EXIT_FAILURE


class DiskFullError(UserError):
    """No space (or quota) left where a file was being written; the half-written file is gone,
    the files written before are kept. Exit status 1."""

    exit_code = EXIT_FAILURE


def disk_full_error(folder, err=None):
    """The :class:`DiskFullError` for a write into ``folder`` that failed with ``err``."""
    where = f"the device of {folder}" if folder is not None else "a device (the file was not named)"
    what = f"disk quota exceeded on {where}" if getattr(err, "errno", None) == errno.EDQUOT \
        else f"no space left on {where}"
    return DiskFullError(f"{what}: free some space and run again (the files written before are kept)")


def run_cli(main, argv=None, interrupted="interrupted"):
    """Call ``main(argv)``; print a ``UserError`` as one line and exit with its ``exit_code``
    (2 unless the error says otherwise).

    A full disk met outside the atomic writer (which raises :class:`DiskFullError` itself) is one
    line too, exit status 1. KeyboardInterrupt prints ``interrupted`` and exits 130 (the caller
    has already saved what it had to save). A helper thread ended by a full disk (TensorBoard's
    writer) is one warning line, not a traceback: the main thread reports or copes.
    """
    previous_hook = threading.excepthook

    def thread_hook(args):
        if isinstance(args.exc_value, OSError) and args.exc_value.errno in NO_SPACE_ERRNOS:
            name = args.thread.name if args.thread is not None else "a thread"
            print(f"warning: {name} stopped: {args.exc_value.strerror}", file=sys.stderr)
        else:
            previous_hook(args)

    threading.excepthook = thread_hook
    try:
        code = main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except OSError as err:
        if err.errno not in NO_SPACE_ERRNOS:
            raise
        folder = Path(err.filename).parent if isinstance(err.filename, str) and err.filename else None
        print(f"error: {disk_full_error(folder, err)}", file=sys.stderr)
        sys.exit(EXIT_FAILURE)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
    finally:
        threading.excepthook = previous_hook
    sys.exit(code or 0)
