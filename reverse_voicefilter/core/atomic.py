"""Write a file all at once: a temporary sibling, renamed over the target when complete.

A crash or Ctrl-C mid-write leaves the old file (or none), never half of a new one.
Every file the suite writes goes through :func:`atomic_path` (or the helpers on top
of it), so its temporaries all have one recognisable name,
``.NAME.XXXXXXXX.tmp[.SUFFIX]``, and :func:`remove_stale_temporaries` can clear
what a SIGKILL left behind without touching anything else.
"""
import contextlib
import os
import re
import tempfile
from pathlib import Path

# ".chkpt_100.pt.k2j_x9ab.tmp.pt": a leading dot, the target's name, mkstemp's 8 characters, ".tmp".
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[^.]+)?$")


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path``.

    ``mkstemp`` creates files readable by the owner only; the result gets the
    permissions a plain ``open(path, "w")`` would give (0o666 less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        os.replace(tmp, path)
    finally:
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


def remove_stale_temporaries(folder, legacy_suffixes=()):
    """Delete the temporaries a killed writer left in ``folder`` (not recursive).

    Only names of :func:`atomic_path`'s shape are touched, plus names ending in one of
    ``legacy_suffixes`` (e.g. ``".pt.tmp"``, what earlier versions of the suite wrote).
    Call it at the start of a run, before this run writes there. Returns the removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        name = entry.name
        if (is_temporary(name) or (legacy_suffixes and name.endswith(tuple(legacy_suffixes)))) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
