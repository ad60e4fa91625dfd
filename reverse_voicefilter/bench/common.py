"""Shared pieces of the benchmarks: machine description, one subprocess per variant, timing, tables.

Every benchmark script runs its variants side by side in one invocation, each in a fresh
subprocess: the script re-invokes itself with ``--variant NAME``, the child prints one line
``BENCH_RESULT {json}`` and exits. A fresh process per variant makes the peak memory a
per-variant figure, keeps one variant's caches (oneDNN primitives, allocator pools) out of
the next one's timings, and lets a slow variant be stopped by ``--timeout`` without losing
the others. Absolute times on a shared machine vary from run to run; the ratios against the
baseline (fp32, or -p 1), measured minutes apart on the same machine, are what to report.
"""
import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from reverse_voicefilter.bench import machine

ROOT = Path(__file__).resolve().parents[2]  # the repository: its root scripts are what the benchmarks run
PACKAGE = ROOT / "reverse_voicefilter"
OUT = ROOT / "bench-out"  # what the benchmarks write by default (their work folders, the GPU payload)

RESULT_TAG = "BENCH_RESULT "
PARTIAL_TAG = "BENCH_PARTIAL "
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "librispeech-mini"


# ---- command line --------------------------------------------------------------------------------
def base_parser(description):
    """The flags every benchmark shares; the internal ``--variant`` marks a child process."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to compute")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results to this JSON file")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per variant before it is stopped")
    p.add_argument("--quick", action="store_true", help="tiny config and sizes: a check that it works")
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME", help="run only these variants")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per variant (OMP_NUM_THREADS; default: torch's, all cores). On a machine "
                        "where other jobs run, fewer threads than cores avoids OpenMP spin-wait slowdowns")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: run one variant (child)
    return p


def parse(parser):
    """Parse the flags and apply ``--threads`` before torch is imported (children inherit it)."""
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    return args


def add_allocator_flag(p, default_help):
    """``--allocator``; left out, the benchmark does what the script it measures does (set_allocator)."""
    p.add_argument("--allocator", default=None, choices=["reuse", "glibc"],
                   help="reuse: freed memory kept for reuse (core/allocator.py); glibc: the C library's "
                        f"defaults; an A/B of that setting (default: {default_help})")


def set_allocator(args, default):
    """In a child: ``--allocator``, or where it is left out ``default``, the setting of the measured
    script (the peaks gain from it alike, so they get the same)."""
    if (args.allocator or default) == "reuse":
        from reverse_voicefilter.core.allocator import reuse_freed_memory

        reuse_freed_memory()


def pick(device_name):
    """``reverse_voicefilter.core.cli.pick_device``, with a missing device as a one-line error."""
    from reverse_voicefilter.core.cli import pick_device
    from reverse_voicefilter.core.errors import UserError
    try:
        return pick_device(device_name)
    except UserError as err:
        sys.exit(f"error: {err}")


# ---- memory ------------------------------------------------------------------------------------
def peak_rss_mb():
    """This process's peak resident memory, in MB. The kernel's high-water mark (getrusage's
    ru_maxrss, kB on Linux): psutil reports the current RSS only, which would miss the peak."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TreeMemory:
    """Samples a process and its descendants (generator workers) every ``interval`` s, with psutil.

    ``peak_mb``: the highest sum of their PSS (proportional set size: pages shared by forked
    workers, such as torch's, counted once; where the platform has no PSS, RSS); ``largest_mb``:
    the largest RSS of any one of them. Sampling can miss a short spike, or a worker that lives
    under ``interval``; the command's own exact peak comes from ``os.wait4`` (see run_tool).
    """

    def __init__(self, pid, interval=0.2):
        self.pid, self.interval, self.peak_mb, self.largest_mb = pid, interval, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self):
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        for proc in procs:
            try:
                mem = proc.memory_full_info()
            except psutil.Error:  # exited between the listing and the reading, or not ours to read
                continue
            total += getattr(mem, "pss", mem.rss)
            self.largest_mb = max(self.largest_mb, mem.rss / 2**20)
        self.peak_mb = max(self.peak_mb, total / 2**20)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


