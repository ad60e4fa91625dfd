"""User-facing errors and the guard that turns them into one line on stderr.

A ``UserError`` is a mistake the user can fix (a missing file, a bad flag, a
config typo). Entry scripts wrap their ``main`` in :func:`run_cli`, which
prints such errors as one ``error: ...`` line and exits non-zero; anything
else is a bug and keeps its traceback.
"""
import logging
import sys

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input, reported as one clear sentence."""

    exit_code = EXIT_USER_ERROR  # subclasses for other failures (a download) set their own


class TrainingDiverged(UserError):
    """The loss became NaN/inf or exceeded the limit: the run stops without writing a checkpoint.
    Not the user's typo, but reported the same way: one line, and exit status 1."""

    exit_code = 1


def run_cli(main, argv=None, interrupted="interrupted"):
    """Call ``main(argv)``; print a ``UserError`` as one line and exit with its ``exit_code``
    (2 unless the error says otherwise).

    KeyboardInterrupt prints ``interrupted`` and exits 130 (the caller has already saved
    what it had to save).
    """
    try:
        code = main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
