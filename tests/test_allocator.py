"""reverse_voicefilter/core/allocator.py: freed activations are reused, not page-faulted afresh (no timing)."""
import subprocess
import sys

import pytest
from conftest import ROOT

# Allocates and frees 256 MB four times (numpy: plain malloc) and prints each round's page faults.
FAULTS = """
import resource, sys
from reverse_voicefilter.core.allocator import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
import numpy as np
rounds = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = np.ones(64 * 2**20, dtype=np.float32)
    rounds.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del x
print(*rounds)
"""


def faults_per_round(mode):
    proc = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [int(n) for n in proc.stdout.split()]


def test_freed_memory_is_reused_instead_of_faulted_in_again():
    default, reuse = faults_per_round("default"), faults_per_round("reuse")
    assert all(n > 0 for n in default)  # glibc's default: unmapped when freed, faulted in again
    assert reuse[0] > 0 and reuse[1:] == [0, 0, 0]


@pytest.mark.parametrize("command, asks", [("inference", True), ("evaluate", False), ("trainer", False)])
def test_inference_keeps_freed_memory_and_trainer_leaves_it_to_the_config(command, asks, monkeypatch):
    """The command line's entry point switches the allocator (inference.py) or leaves it alone (the
    trainer: train.keep_freed_memory decides; evaluate.py); the real switch would change this test
    process's allocator for the rest of the suite, so the call is recorded instead."""
    import importlib

    import reverse_voicefilter.core.allocator as allocator

    calls = []
    monkeypatch.setattr(allocator, "reuse_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(sys, "argv", [f"{command}.py", "--help"])
    module = importlib.import_module(f"reverse_voicefilter.commands.{command}")
    with pytest.raises(SystemExit) as done:
        module.console()
    assert done.value.code == 0
    assert calls == ([1] if asks else [])
