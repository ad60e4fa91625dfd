"""The one atomic writer: whole files or none, stable bytes, and only its own leftovers removed."""
import os

import pytest
import torch

from reverse_voicefilter.core import atomic


def test_save_torch_gives_the_same_bytes_every_time(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": 3}
    first = atomic.save_torch(state, tmp_path / "a.pt").read_bytes()
    second = atomic.save_torch(state, tmp_path / "a.pt").read_bytes()
    assert first == second  # the temporary's random name does not reach the archive
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["w"], state["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = atomic.write_text(tmp_path / "report.json", "old")
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        with open(tmp, "w") as f:
            f.write("half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_stale_temporaries_of_our_naming_only_are_removed(tmp_path):
    import tempfile

    ours = [tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp" + suffix, dir=tmp_path)
            for name, suffix in (("chkpt_100.pt", ".pt"), ("config.yaml", ".yaml"), ("notes", ""))]
    for fd, _ in ours:
        os.close(fd)
    (tmp_path / "chkpt_200.pt.tmp").write_text("legacy")
    keep = ["chkpt_100.pt", ".hidden", "my.tmp", "data.tmp.wav", "000001-mixed.wav"]
    for name in keep:
        (tmp_path / name).write_text("user's")
    removed = atomic.remove_stale_temporaries(tmp_path, legacy_suffixes=(".pt.tmp",))
    assert sorted(p.name for p in removed) == sorted([os.path.basename(p) for _, p in ours] + ["chkpt_200.pt.tmp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def exited_pid():
    """The process id of a process that has ended (a child, waited for)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.skipif(os.name != "posix", reason="whether a writer lives is only probed on POSIX")
def test_a_killed_writers_temporary_goes_a_live_writers_stays(tmp_path):
    dead = tmp_path / f".result.wav.pid{exited_pid()}.ab12cd34.tmp.wav"
    alive = tmp_path / f".result.wav.pid{os.getpid()}.k2j_x9ab.tmp.wav"  # a parallel run's, still writing
    for path in (dead, alive):
        path.write_bytes(b"half")
    removed = atomic.remove_stale_temporaries(tmp_path)
    assert removed == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name]


def test_the_temporary_names_its_writer(tmp_path):
    seen = []
    with atomic.atomic_path(tmp_path / "result.wav") as tmp:
        seen.append(os.path.basename(tmp))
        assert atomic.is_temporary(seen[0]) and f".pid{os.getpid()}." in seen[0]
        assert not atomic.remove_stale_temporaries(tmp_path)  # this process writes it: kept
        open(tmp, "wb").close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.wav"]


def test_file_and_folder_are_fsynced_around_the_rename(tmp_path, monkeypatch):
    """Durability: the data reaches the disk before the rename, and the rename after it."""
    synced, real_fsync = [], os.fsync
    events = []

    def fsync(fd):
        synced.append(os.fstat(fd).st_ino)
        events.append("fsync")
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    real_replace = os.replace
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = atomic.write_text(tmp_path / "sub" / "report.json", "{}")
    assert synced == [target.stat().st_ino, target.parent.stat().st_ino]
    assert events == ["fsync", "rename", "fsync"]


TORCH_FULL = RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                          "data/0: file write failed")


def test_a_full_disk_is_one_error_naming_the_folder(tmp_path):
    from reverse_voicefilter.core.errors import DiskFullError

    target = atomic.write_text(tmp_path / "report.json", "old")
    with pytest.raises(DiskFullError) as caught, atomic.atomic_path(target) as tmp:
        with open(tmp, "w") as f:
            f.write("half of the new")
        raise OSError(28, "No space left on device")
    assert str(caught.value).startswith(f"no space left on the device of {tmp_path}")
    assert caught.value.exit_code == 1
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_write_error_without_errno_is_a_full_disk_only_when_the_device_is_full(tmp_path, monkeypatch):
    """torch's zip writer and libsndfile lose errno: the device's free space decides."""
    from reverse_voicefilter.core.errors import DiskFullError

    def full_save(obj, f):
        f.write(b"PK" * 100)
        raise RuntimeError(str(TORCH_FULL))

    monkeypatch.setattr(torch, "save", full_save)
    monkeypatch.setattr(atomic, "free_bytes", lambda folder: 0)
    with pytest.raises(DiskFullError, match="no space left on the device of"):
        atomic.save_torch({"w": torch.zeros(3)}, tmp_path / "chkpt_1.pt")
    monkeypatch.setattr(atomic, "free_bytes", lambda folder: 10 << 30)
    with pytest.raises(RuntimeError, match="file write failed"):  # space left: a bug keeps its traceback
        atomic.save_torch({"w": torch.zeros(3)}, tmp_path / "chkpt_1.pt")
    assert list(tmp_path.iterdir()) == []


def test_run_cli_reports_a_full_disk_met_outside_the_writer(tmp_path, capsys):
    from reverse_voicefilter.core.errors import run_cli

    def main(argv):
        raise OSError(28, "No space left on device", str(tmp_path / "logs" / "events.out"))

    with pytest.raises(SystemExit) as stop:
        run_cli(main, [])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "Traceback" not in err
    assert err.splitlines() == [f"error: no space left on the device of {tmp_path / 'logs'}: free some space and "
                                f"run again (the files written before are kept)"]
