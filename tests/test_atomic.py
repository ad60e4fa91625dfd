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
