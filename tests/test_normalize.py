"""normalize-resample.sh and reverse_voicefilter.prepare.normalize: 16 kHz mono -norm.wav next to every .flac."""
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from reverse_voicefilter.core.atomic import is_temporary
from reverse_voicefilter.prepare import normalize

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
    assert leftovers(root) == []


def leftovers(root):
    """Temporaries or partial outputs: there must be none once a run has returned."""
    return [p for p in Path(root).rglob("*") if is_temporary(p.name) or p.name.endswith(".partial.wav")]


def script_env(path=None, **env):
    """The environment of a user's shell: PATH starting with the venv; `env` may unset a name with None."""
    full_env = {**os.environ, "PATH": path or f"{VENV_BIN}:/usr/bin:/bin", "VOICEFILTER_HOME": str(ROOT), **env}
    full_env.pop("FFMPEG_PATH", None)  # the script must find ffmpeg itself
    return {k: v for k, v in full_env.items() if v is not None}


def run_script(root, *args, path=None, **env):
    """Run the copied script from inside `root` with bash, as `./normalize-resample.sh` would."""
    return subprocess.run(["bash", "normalize-resample.sh", *args], cwd=root, env=script_env(path, **env),
                          capture_output=True, text=True, timeout=120)


def make_venv(folder, with_package=True):
    """A venv at `folder` (as `python -m venv .venv` makes) that sees this venv's packages: all of
    them, this project's installed one too, or (``with_package=False``) the others only (its
    site folder points at ours through a path line, which leaves our .pth files, the editable
    install among them, unread)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=60)
    own = Path(sysconfig.get_path("purelib", vars={"base": str(folder), "platbase": str(folder)}))
    shutil.rmtree(own)
    if with_package:
        own.symlink_to(sysconfig.get_path("purelib"))
    else:
        own.mkdir()
        (own / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return folder / "bin"


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
    assert leftovers(tree) == []


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
    assert leftovers(tree) == []


def test_incomplete_outputs_are_done_again(tree):
    """An existing -norm.wav was taken as done whatever it held: a 0-byte or cut-short file stayed."""
    assert normalize.normalize_tree(tree, jobs=2, progress=False).failed == {}
    complete = {name: (tree / f"{name}-norm.wav").read_bytes() for name in NAMES}
    empty, cut, kept = (tree / f"{name}-norm.wav" for name in NAMES)
    empty.write_bytes(b"")
    cut.write_bytes(complete[NAMES[1]][:len(complete[NAMES[1]]) // 2])  # soundfile alone still opens it
    before = kept.stat().st_mtime_ns
    summary = normalize.normalize_tree(tree, jobs=2, progress=False)
    assert summary.normalized == [tree / f"{NAMES[0]}.flac", tree / f"{NAMES[1]}.flac"]
    assert summary.skipped == [tree / f"{NAMES[2]}.flac"] and summary.failed == {}
    assert kept.stat().st_mtime_ns == before
    assert_all_normalized(tree)
    assert {name: (tree / f"{name}-norm.wav").read_bytes() for name in NAMES} == complete


def complete_wav(path, frames=1600):
    sf.write(path, 0.1 * np.sin(np.arange(frames) / 5), 16000, subtype="PCM_16")
    return path.read_bytes()


@pytest.mark.parametrize("case", ["empty", "junk", "header only", "cut short", "one byte short", "no frames",
                                  "huge declared size"])
def test_incomplete_reason_reads_the_header(tmp_path, case):
    wav = tmp_path / "a-norm.wav"
    data = complete_wav(wav)
    assert normalize.incomplete_reason(wav) is None
    broken = {"empty": b"", "junk": b"not a wav file" * 10, "header only": data[:44], "cut short": data[:1000],
              "one byte short": data[:-1], "no frames": data[:40] + (0).to_bytes(4, "little"),
              "huge declared size": data[:40] + (2 ** 32 - 1).to_bytes(4, "little") + data[44:]}[case]
    wav.write_bytes(broken)
    assert normalize.incomplete_reason(wav), case


def run_python_cli(*args):
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    env.pop("FFMPEG_PATH", None)
    return subprocess.run([sys.executable, "-m", "reverse_voicefilter.prepare.normalize", *args], cwd=ROOT, env=env,
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


def test_script_runs_in_place_on_a_folder(tree, tmp_path_factory):
    """utils/normalize-resample.sh ROOT, from anywhere: it finds the repository by its own location."""
    elsewhere = tmp_path_factory.mktemp("cwd")
    result = subprocess.run(["bash", str(SCRIPT), "-j", "2", str(tree)], cwd=elsewhere,
                            env=script_env(VOICEFILTER_HOME=None), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert_all_normalized(tree)


def test_copied_script_finds_the_repository_through_the_activated_venv(tree, tmp_path_factory):
    """The original's workflow: `./normalize-resample.sh` in the LibriSpeech root, the venv made
    inside the repository (as the README and the Makefile do) activated, nothing else set."""
    clone = tmp_path_factory.mktemp("clone")
    for part in ("reverse_voicefilter", "utils"):
        (clone / part).symlink_to(ROOT / part)
    venv_bin = make_venv(clone / ".venv", with_package=False)
    result = run_script(tree, "-j", "2", path=f"{venv_bin}:/usr/bin:/bin", VOICEFILTER_HOME=None)
    assert result.returncode == 0, result.stderr
    assert_all_normalized(tree)


def test_copied_script_runs_with_the_package_installed_in_any_environment(tree, tmp_path_factory):
    """A user's own environment (a venv or conda outside the repository) where the package was
    pip-installed: the copied script needs nothing else (it failed before, wanting VOICEFILTER_HOME)."""
    venv_bin = make_venv(tmp_path_factory.mktemp("own-env") / "env")
    result = run_script(tree, "-j", "2", path=f"{venv_bin}:/usr/bin:/bin", VOICEFILTER_HOME=None)
    assert result.returncode == 0, result.stderr
    assert_all_normalized(tree)


def test_copied_script_without_the_package_says_what_to_do(tree, tmp_path_factory):
    venv_bin = make_venv(tmp_path_factory.mktemp("elsewhere") / ".venv", with_package=False)  # not in a clone
    result = run_script(tree, path=f"{venv_bin}:/usr/bin:/bin", VOICEFILTER_HOME=None)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "has no reverse_voicefilter package: pip install" in result.stderr
    assert "VOICEFILTER_HOME" in result.stderr and result.stderr.count("\n") == 1
    wrong = run_script(tree, VOICEFILTER_HOME=str(tree))
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1
    assert wrong.stderr.startswith(f"error: VOICEFILTER_HOME={tree} holds no reverse_voicefilter/prepare/normalize.py")
    assert outputs(tree) == []


def test_zero_jobs_is_refused(tree):
    result = run_python_cli(str(tree), "-j", "0")
    assert result.returncode == 2
    assert result.stderr.startswith("error: -j must be at least 1") and result.stderr.count("\n") == 1
    assert outputs(tree) == []
    with pytest.raises(normalize.UserError):
        normalize.normalize_tree(tree, jobs=0)


def test_folder_without_flac_is_a_warning_and_exit_1(tmp_path):
    (tmp_path / "1" / "10").mkdir(parents=True)
    (tmp_path / "1" / "10" / "1-10-0000.wav").write_bytes(b"RIFF")  # not what it looks for
    result = run_python_cli(str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("warning: no .flac file below")
    assert str(tmp_path) in result.stderr and "*.flac" in result.stderr
    shutil.copy(SCRIPT, tmp_path / "normalize-resample.sh")
    script = run_script(tmp_path)
    assert script.returncode == 1 and script.stderr.startswith("warning: no .flac file below .")


def test_ctrl_c_cancels_the_files_not_started(tmp_path):
    """Before, Ctrl-C let the pool go on through every queued file."""
    for i in range(8):
        write_flac(tmp_path / f"1/10/1-10-{i:04d}.flac", 0.2, seed=i)
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "ffmpeg-normalize").write_text('#!/bin/bash\nsleep 0.5\nprintf RIFF > "${@: -1}"\n')
    (fake / "ffmpeg-normalize").chmod(0o755)
    env = script_env(path=f"{fake}:/usr/bin:/bin")
    # Ctrl-C's default disposition in the child: an ignored SIGINT is inherited (seen in a full-suite run:
    # the child ignored it and finished every file, exit 0), and Python only handles one it finds at default
    process = subprocess.Popen([sys.executable, "-m", "reverse_voicefilter.prepare.normalize", str(tmp_path / "1"),
                                "-j", "1", "-q"],
                               cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not outputs(tmp_path) and time.monotonic() < deadline:  # interrupt once work has begun
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert len(outputs(tmp_path)) < 6
    assert leftovers(tmp_path) == []
