"""The project as an installed package: a wheel built from the repository's files, installed into a
fresh virtual environment outside the repository, runs its commands from any folder, with its
configs and the demo checkpoint as package data."""
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import tone

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["voicefilter-generate", "voicefilter-train", "voicefilter-separate", "voicefilter-evaluate",
            "voicefilter-train-embedder", "voicefilter-evaluate-embedder", "voicefilter-demo",
            "voicefilter-download-librispeech", "voicefilter-normalize", "voicefilter-demo-corpus"]


def tracked_copy(dest):
    """The files git tracks (what a user's clone or sdist holds), nothing built or ignored."""
    listing = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    for name in filter(None, listing.decode().split("\0")):
        source = ROOT / name
        if source.is_file() and not source.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
        elif source.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).symlink_to(source.readlink())
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """bin/ of a fresh venv holding the package installed from a wheel (a plain `pip install .`,
    not editable); the dependencies come from this venv through a path line, so nothing is
    downloaded."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    work = tmp_path_factory.mktemp("package")
    source = tracked_copy(work / "source")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(work / "wheels"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    env = work / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=60)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))
    # our site folder as a path line: its packages are seen, its .pth files (the editable install) are not
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    wheel = next((work / "wheels").glob("reverse_voicefilter-*.whl"))
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "-q",
                           "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return env / "bin", site


def run(bin_dir, args, cwd, timeout=300):
    return subprocess.run([str(bin_dir / args[0]), *map(str, args[1:])], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(cwd)})


@pytest.mark.slow
def test_installed_package_is_the_one_imported_and_carries_its_data(installed, tmp_path):
    bin_dir, site = installed
    done = run(bin_dir, ["python", "-c", "import reverse_voicefilter as p; print(p.__file__)"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).is_relative_to(site)  # not the repository's copy
    package = site / "reverse_voicefilter"
    for name in ("default.yaml", "tiny.yaml", "small.yaml", "ge2e-defaults.yaml"):
        assert (package / "config" / name).is_file(), name
    assert (package / "assets" / "demo-tiny-6000.pt").stat().st_size > 100_000


@pytest.mark.slow
def test_every_console_command_starts_from_any_folder(installed, tmp_path):
    bin_dir, _ = installed
    for command in COMMANDS:
        done = run(bin_dir, [command, "--help"], tmp_path, timeout=120)
        assert done.returncode == 0, (command, done.stderr[-1000:])
        assert "usage:" in done.stdout, command


@pytest.mark.slow
def test_installed_separate_runs_the_shipped_demo_checkpoint(installed, tmp_path):
    """A real separation by the installed command, outside the repository, with the checkpoint that
    ships inside the package."""
    bin_dir, site = installed
    mixed = tone(2.0, freq=220.0, seed=1) + tone(2.0, freq=330.0, seed=2)
    sf.write(tmp_path / "mixed.wav", mixed, 16000)
    sf.write(tmp_path / "reference.wav", tone(2.0, freq=220.0, seed=3), 16000)
    checkpoint = site / "reverse_voicefilter" / "assets" / "demo-tiny-6000.pt"
    done = run(bin_dir, ["voicefilter-separate", "--checkpoint_path", checkpoint, "-m", "mixed.wav",
                         "-r", "reference.wav", "-o", "out", "--threads", "1"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result, rate = sf.read(tmp_path / "out" / "result.wav")
    assert rate == 16000 and len(result) == len(mixed) and np.isfinite(result).all() and np.abs(result).max() > 0
