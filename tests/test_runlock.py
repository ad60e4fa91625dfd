"""core.runlock: one run at a time in a folder, with real processes holding the lock.

A holder is a small Python child that takes the lock through the API and waits; it is stopped
(SIGSTOP: still holds) and killed (SIGKILL: the kernel drops the lock). The commands' own
refusals are tested in their files with :func:`lock_holder`.
"""
import contextlib
import os
import signal
import subprocess
import sys

import pytest
from conftest import ROOT

from reverse_voicefilter.core.cli import new_folders
from reverse_voicefilter.core.errors import UserError
from reverse_voicefilter.core.runlock import LOCK_NAME, folder_lock

HOLDER = """
import os, signal, sys, time
from reverse_voicefilter.core.runlock import folder_lock
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # ends normally: the lock file is deleted
with folder_lock(sys.argv[1], "-o"):
    if sys.argv[2] == "fork" and os.fork() == 0:  # a child that outlives the holder (a DataLoader worker)
        os.write(1, f"child {os.getpid()}\\n".encode())  # one write: the two lines must not interleave
        time.sleep(600)
        os._exit(0)
    os.write(1, f"locked {os.getpid()}\\n".encode())
    time.sleep(600)
"""


@contextlib.contextmanager
def lock_holder(folder, fork=False):
    """A live process holding ``folder``'s lock (the folder is created); yields it. It is killed
    on the way out, and with ``fork`` so is the child it forked (``proc.child_pid``)."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), "fork" if fork else "-"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    proc.child_pid = None
    try:
        for _ in range(2 if fork else 1):
            words = proc.stdout.readline().split()
            assert words, "the holder did not take the lock"
            if words[0] == "child":
                proc.child_pid = int(words[1])
        yield proc
    finally:
        for pid in (proc.pid, proc.child_pid):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)  # a stopped process dies of SIGKILL too
        proc.wait(timeout=30)


def refusal(folder):
    """The refusal's message, or None when the lock was free (taken and released)."""
    try:
        with folder_lock(folder, "-o"):
            return None
    except UserError as err:
        return str(err)


def test_a_live_holder_refuses_a_stopped_one_too_a_killed_one_not(tmp_path):
    folder = tmp_path / "run"
    with lock_holder(folder) as holder:
        message = refusal(folder)
        assert message and message.startswith(f"{folder} is in use by another run (process {holder.pid} on ")
        assert message.endswith("wait for it to end, or choose another -o")
        os.kill(holder.pid, signal.SIGSTOP)
        try:
            assert refusal(folder) == message  # stopped is not dead: it would go on writing when continued
        finally:
            os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        assert (folder / LOCK_NAME).exists()  # what a killed holder leaves: a file, but no lock
        assert refusal(folder) is None
    assert not (folder / LOCK_NAME).exists()  # a holder that ends normally takes its file along


def test_the_lock_goes_with_the_holder_not_with_a_child_it_forked(tmp_path):
    folder = tmp_path / "run"
    with lock_holder(folder, fork=True) as holder:
        assert refusal(folder)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        os.kill(holder.child_pid, 0)  # the child lives on
        assert refusal(folder) is None


def test_one_process_cannot_take_its_own_folder_twice(tmp_path):
    with folder_lock(tmp_path, "-m"):
        with pytest.raises(UserError, match=f"process {os.getpid()} on"):
            with folder_lock(tmp_path, "-m"):
                pass
    assert refusal(tmp_path) is None


def test_a_lock_on_the_file_its_holder_just_deleted_is_not_taken(tmp_path, monkeypatch):
    """The holder deletes ``.lock`` as it ends: a process that opened the old file just before
    must not lock that deleted file (while another locks the new one) but the one in the folder."""
    from reverse_voicefilter.core import runlock

    real_flock, calls = runlock.fcntl.flock, []

    def flock_after_the_holder_ended(fd, operation):
        if not calls:  # between this process's open and its flock, the holder ends normally
            calls.append(fd)
            holder.terminate()
            holder.wait(timeout=30)
        return real_flock(fd, operation)

    with lock_holder(tmp_path) as holder:
        monkeypatch.setattr(runlock.fcntl, "flock", flock_after_the_holder_ended)
        with folder_lock(tmp_path, "-o"):
            assert len(calls) == 1
            assert refusal(tmp_path) is not None  # a newcomer finds the folder taken


def test_new_folders_removes_what_it_made_when_left_empty(tmp_path):
    with pytest.raises(UserError):
        with new_folders(tmp_path / "a" / "b" / "chkpt" / "x", tmp_path / "a" / "b" / "logs" / "x", flag="-b"):
            raise UserError("refused")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    with new_folders(tmp_path / "kept" / "x", tmp_path / "made" / "y", flag="-b"):
        (tmp_path / "made" / "y" / "file").write_text("written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "made"]
    assert list((tmp_path / "kept").iterdir()) == []  # its own empty subfolder went, the folder stayed
    assert (tmp_path / "made" / "y" / "file").is_file()