@dataclass
class ToolRun:
    seconds: float          # wall time of the whole command
    out: str
    err: str
    peak_rss_mb: float      # the command's own peak RSS (from wait4; its waited-for children's included)
    tree_pss_mb: float      # peak summed PSS of the command and all its descendants (sampled)
    largest_rss_mb: float   # largest peak RSS of any one process of the tree


def run_tool(cmd, cwd=ROOT):
    """Run a command as a user would (stdout/stderr to files, so that ``os.wait4`` can give its
    exact peak RSS); raises RuntimeError with the end of its stderr when it fails."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, stdout=out, stderr=err, text=True)
        with TreeMemory(proc.pid) as mem:
            _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{stderr[-3000:]}")
    rss = usage.ru_maxrss / 1024  # kB on Linux
    return ToolRun(seconds, stdout, stderr, rss, mem.peak_mb, max(rss, mem.largest_mb))


# ---- timing ------------------------------------------------------------------------------------
def synchronize(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device, warmup=1, repeats=3, on_repeat=None):
    """Seconds of each of ``repeats`` calls of ``fn()`` after ``warmup`` untimed ones (the first
    calls pay for kernel selection and allocation).

    Each call is timed alone, the device synchronized around it, with this process's thread count.
    Not ``torch.utils.benchmark.Timer``: its ``timeit(1)`` makes two more untimed calls first, which
    tripled a benchmark of default-size training steps of tens of seconds each on a CPU. The calls are
    timed one at a time: ``on_repeat(times so far)`` is called after each one, so a variant stopped by
    its timeout still reports the steps it finished.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        if on_repeat is not None:
            on_repeat(times)
    return times


def median(values):
    return statistics.median(values) if values else float("nan")


def process_stats(device):
    """End-of-variant figures of this (child) process: peak RSS, on CUDA the allocator's peak, and
    the machine's 1-minute load average (other jobs' load distorts CPU timings)."""
    import torch
    out = {"peak_rss_mb": round(peak_rss_mb(), 1), "load_1min": round(os.getloadavg()[0], 2)}
    if device.type == "cuda":
        out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


# ---- variants in subprocesses ------------------------------------------------------------------
def emit(result):
    """Child side: the one result line the parent reads."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def emit_partial(result):
    """Child side: figures so far (after each timed step); the parent shows the last one if the
    variant then runs out of time."""
    print(PARTIAL_TAG + json.dumps(result), flush=True)


def _last(out, tag):
    lines = [line for line in out.splitlines() if line.startswith(tag)]
    return json.loads(lines[-1][len(tag):]) if lines else None


def run_variants(module, names, argv, timeout, on_result=None):
    """Parent side: run ``python -m module argv --variant NAME`` for each name, one at a time, in a fresh
    process each; returns ``{name: result dict}``, and calls ``on_result(results so far)`` after each
    variant. A variant that fails or passes ``timeout`` seconds gives ``{"error": why}`` (with its
    last partial figures, if any) and the others still run. The child leads its own process group,
    so a timeout (or Ctrl-C here) also ends the tools it started; the scratch files they leave are
    under the parent's work folder."""
    results = {}
    for name in names:
        _run_one(module, name, argv, timeout, results)
        if on_result is not None:
            on_result(results)
    return results


