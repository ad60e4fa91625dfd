"""demo.py: the whole pipeline from the shipped checkpoint, its quality, its bad flags."""
import json
import subprocess
import sys

import pytest
from conftest import ROOT

from reverse_voicefilter.commands import demo

DEMO = [sys.executable, str(ROOT / "demo.py")]


def run_demo(*args, **kwargs):
    return subprocess.run([*DEMO, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          **kwargs)


@pytest.mark.slow
def test_demo_continues_the_shipped_checkpoint_and_separates(tmp_path):
    out = tmp_path / "demo"
    result = run_demo("--out", out, "--steps", 2, "--train_size", 16, "--test_size", 16)
    assert result.returncode == 0, result.stderr[-2000:]
    last = demo.PRETRAINED_STEPS + 2
    assert (out / "chkpt" / "demo" / f"chkpt_{last}.pt").is_file()
    for mode in ("org", "inv_sub", "inv_div"):
        assert (out / "inference" / mode / "result.wav").is_file()
        assert (out / "inference" / mode / "result.png").is_file()
    report = json.loads((out / "evaluation" / "report.json").read_text())
    org = report["modes"]["org"]
    assert org["count"] == 16
    # the point of the shipped checkpoint: a real gain on unseen demo speakers
    assert org["sdr_gain"]["mean"] > 0.5 and org["sdr_gain"]["median"] > 0.3, org["sdr_gain"]
    assert "different from checkpoint" not in result.stderr  # only the data folders differ
    assert f"chkpt_{last}.pt" in result.stdout and "TensorBoard" in result.stdout


def test_demo_bad_flags_are_one_line(tmp_path):
    result = run_demo("--steps", 0, "--out", tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: --steps")
    result = run_demo("--from_scratch", "maybe", "--out", tmp_path)
    assert result.returncode == 2 and "expected a boolean" in result.stderr
    assert not any(tmp_path.iterdir())  # nothing started


def test_demo_without_the_shipped_checkpoint_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "PRETRAINED", tmp_path / "absent.pt")
    assert demo.main(["--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "absent.pt is missing" in err[0] and "--from_scratch" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["export under a file", "export is a folder", "out is a file", "out under a file"])
def test_demo_bad_output_paths_are_one_line_before_any_step(tmp_path, monkeypatch, capsys, case):
    """--export under a regular file was found only after the whole pipeline had run, as a traceback."""
    from test_inference import run_main

    blocker = tmp_path / "somefile.txt"
    blocker.write_text("a file, not a folder")
    (tmp_path / "folder").mkdir()
    out = tmp_path / "out"
    args, flag = {"export under a file": (["--out", out, "--export", blocker / "out.pt"], "--export"),
                  "export is a folder": (["--out", out, "--export", tmp_path / "folder"], "--export"),
                  "out is a file": (["--out", blocker], "--out"),
                  "out under a file": (["--out", blocker / "sub" / "demo"], "--out")}[case]
    monkeypatch.setattr(demo, "run", lambda step, _args: pytest.fail(f"step {step!r} ran"))
    code, _, err = run_main(demo.main, args, capsys)
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], err
    assert not out.exists()  # refused before anything was written under --out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "somefile.txt"]


def test_shipped_checkpoint_fits_the_demo_config():
    from reverse_voicefilter.core.checkpoint import load_checkpoint, load_model_weights
    from reverse_voicefilter.core.hparams import HParam
    from reverse_voicefilter.model.model import VoiceFilter

    state = load_checkpoint(demo.PRETRAINED)
    assert state["step"] == demo.PRETRAINED_STEPS
    hp = HParam(demo.CONFIG)
    load_model_weights(VoiceFilter(hp), state["model"], demo.PRETRAINED)  # raises if it does not fit
    assert HParam.from_string(state["hp_str"]).audio == hp.audio  # the same spectrograms
