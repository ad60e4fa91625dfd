"""How many CPU threads torch uses, and how its idle threads wait, chosen once per process.

PyTorch's CPU threads (OpenMP) spin while they wait for each other. When another process holds a
core, the thread that shares it runs only in the other's time slices and the others spin for it:
a tiny training step went from 1.0 s to 15-17 s with one busy single-threaded process beside it
on 2 cores (docs/perf-log.md). So, unless ``--threads`` or ``OMP_NUM_THREADS`` says otherwise:

* the thread count is the cores less those other processes keep busy, measured over a fifth of a
  second at start (``psutil``; our process is idle then): all of them on an idle machine;
* idle threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``, read by the OpenMP runtime
  when torch loads), so load that starts later costs its share of the CPU, not a collapse.

:func:`configure` runs before torch is imported (the wait policy is read then), from the commands'
entry points; :func:`apply` sets torch's count and says what was chosen and why. The decision
itself is :func:`choose`, a function of the core count, the busy cores and the flags.
"""
import logging
import math
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)

SAMPLE_SECONDS = 0.2     # how long the other processes' load is measured at start
BUSY_THRESHOLD = 0.5     # a core counts as taken when other processes keep it this busy on average


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    passive: bool
    reason: str
    requested: int | None = None  # the --threads it was made for


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


def busy_cores(seconds=SAMPLE_SECONDS):
    """How many cores other processes keep busy, measured over ``seconds`` (this process sleeps)."""
    import psutil

    percent = psutil.cpu_percent(interval=seconds)
    return (psutil.cpu_count() or 1) * percent / 100


_choice = None


def configure(requested=None):
    """Decide once, before torch is imported: the count for :func:`apply` and the wait policy in the
    environment (so the OpenMP runtime torch loads, and the processes this one starts, sleep when
    idle). Returns the :class:`ThreadChoice`."""
    global _choice
    from reverse_voicefilter.core.errors import UserError

    if requested is not None and requested < 1:
        raise UserError(f"--threads must be at least 1, got {requested}")
    env_threads, env_wait = os.environ.get("OMP_NUM_THREADS"), os.environ.get("OMP_WAIT_POLICY")
    measured = requested is None and not env_threads
    _choice = choose(usable_cores(), busy_cores() if measured else 0.0, requested, env_threads, env_wait)
    _choice = ThreadChoice(_choice.threads, _choice.passive, _choice.reason, requested)
    if _choice.passive and env_wait is None:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return _choice


def current():
    """The choice made by :func:`configure` in this process (None before)."""
    return _choice


def apply(log=None):
    """Set torch's intra-op thread count to the choice (made now if :func:`configure` was not called)
    and log it with its reason; returns the count."""
    import torch

    choice = _choice or configure()
    torch.set_num_threads(choice.threads)
    (log or logger).info("using %d CPU thread(s) (%s; idle threads %s)%s", choice.threads, choice.reason,
                         "sleep" if choice.passive else "spin", "" if choice.reason == "--threads" else
                         "; --threads N to change")
    return choice.threads