def _run_one(module, name, argv, timeout, results):
    """One variant in its own process; its result (or why it has none) goes into ``results``."""
    cmd = [sys.executable, "-m", module, *argv, "--variant", name]
    print(f"  running {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()  # what it printed before (its partial results)
        partial = _last(out, PARTIAL_TAG)
        results[name] = {**(partial or {}), "error": f"timeout after {timeout:g} s", "partial": bool(partial)}
        print(f"  {name}: timeout after {timeout:g} s", file=sys.stderr, flush=True)
        return
    except BaseException:  # Ctrl-C: the child is in another session and would not get it
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    result = _last(out, RESULT_TAG)
    if proc.returncode != 0 or result is None:
        tail = "\n".join(err.strip().splitlines()[-15:])
        print(f"  {name} failed (exit {proc.returncode}):\n{tail}", file=sys.stderr, flush=True)
        last = err.strip().splitlines()[-1] if err.strip() else ""
        results[name] = {"error": f"failed (exit {proc.returncode}): {last[:120]}"}
        return
    results[name] = result
    print(f"  {name}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def start(args, run_variant, variants):
    """The shared start of every benchmark's ``main``. In a child (``--variant``): run that variant,
    print its result line, return None. In the parent: ``(device, variant names, machine info)``."""
    if args.variant:
        emit(run_variant(args, args.variant))
        return None
    device = pick(args.device)
    return device, select(args.variants, list(variants)), machine.describe_machine(device)


def run_benchmark(module, args, run_variant, variants, title, summarize, prepare=None, before=None,
                  workdir_prefix="bench_", shared_file="shared.json"):
    """The one ``main`` of the variant runners. In a child (``--variant``): run that variant and print its
    result. In the parent: ``before(device)`` (figures of the machine taken once, e.g. the peaks), then,
    where the variants share prepared files (a corpus, audio), ``prepare(workdir)`` -> a dict written to
    ``shared_file`` in a scratch folder the children get as ``--workdir``; then each variant in its own
    process. ``summarize(results, shared, before's figures, device)`` -> ``(table, notes, payload)``:
    after every variant the JSON (``--json``) is written with what finished, so a run stopped at its
    time limit keeps it; the table is printed at the end."""
    started = start(args, run_variant, variants)
    if started is None:
        return None
    device, names, info = started
    extra = before(device) if before else None

    def publish(results, shared, final):
        table, notes, payload = summarize(results, shared, extra, device)
        if final:
            report(title, info, table, notes, args.json, payload)
        elif args.json:
            from reverse_voicefilter.core.jsonfile import write_json

            write_json(args.json, {"title": title, "machine": info, "finished": False, **(payload or {})})

    with tempfile.TemporaryDirectory(prefix=workdir_prefix) as workdir:
        argv, shared = child_argv(), {}
        if prepare is not None:
            from reverse_voicefilter.core.jsonfile import write_json  # the children never read a half-written file

            shared = prepare(workdir)
            write_json(Path(workdir, shared_file), shared)
            argv += ["--workdir", workdir]
        results = run_variants(module, names, argv, args.timeout, lambda so_far: publish(so_far, shared, False))
    publish(results, shared, True)
    return results


def child_argv():
    """The parent's own flags, forwarded to each child (``--json`` is ignored there)."""
    return sys.argv[1:]


# ---- output ------------------------------------------------------------------------------------
def fmt(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(results, columns, ratios=(), baseline=None):
    """A markdown table, one row per variant.

    columns: ``[(header, key)]`` read from each result dict.
    ratios: ``[(header, key, higher_is_better)]``: the variant's value against the baseline's,
        written so that > 1 means better than the baseline (``x2.0`` = twice as fast).
    baseline: the variant name the ratios are taken against (default: the first).
    """
    names = list(results)
    base = results.get(baseline or (names[0] if names else None), {})
    headers = ["variant"] + [h for h, _ in columns] + [h for h, _, _ in ratios]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name in names:
        r = results[name]
        if "error" in r and not r.get("partial"):
            cells = [name, r["error"]] + ["-"] * (len(headers) - 2)
        else:  # a timed-out variant's partial figures are shown, marked
            label = f"{name} ({r['error']}; figures so far)" if "error" in r else name
            cells = [label] + [fmt(r.get(k)) for _, k in columns]
            for _, key, higher in ratios:
                v, b = r.get(key), base.get(key)
                if not v or not b:
                    cells.append("-")
                else:
                    cells.append(f"x{(v / b if higher else b / v):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def select(wanted, available):
    """The variants to run: ``--variants`` (checked) or all available ones."""
    unknown = [n for n in wanted or () if n not in available]
    if unknown:
        sys.exit(f"error: unknown variant(s) {', '.join(unknown)} (choose from {', '.join(available)})")
    return list(wanted or available)


def report(title, info, table, notes=(), json_path=None, payload=None):
    """Print the title, the machine, the table and notes; optionally write everything as JSON."""
    print(f"\n### {title}\n")
    print(machine.machine_line(info) + "\n")
    notes = [n for n in [*notes, machine.busy_note(info)] if n]
    print(table)
    for note in notes:
        print(f"\n{note}")
    if json_path:
        from reverse_voicefilter.core.jsonfile import write_json

        write_json(json_path, {"title": title, "machine": info, **(payload or {})})
        print(f"\n(results written to {json_path})")
