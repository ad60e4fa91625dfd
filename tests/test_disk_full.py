"""A full disk in the commands that write much: one line naming the folder, exit 1, the files written
before kept, no temporary left, and no hang. The disk is filled by injection (the writer raises what a
full disk raises), not for real."""
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from reverse_voicefilter.commands import generator
from reverse_voicefilter.core import atomic
from reverse_voicefilter.core.errors import run_cli
from reverse_voicefilter.data.samples import read_manifest
from reverse_voicefilter.prepare.demo_corpus import make_corpus

TINY = ROOT / "config" / "tiny.yaml"
# torch's zip writer on a full disk: no errno, so atomic.free_bytes decides
TORCH_FULL = ("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
              "file write failed")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root, subsets={"train-clean-100": (6, 4), "dev-clean": (4, 4)}, seed=3, duration=(2.5, 4.0),
                jobs=1, progress=False)
    return root


def generate(capsys, corpus, out):
    with pytest.raises(SystemExit) as stop:
        run_cli(generator.main, ["-c", str(TINY), "-d", str(corpus), "-o", str(out), "-p", "1", "--train_size", "4",
                                 "--test_size", "2", "--train_subsets", "train-clean-100", "--progress", "False"])
    return stop.value.code, capsys.readouterr().err


def test_generator_on_a_full_disk_stops_in_one_line_and_resumes_later(tmp_path, corpus, capsys, monkeypatch):
    real_save, saved = torch.save, []

    def save_until_full(obj, f, *args, **kwargs):
        saved.append(f)
        if len(saved) > 4:  # two samples' spectrograms fit, the third's do not
            f.write(b"PK half an archive")
            raise RuntimeError(TORCH_FULL)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    monkeypatch.setattr(atomic, "free_bytes", lambda folder: 0)
    out = tmp_path / "out"
    code, err = generate(capsys, corpus, out)
    assert code == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: no space left on the device of {out / 'train'}: free some space and run again "
                      f"(the files written before are kept)"], err
    assert not [p for p in out.rglob("*") if atomic.is_temporary(p.name)]
    made = sorted(p.name for p in (out / "train").glob("*-dvec.txt"))  # a sample's last file
    assert made == ["000000-dvec.txt", "000001-dvec.txt"]

    monkeypatch.setattr(torch, "save", real_save)  # space freed: the same command finishes the work
    code, err = generate(capsys, corpus, out)
    assert code == 0, err
    assert len(read_manifest(out / "train")) == 4 and len(read_manifest(out / "test")) == 2


WRITER_ON_A_FULL_DISK = """
import sys
import numpy as np
import tensorboardX.event_file_writer as tb
from reverse_voicefilter.core.errors import run_cli
from reverse_voicefilter.core.hparams import HParam
from reverse_voicefilter.training.writer import MyWriter

def full(self, event):
    raise OSError(28, "No space left on device")

def main(argv):
    writer = MyWriter(HParam(sys.argv[1]), sys.argv[2])
    tb.EventsWriter.write_event = full  # the disk fills up after the start
    wav, spec = np.zeros(1600, np.float32), np.zeros((20, 257), np.float32)
    for step in range(1, 4):  # 12 events a validation: more than tensorboardX's queue holds
        writer.log_training(0.1, step)
        writer.log_evaluation(0.1, 1.0, wav, wav, wav, spec, spec, spec, spec, step)
    writer.close()
    print("trained on")
    return 0

run_cli(main)
"""


def test_tensorboard_on_a_full_disk_neither_hangs_nor_prints_a_traceback(tmp_path):
    """tensorboardX's writer thread dies at the first failed write; events added after it, and the
    exit, used to wait for it forever."""
    proc = subprocess.run([sys.executable, "-c", WRITER_ON_A_FULL_DISK, str(TINY), str(tmp_path / "logs")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout == "trained on\n", proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("TensorBoard logging stopped") == 1, proc.stderr
