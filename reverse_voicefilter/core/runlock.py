"""One run at a time in a folder: a kernel lock (``flock``) on ``FOLDER/.lock``.

Two trainers started on one ``chkpt/NAME`` both passed the "already holds checkpoints" check
and overwrote each other's files; two generators or evaluations on one ``-o`` removed each
other's temporaries. The lock is the kernel's: it lasts as long as the process holding it, a
stopped process (SIGSTOP, Ctrl-Z) still holds it, and a dead one (even by SIGKILL) loses it at
once, so a crash never leaves a folder locked and there is nothing to clean up by hand. The
``.lock`` file itself is deleted when the holder ends normally; one left by a killed process is
taken over by the next run. Under torchrun only rank 0 takes it (the other ranks write nothing
there). On a file system without ``flock`` the run goes on unlocked, with a warning.
"""
import contextlib
import logging
import os
import socket
from pathlib import Path

from reverse_voicefilter.core.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs go on unlocked
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
# A holder deletes the file as it lets go: a process that opened the old file just then locks a
# file no longer in the folder and must open the new one; a few rounds settle any such race.
ATTEMPTS = 8
# The descriptors of the locks this process holds. A forked child (a DataLoader worker) shares
# them, and the kernel keeps a lock while any copy is open: children close theirs, so the lock
# goes with the holder's death and not with its last worker's.
_HELD = set()


def _close_inherited():
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited)


@contextlib.contextmanager
def folder_lock(folder, flag):
    """Hold ``folder/.lock`` (``folder`` must exist) for the ``with`` block.

    Another live process holding it is a :class:`UserError` naming that process and ``flag``
    (the option that chose the folder), raised before anything in the folder is touched.
    """
    folder = Path(folder)
    fd = _acquire(folder, flag)
    try:
        yield folder / LOCK_NAME
    finally:
        if fd is not None:
            _release(fd, folder / LOCK_NAME)


def _acquire(folder, flag):
    """The descriptor of the locked ``.lock`` (None where the file system cannot lock)."""
    if fcntl is None:
        logger.warning("no file locking on this system: nothing stops a second run in %s", folder)
        return None
    path = folder / LOCK_NAME
    for _ in range(ATTEMPTS):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as err:
            raise UserError(f"cannot create the lock file {path} ({flag} folder): {err.strerror or err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise UserError(f"{folder} is in use by another run ({holder}); wait for it to end, or choose "
                            f"another {flag}") from None
        except OSError as err:  # ENOLCK, EOPNOTSUPP: a network or FUSE file system without flock
            os.close(fd)
            logger.warning("cannot lock %s (%s): nothing stops a second run in %s", path, err.strerror or err,
                           folder)
            return None
        if _is_current(fd, path):
            _HELD.add(fd)
            _write_holder(fd)
            return fd
        os.close(fd)  # the holder deleted this file as we locked it: take the one in the folder now
    raise UserError(f"cannot take the lock {path}: other runs keep taking and releasing it; try again")


def _is_current(fd, path):
    """Whether ``fd`` is the file at ``path`` now (and not one deleted in the meantime)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


def _write_holder(fd):
    """Who holds the lock, for the message of the process it refuses."""
    text = f"process {os.getpid()} on {socket.gethostname()}\n".encode()
    with contextlib.suppress(OSError):  # only a courtesy: the lock is the flock, not the text
        os.ftruncate(fd, 0)
        os.pwrite(fd, text, 0)


def _holder(fd):
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "a process that has not yet said which"


def _release(fd, path):
    # deleted while still locked: a process that opens it from now on creates a new file
    with contextlib.suppress(OSError):
        os.unlink(path)
    _HELD.discard(fd)
    os.close(fd)
