"""How many CPU threads torch uses, and how its idle threads wait, chosen once per process.

PyTorch's CPU threads (OpenMP) spin while they wait for each other. When another process holds a
core, the thread that shares it runs only in the other's time slices and the others spin for it:
a tiny training step went from 1.0 s to 15-17 s with one busy single-threaded process beside it
on 2 cores (docs/perf-log.md). So, unless ``--threads`` or ``OMP_NUM_THREADS`` says otherwise:

* the thread count is the cores less those other processes keep busy, measured from the CPU times
  of the system and of this process while it imports torch (``psutil``): all of them on an idle
  machine;
* idle threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``, read by the OpenMP runtime
  when torch loads), so load that starts later costs its share of the CPU, not a collapse.

:func:`configure` runs before torch is imported (the wait policy is read then), from the commands'
entry points; :func:`apply` sets torch's count and says what was chosen and why. The decision
itself is :func:`choose`, a function of the core count, the busy cores and the flags.
"""
import logging
import math
import os
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

SAMPLE_SECONDS = 0.2     # the shortest window the other processes' load is measured over
BUSY_THRESHOLD = 0.5     # a core counts as taken when other processes keep it this busy on average


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    passive: bool
    reason: str


def choose(cores, busy, requested=None, env_threads=None, env_wait=None):
    """The thread count and wait policy for ``cores`` cores of which other processes keep ``busy``
    (in cores, 0..cores) busy; ``requested`` is ``--threads``, ``env_threads``/``env_wait`` the
    user's ``OMP_NUM_THREADS``/``OMP_WAIT_POLICY`` (None: unset). Passive waiting unless the user
    set a wait policy."""
    passive = env_wait is None or env_wait.strip().lower() == "passive"
    if requested is not None:
        return ThreadChoice(requested, passive, "--threads")
    if env_threads:
        try:
            return ThreadChoice(max(1, int(env_threads)), passive, "OMP_NUM_THREADS")
        except ValueError:
            pass  # torch itself ignores a value it cannot read: so do we
    taken = math.floor(busy + 1 - BUSY_THRESHOLD) if busy >= BUSY_THRESHOLD else 0
    threads = max(1, cores - taken)
    if taken:
        reason = f"{cores} cores, other processes keep {busy:.1f} of them busy"
    else:
        reason = f"{cores} cores, idle"
    return ThreadChoice(threads, passive, reason)


def usable_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class LoadProbe:
    """How many cores other processes keep busy, measured between :meth:`start` and :meth:`busy` from
    the system's and this process's CPU times, so that the imports between them are the measuring
    window (no wait of its own); at least ``SAMPLE_SECONDS`` long."""

    def start(self):
        import psutil

        self.wall, self.system, self.own = time.monotonic(), psutil.cpu_times(), psutil.Process().cpu_times()
        return self

    def busy(self):
        import psutil

        elapsed = time.monotonic() - self.wall
        if elapsed < SAMPLE_SECONDS:
            time.sleep(SAMPLE_SECONDS - elapsed)
            elapsed = time.monotonic() - self.wall
        system, own = psutil.cpu_times(), psutil.Process().cpu_times()
        idle = ("idle", "iowait")
        busy_all = sum(getattr(system, f) - getattr(self.system, f) for f in system._fields if f not in idle)
        mine = (own.user - self.own.user) + (own.system - self.own.system)
        return max(0.0, (busy_all - mine) / elapsed)


_request = None   # (requested, env_threads, env_wait, LoadProbe or None) from configure()
_choice = None


def configure(requested=None):
    """Before torch is imported: put the wait policy in the environment (read by the OpenMP runtime
    torch loads, and by the processes this one starts) and start measuring the load; the count is
    decided by :func:`apply` (the imports in between are the measuring window)."""
    global _request, _choice
    from reverse_voicefilter.core.errors import UserError

    if requested is not None and requested < 1:
        raise UserError(f"--threads must be at least 1, got {requested}")
    env_threads, env_wait = os.environ.get("OMP_NUM_THREADS"), os.environ.get("OMP_WAIT_POLICY")
    probe = LoadProbe().start() if requested is None and not env_threads else None
    _request, _choice = (requested, env_threads, env_wait, probe), None
    if env_wait is None:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def current():
    """The ``--threads`` this process was configured for, as ``(requested,)``; None before :func:`configure`."""
    return None if _request is None else _request[:1]


def decide():
    """The :class:`ThreadChoice` of this process (configured now if it was not)."""
    global _choice
    if _request is None:
        configure()
    if _choice is None:
        requested, env_threads, env_wait, probe = _request
        _choice = choose(usable_cores(), probe.busy() if probe else 0.0, requested, env_threads, env_wait)
    return _choice


def apply(log=None):
    """Set torch's intra-op thread count to the choice and log it with its reason; returns the count."""
    import torch

    choice = decide()
    torch.set_num_threads(choice.threads)
    (log or logger).info("using %d CPU thread(s) (%s; idle threads %s)%s", choice.threads, choice.reason,
                         "sleep" if choice.passive else "spin", "" if choice.reason == "--threads" else
                         "; --threads N to change")
    return choice.threads
