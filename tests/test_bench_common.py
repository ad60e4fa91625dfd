"""The benchmarks' measuring tools: memory of a process tree (psutil) and per-call timing."""
import sys
import time

import torch

from reverse_voicefilter.bench import common

ALLOCATE = ("import numpy as np, subprocess, sys, time; a = np.ones({n}); "
            "subprocess.run([sys.executable, '-c', 'import numpy as np, time; b = np.ones({n}); time.sleep(2.0)']); "
            "time.sleep(0.3)")


def test_run_tool_sees_the_memory_of_the_command_and_its_children():
    n = 25_000_000  # 200 MB of float64 in the command, as much again in its child
    run = common.run_tool([sys.executable, "-c", ALLOCATE.format(n=n)])
    assert run.peak_rss_mb > 190                       # the command's own high-water mark
    assert run.largest_rss_mb >= run.peak_rss_mb       # never below the exact figure
    assert run.tree_pss_mb > 350                        # both processes at once, sampled while the child sleeps
    # (2 s: on a loaded machine the sampler still gets its turns within that window)


def test_time_call_times_each_repeat_and_reports_partials():
    calls, partials = [], []

    def call():
        calls.append(1)
        time.sleep(0.05)

    times = common.time_call(call, torch.device("cpu"), warmup=2, repeats=3,
                             on_repeat=lambda so_far: partials.append(list(so_far)))
    assert len(calls) == 5                              # the warm-up calls are made, and not timed
    assert len(times) == 3 and all(t >= 0.049 for t in times)  # each call timed whole (no upper bound: a
    assert [len(p) for p in partials] == [1, 2, 3]      # loaded machine may take longer)
    assert partials[-1] == times


def test_allocator_flag_chooses_whether_freed_memory_is_kept(monkeypatch):
    import argparse

    import reverse_voicefilter.core.allocator

    calls = []
    monkeypatch.setattr(reverse_voicefilter.core.allocator, "reuse_freed_memory", lambda: calls.append(1) or True)
    p = argparse.ArgumentParser()
    common.add_allocator_flag(p, "as the script")
    common.set_allocator(p.parse_args([]), "reuse")     # left out: what the measured script does
    assert calls == [1]
    common.set_allocator(p.parse_args([]), "glibc")
    assert calls == [1]
    common.set_allocator(p.parse_args(["--allocator", "glibc"]), "reuse")
    assert calls == [1]                                 # the C library's defaults left alone
    common.set_allocator(p.parse_args(["--allocator", "reuse"]), "glibc")
    assert calls == [1, 1]


def test_results_are_written_after_every_variant(tmp_path, monkeypatch):
    """A benchmark stopped at its time limit keeps the variants that finished (the first GPU run lost
    six finished training variants because the JSON was written only at the end)."""
    import argparse
    import json

    out = tmp_path / "r.json"
    seen_before = {}

    def fake_run_one(module, name, argv, timeout, results):
        seen_before[name] = json.loads(out.read_text()) if out.exists() else None
        results[name] = {"seconds": len(results) + 1.0}

    monkeypatch.setattr(common, "_run_one", fake_run_one)
    args = argparse.Namespace(variant=None, device="cpu", variants=None, json=str(out), timeout=10.0, threads=0)

    def summarize(results, shared, extra, device):
        return "table", [], {"results": dict(results)}

    common.run_benchmark("unused.module", args, None, ["a", "b", "c"], "Test", summarize)
    assert seen_before["a"] is None
    assert seen_before["b"]["finished"] is False and list(seen_before["b"]["results"]) == ["a"]
    assert list(seen_before["c"]["results"]) == ["a", "b"]
    final = json.loads(out.read_text())
    assert "finished" not in final and list(final["results"]) == ["a", "b", "c"]
