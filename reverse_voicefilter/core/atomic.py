"""Write a file all at once: a temporary sibling, flushed to the disk, renamed over the target.

A crash, Ctrl-C or power loss mid-write leaves the old file (or none) and at most a temporary,
never half of a new one: the temporary is fsynced before its rename and the folder after it,
so the rename never reaches the disk before the data it points to. Every file the suite writes
goes through :func:`atomic_path` (or the helpers on top of it), so its temporaries all have one
recognisable name, ``.NAME.pidPID.XXXXXXXX.tmp[.SUFFIX]``, and :func:`remove_stale_temporaries`
can clear what a SIGKILL left behind without touching anything else, nor the temporary of a
writer still at work in the same folder.

A full disk is reported as one :class:`~reverse_voicefilter.core.errors.DiskFullError` naming
the folder, whichever library was writing (see :func:`is_disk_full`).
"""
import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from reverse_voicefilter.core.errors import NO_SPACE_ERRNOS, disk_full_error

# ".chkpt_100.pt.pid4242.k2j_x9ab.tmp.pt": a leading dot, the target's name, the writer's process id,
# mkstemp's 8 characters, ".tmp". Names without the pid part were written by earlier versions.
_TEMPORARY = re.compile(r"^\..+?\.(?:pid(?P<pid>[0-9]+)\.)?[a-z0-9_]{8}\.tmp(\.[^.]+)?$")

# libsndfile ("System error"), torch's zip writer ("enforce fail at inline_container.cc ...") and
# soundfile's short-write assert do not keep errno; such a failure while the device has less than
# this left (the half-written temporary still on it) is a full disk.
NEARLY_FULL_BYTES = 1 << 20


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def free_bytes(folder):
    """Bytes an unprivileged writer can still use on ``folder``'s device (inf when unknown)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return float("inf")


def is_disk_full(err, folder):
    """Whether ``err``, raised while writing into ``folder``, means that its device is full."""
    if isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS:
        return True
    if "No space left on device" in str(err):  # a library that kept the system's words but not errno
        return True
    errno_lost = isinstance(err, (RuntimeError, AssertionError)) or (isinstance(err, OSError) and err.errno is None)
    return errno_lost and free_bytes(folder) < NEARLY_FULL_BYTES


def _fsync(path, folder=False):
    # POSIX syncs a file through any descriptor; Windows only through one open for writing
    mode = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if folder else os.O_RDONLY if os.name == "posix" else os.O_RDWR
    fd = os.open(path, mode)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder):
    """The rename's own record; skipped where folders cannot be opened (Windows) or synced (some
    network file systems answer EINVAL): the data itself is already on the disk."""
    if os.name != "posix":
        return
    try:
        _fsync(folder, folder=True)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path``.

    ``mkstemp`` creates files readable by the owner only; the result gets the
    permissions a plain ``open(path, "w")`` would give (0o666 less the umask).
    A full disk, at any step, raises :class:`DiskFullError` (the temporary removed).
    """
    path = Path(path)
    folder = path.parent
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.pid{os.getpid()}.", suffix=".tmp" + path.suffix, dir=folder)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync_folder(folder)
    except (OSError, RuntimeError, AssertionError) as err:
        # checked before the temporary goes: what it holds is part of what filled the disk
        if is_disk_full(err, folder):
            raise disk_full_error(folder, err) from err
        raise
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def write_text(path, text):
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def write_bytes(path, data):
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
    return Path(path)


def save_torch(obj, path):
    """``torch.save`` to ``path`` atomically; returns ``path``.

    Saved through an open file, not the temporary's name: given a name, ``torch.save`` names the
    archive inside the file after it, and the random temporary name would make the same tensors
    give different bytes on every run (given a file, the archive is always called ``archive``).
    """
    import torch  # here: the data tools that use this module do not need torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def is_temporary(name):
    """Whether a file name is one of :func:`atomic_path`'s temporaries."""
    return bool(_TEMPORARY.match(name))


def writer_alive(pid):
    """Whether process ``pid`` (on this machine) still runs. A pid that the system has since given
    to another process counts as alive: its temporary is kept, never one still being written."""
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return True  # no harmless probe (os.kill(pid, 0) would stop the process on Windows): keep it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: another user's process, alive
    return True


def is_stale_temporary(name):
    """A temporary of :func:`atomic_path` whose writer is gone (or an earlier version's, which
    named no writer)."""
    match = _TEMPORARY.match(name)
    if not match:
        return False
    return match["pid"] is None or not writer_alive(int(match["pid"]))


def remove_stale_temporaries(folder, legacy_suffixes=()):
    """Delete the temporaries a killed writer left in ``folder`` (not recursive).

    Only names of :func:`atomic_path`'s shape whose writing process no longer exists are
    touched (a parallel run's are kept), plus names ending in one of ``legacy_suffixes``
    (e.g. ``".pt.tmp"``, what earlier versions of the suite wrote). Call it at the start of
    a run, before this run writes there. Returns the removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        name = entry.name
        if (is_stale_temporary(name) or (legacy_suffixes and name.endswith(tuple(legacy_suffixes)))) \
                and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
