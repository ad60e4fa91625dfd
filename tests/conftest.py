"""Shared test helpers: paths to ../shared data and small audio makers."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared"
PARITY = SHARED / "fixtures" / "original-parity"
LIBRI_MINI = SHARED / "data" / "librispeech-mini"


IN_CI = os.environ.get("CI", "").lower() == "true"


def need(path):
    """Skip the test cleanly when ../shared (or a part of it) is absent on a user's clone; under
    CI=true its absence is a failure, so a green CI means the parity and real-speech tests ran."""
    if not Path(path).exists():
        if IN_CI:
            pytest.fail(f"{path} is missing, and CI=true requires ../shared")
        pytest.skip(f"{path} is not available")
    return Path(path)


@pytest.fixture
def parity_dir():
    return need(PARITY)


@pytest.fixture
def libri_mini():
    return need(LIBRI_MINI)


def tone(seconds=1.0, rate=16000, freq=220.0, amp=0.3, seed=0):
    """A harmonic tone with a little noise: enough structure for STFT tests."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wav = sum(amp / k * np.sin(2 * np.pi * freq * k * t) for k in range(1, 6))
    return (wav + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def disk_full_at_flush(monkeypatch, name_part):
    """Make core.atomic's flush of any temporary whose name holds ``name_part`` fail with ENOSPC, as
    a disk that fills up while the file is written."""
    from reverse_voicefilter.core import atomic

    real_fsync = atomic._fsync

    def fsync_until_full(path, folder=False):
        if not folder and name_part in str(path):
            raise OSError(28, "No space left on device")
        return real_fsync(path, folder)

    monkeypatch.setattr(atomic, "_fsync", fsync_until_full)
