"""The thread count and wait policy chosen for a core count and a load (core/threads.py)."""
import os
import subprocess
import sys

import pytest

from reverse_voicefilter.core import threads
from reverse_voicefilter.core.errors import UserError


@pytest.mark.parametrize("cores, busy, expected", [
    (2, 0.0, 2), (2, 0.3, 2), (2, 0.6, 1), (2, 1.0, 1), (2, 1.9, 1), (2, 2.0, 1),
    (16, 0.0, 16), (16, 3.2, 13), (16, 12.5, 3), (16, 16.0, 1), (1, 0.9, 1),
])
def test_the_count_is_the_cores_other_processes_leave(cores, busy, expected):
    choice = threads.choose(cores, busy)
    assert choice.threads == expected and choice.passive
    assert ("idle" in choice.reason) == (busy < threads.BUSY_THRESHOLD)


def test_threads_flag_and_environment_override_the_load():
    assert threads.choose(2, 1.8, requested=2) == threads.ThreadChoice(2, True, "--threads")
    assert threads.choose(16, 0.0, env_threads="4").threads == 4
    assert threads.choose(16, 0.0, requested=3, env_threads="4").threads == 3   # the flag wins
    assert threads.choose(16, 0.0, env_threads="many").threads == 16           # unreadable: ignored
    assert not threads.choose(2, 0.0, env_wait="active").passive               # the user's wait policy stays
    assert threads.choose(2, 0.0, env_wait="PASSIVE").passive


def test_configure_refuses_zero_and_sets_the_wait_policy_for_torch(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with pytest.raises(UserError, match="--threads must be at least 1, got 0"):
        threads.configure(0)
    threads.configure(1)
    assert threads.decide().threads == 1 and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_the_load_probe_leaves_out_this_process_own_work(monkeypatch):
    """Other processes' busy cores: the system's busy time less this process's, over the window."""
    from collections import namedtuple

    import psutil

    System, Own = namedtuple("System", "user system idle iowait"), namedtuple("Own", "user system")
    clock = iter([100.0, 100.5])
    system = iter([System(10.0, 2.0, 50.0, 0.0), System(10.7, 2.3, 50.0, 0.0)])  # 1.0 s busy in 0.5 s
    own = iter([Own(1.0, 0.1), Own(1.4, 0.2)])                                    # 0.5 s of it ours
    monkeypatch.setattr(threads.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(psutil, "cpu_times", lambda: next(system))
    monkeypatch.setattr(psutil, "Process", lambda: type("P", (), {"cpu_times": lambda self: next(own)})())
    probe = threads.LoadProbe().start()
    assert probe.busy() == pytest.approx(1.0)  # (1.0 - 0.5) s of others' work in 0.5 s: one core


def test_a_command_logs_what_it_chose_and_why(tmp_path):
    """The choice is made before torch loads (its OpenMP reads the wait policy then) and logged."""
    code = ("import os; from reverse_voicefilter.core import threads; threads.configure(None); import torch, logging; "
            "logging.basicConfig(level=logging.INFO); n = threads.apply(); "
            "print(n, torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    n, torch_n, policy = done.stdout.split()
    assert n == torch_n and policy == "PASSIVE" and 1 <= int(n) <= os.cpu_count()
    assert "CPU thread(s) (" in done.stderr and "idle threads sleep" in done.stderr


def test_the_benchmark_measures_each_setting_in_its_own_process(tmp_path):
    """bench.threads end to end at its smallest: the fixed setting runs the threads it names, the
    commands' default decides by itself and says why; a busy process it starts does not outlive it."""
    import json
    import subprocess
    import sys

    out = tmp_path / "threads.json"
    done = subprocess.run([sys.executable, "-m", "reverse_voicefilter.bench.threads", "--sizes", "tiny", "--workloads",
                           "separate", "--settings", "one", "auto", "--loads", "0", "1", "--steps", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    for load in (0, 1):
        one, auto = results[f"separate/tiny/one/{load}"], results[f"separate/tiny/auto/{load}"]
        assert one["threads"] == 1 and one["seconds"] > 0 and one["reason"] == "OMP_NUM_THREADS=1"
        assert auto["threads"] >= 1 and auto["seconds"] > 0 and "OMP_NUM_THREADS" not in auto["reason"]
    leftover = subprocess.run(["pgrep", "-f", "while os.getppid"], capture_output=True, text=True).stdout.split()
    assert not leftover
