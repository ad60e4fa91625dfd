"""normalize-resample.sh and prepare.normalize: 16 kHz mono -norm.wav next to every .flac."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from prepare import normalize

pytest.importorskip("ffmpeg_normalize")
if not shutil.which("ffmpeg"):
    pytest.importorskip("imageio_ffmpeg")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "utils" / "normalize-resample.sh"
VENV_BIN = str(Path(sys.executable).parent)
NAMES = ["1/10/1-10-0000", "1/10/1-10-0001", "2/20/with space"]


def write_flac(path, seconds, seed):
    """Stereo 44.1 kHz tone plus noise, like a file that needs resampling and downmixing."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 44100)) / 44100
    left = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(t.size)
    right = 0.2 * np.sin(2 * np.pi * 330 * t) + 0.01 * rng.standard_normal(t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.stack([left, right], axis=1), 44100)


@pytest.fixture
def tree(tmp_path):
    """A small LibriSpeech-like folder of .flac files, with the script copied in as users do."""
    for i, name in enumerate(NAMES):
        write_flac(tmp_path / f"{name}.flac", 0.6 + 0.3 * i, seed=i)
    shutil.copy(SCRIPT, tmp_path / "normalize-resample.sh")
    return tmp_path


def outputs(root):
    return sorted(Path(root).rglob("*-norm.wav"))


def assert_all_normalized(root, names=NAMES):
    for name in names:
        out = Path(root) / f"{name}-norm.wav"
        info = sf.info(out)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16"), out
        assert info.frames > 0
    assert not list(Path(root).rglob("*.partial.wav"))


def run_script(root, *args, path=None, **env):
    """Run the copied script from inside `root` with bash, as `./normalize-resample.sh` would."""
    full_env = {**os.environ, "PATH": path or f"{VENV_BIN}:/usr/bin:/bin", **env}
    full_env.pop("FFMPEG_PATH", None)  # the script must find ffmpeg itself
    return subprocess.run(["bash", "normalize-resample.sh", *args], cwd=root, env=full_env,
                          capture_output=True, text=True, timeout=120)


def test_script_normalizes_everything(tree):
    result = run_script(tree, "-j", "2")
    assert result.returncode == 0, result.stderr
    assert_all_normalized(tree)  # checked right after return: no job still running
    assert "3 normalized, 0 skipped, 0 failed" in result.stderr


def test_script_rerun_skips_done_files(tree):
    assert run_script(tree).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in outputs(tree)}
    result = run_script(tree)
    assert result.returncode == 0
    assert "0 to do, 3 already done" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in outputs(tree)} == before


def test_script_names_failed_files(tree):
    (tree / "2" / "20" / "broken.flac").write_bytes(b"not a flac" * 10)
    result = run_script(tree, "-j", "2")
    assert result.returncode == 1
    assert "broken.flac" in result.stderr.splitlines()[-1]
    assert_all_normalized(tree)  # the other files were still done
    assert not (tree / "2" / "20" / "broken-norm.wav").exists()


def test_script_finds_tools_without_path(tree):
    """No venv on PATH: ffmpeg-normalize via $PYTHON -m, ffmpeg from the imageio-ffmpeg wheel."""
    result = run_script(tree, path="/usr/bin:/bin", PYTHON=sys.executable, N="1")
    assert result.returncode == 0, result.stderr
    assert "1 parallel jobs" in result.stderr
    assert_all_normalized(tree)


def test_script_waits_for_slow_jobs(tree):
    """A slow ffmpeg-normalize stand-in: the original script returned before such jobs ended."""
    fake = tree / "fakebin"
    fake.mkdir()
    (fake / "ffmpeg-normalize").write_text('#!/bin/bash\nsleep 1\nprintf RIFF > "${@: -1}"\n')
    (fake / "ffmpeg-normalize").chmod(0o755)
    start = time.monotonic()
    result = run_script(tree, "-j", "3", path=f"{fake}:{VENV_BIN}:/usr/bin:/bin")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - start >= 1.0
    assert len(outputs(tree)) == 3
    assert not list(tree.rglob("*.partial.wav"))


@pytest.mark.parametrize("args", [["-j", "0"], ["-j", "x"], ["-z"], ["no-such-folder"]])
def test_script_bad_arguments(tree, args):
    result = run_script(tree, *args)
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1
    assert outputs(tree) == []


def test_python_normalizes_skips_and_reports(tree):
    summary = normalize.normalize_tree(tree, jobs=2, progress=False)
    assert (len(summary.normalized), len(summary.skipped), summary.failed) == (3, 0, {})
    assert_all_normalized(tree)
    before = {p: p.stat().st_mtime_ns for p in outputs(tree)}
    (tree / "1" / "broken.flac").write_bytes(b"junk" * 20)
    summary = normalize.normalize_tree(tree, jobs=2, progress=False)
    assert (len(summary.normalized), len(summary.skipped)) == (0, 3)
    assert list(summary.failed) == [tree / "1" / "broken.flac"]
    assert {p: p.stat().st_mtime_ns for p in outputs(tree)} == before
    assert not list(tree.rglob("*.partial.wav"))


def run_python_cli(*args):
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    env.pop("FFMPEG_PATH", None)
    return subprocess.run([sys.executable, "-m", "prepare.normalize", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_python_cli(tree):
    (tree / "1" / "broken.flac").write_bytes(b"junk" * 20)
    result = run_python_cli(str(tree), "-j", "2", "-q")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 file(s) failed") and "broken.flac" in last
    assert_all_normalized(tree)
    missing = run_python_cli(str(tree / "nope"))
    assert missing.returncode == 2 and missing.stderr.startswith("error: no such folder")
