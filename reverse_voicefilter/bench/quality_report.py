"""Scoring and reporting of bench.quality: each checkpoint of a run by evaluate.py's code, the
curve, the final table and the picture.

Each row names its task: ``keep`` (the output should be the reference speaker) or ``remove`` (the
output should be everything but the reference speaker), and the gains are against the clean signal
of that task (reverse_voicefilter.evaluation.scoring picks it per mode and per model, as evaluate.py does).
"""
import json
import math
import os
from pathlib import Path

import numpy as np

from reverse_voicefilter.core.checkpoint import run_checkpoints
from reverse_voicefilter.core.jsonfile import write_json
from reverse_voicefilter.core.plotting import _save_figure, plt
from reverse_voicefilter.evaluation.evaluate import evaluate, run_evaluation, summarize
from reverse_voicefilter.evaluation.scoring import TARGET
from reverse_voicefilter.separation.loading import load_separator

CURVE_METRICS = ("sdr_gain", "si_sdr_gain", "similarity_after")


def checkpoints(run_dir):
    """{step: path} of a run's checkpoints."""
    return run_checkpoints(Path(run_dir) / "chkpt" / "model")


def _modes_summary(report_modes):
    """Per mode: task, and median/mean of the curve's metrics (NaN -> None for JSON)."""
    def clean(x):
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 3)
    out = {}
    for mode, entry in report_modes.items():
        out[mode] = {"task": "keep" if entry["reference"] == TARGET else "remove", "reference": entry["reference"],
                     "count": entry["count"]}
        for metric in CURVE_METRICS + ("sdr_before", "sdr_after"):
            out[mode][metric] = {k: clean(v) for k, v in entry[metric].items()}
    return out


def _load(path, device):
    """The checkpoint as evaluate.py loads it (its own config, the resemblyzer embedder)."""
    return load_separator(None, path, "resemblyzer", device, batch_size=8)


def segments(run_dir):
    """The ``[start, end]`` wall times of the trainer processes of a run (end None: still running or
    killed), from ``run_dir/segments.json``; [] for a run that has none."""
    path = Path(run_dir) / "segments.json"
    return json.loads(path.read_text()) if path.is_file() else []


def training_minutes(segments, until=None):
    """Minutes spent training up to wall time ``until`` (default: the end), pauses between segments
    left out; a segment with no end counts up to ``until``."""
    total = 0.0
    for start, end in segments:
        stop = until if end is None else (end if until is None else min(end, until))
        if stop is not None and stop > start:
            total += stop - start
    return total / 60


def score_curve(run_dir, segments, test_dir, device, curve_samples, jobs, modes):
    """The curve so far: every checkpoint of the run on the first ``curve_samples`` test mixtures, each
    point scored once and kept in ``run_dir/scores`` (so it can be called while the run trains); a
    point's minutes are the training time (``segments``) up to its checkpoint's writing."""
    curve = []
    for step, path in sorted(checkpoints(run_dir).items()):
        cached = Path(run_dir) / "scores" / f"step{step}-n{curve_samples}.json"
        if cached.is_file():
            modes_summary = json.loads(cached.read_text())
        else:
            separator = _load(path, device)
            rows, info = evaluate(separator, test_dir, list(modes), 0.7, limit=curve_samples, jobs=jobs,
                                  progress=False)
            modes_summary = _modes_summary(summarize(rows, list(modes), info["targets"]))
            cached.parent.mkdir(parents=True, exist_ok=True)
            write_json(cached, modes_summary)
        minutes = training_minutes(segments, os.path.getmtime(path))
        curve.append({"step": step, "minutes": round(minutes, 2), "modes": modes_summary})
    return curve


def score_run(run_dir, record, test_dir, device, curve_samples, final_samples, jobs, modes):
    """The curve (every checkpoint on the first ``curve_samples`` test mixtures) and the final scores
    (the last checkpoint on the first ``final_samples``, 0: all of them, with evaluate.py's
    report.json, per_sample.csv and scatter in ``run_dir/final``); each scoring is kept (``run_dir/scores``,
    ``run_dir/final``) and reused."""
    run_dir = Path(run_dir)
    found = checkpoints(run_dir)
    spans = record.get("segments") or [[record["start"], record["end"]]]
    curve = score_curve(run_dir, spans, test_dir, device, curve_samples, jobs, modes)
    last_step, last = max(found.items())
    final_dir = run_dir / "final"
    report_path = final_dir / "report.json"
    if report_path.is_file() and json.loads(report_path.read_text()).get("checkpoint") == str(last) and \
            json.loads(report_path.read_text()).get("limit", 0) == final_samples:
        report = json.loads(report_path.read_text())
    else:
        separator = _load(last, device)
        final_dir.mkdir(parents=True, exist_ok=True)
        report = run_evaluation(separator, test_dir, final_dir, list(modes), 0.7, limit=final_samples, jobs=jobs,
                                progress=False, meta={"checkpoint": str(last), "embedder": "resemblyzer",
                                                      "device": str(device), "limit": final_samples})
    return {"steps": last_step, "train_minutes": round(training_minutes(spans), 2),
            "curve": curve, "final": {"checkpoint": str(last), "samples": report["counts"]["samples"],
                                      "org_keeps": report["org_scored_against"]["org_keeps"],
                                      "modes": _modes_summary(report["modes"])},
            "report": str(report_path)}


def _fmt(x, digits=2):
    return "-" if x is None else f"{x:+.{digits}f}"


def curve_table(run):
    """The curve of one run as a markdown table (org and the removal row)."""
    lines = [f"{run['name']}: {run['steps']} steps in {run['train_minutes']} min",
             "| step | minutes | mode | task | SDR gain median | mean | SI-SDR gain median | similarity |",
             "|---|---|---|---|---|---|---|---|"]
    for point in run["curve"]:
        for mode, m in point["modes"].items():
            lines.append(f"| {point['step']} | {point['minutes']:.1f} | {mode} | {m['task']} | "
                         f"{_fmt(m['sdr_gain']['median'])} | {_fmt(m['sdr_gain']['mean'])} | "
                         f"{_fmt(m['si_sdr_gain']['median'])} | {_fmt(m['similarity_after']['median'], 3)} |")
    return "\n".join(lines)


def final_table(runs):
    """One row per (recipe, training data, mode): the final scores over all test mixtures, each seed and
    the spread."""
    groups = {}
    for run in runs:
        for mode, m in run["final"]["modes"].items():
            key = (run["recipe"], "reversed" if run["reverse"] else "normal", mode, m["task"])
            groups.setdefault(key, []).append((run["seed"], m))
    lines = ["| recipe | trained on | mode | task | SDR in (median) | SDR gain median per seed | mean of medians "
             "| spread | SI-SDR gain median | similarity |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (recipe, data, mode, task), entries in groups.items():
        medians = [m["sdr_gain"]["median"] for _, m in entries]
        finite = [x for x in medians if x is not None]
        spread = (max(finite) - min(finite)) if len(finite) > 1 else None
        si = np.mean([m["si_sdr_gain"]["median"] for _, m in entries if m["si_sdr_gain"]["median"] is not None])
        sim = [m["similarity_after"]["median"] for _, m in entries if m["similarity_after"]["median"] is not None]
        per_seed = ", ".join(f"{_fmt(x)} (seed {s})" for (s, _), x in zip(entries, medians, strict=True))
        lines.append(f"| {recipe} | {data} | {mode} | {task} | {entries[0][1]['sdr_before']['median']:.2f} | "
                     f"{per_seed} | {_fmt(float(np.mean(finite)) if finite else None)} | "
                     f"{'-' if spread is None else f'{spread:.2f}'} | {_fmt(float(si))} | "
                     f"{_fmt(float(np.mean(sim)) if sim else None, 3)} |")
    return "\n".join(lines)


def plot_curves(runs, path, title=""):
    """Median SDR gain against training steps (comparable across runs that shared the machine; the
    minutes are in the tables), one line per run and task (keep: org of the normal
    model; remove: inv_sub of the normal model and org of the reversed one)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharex=True)
    for run in runs:
        for ax, task in zip(axes, ("keep", "remove"), strict=True):
            for mode in ("org", "inv_sub"):
                points = [(p["step"], p["modes"][mode]["sdr_gain"]["median"]) for p in run["curve"]
                          if mode in p["modes"] and p["modes"][mode]["task"] == task]
                points = [(x, y) for x, y in points if y is not None]
                if points:
                    xs, ys = zip(*points, strict=True)
                    label = f"{run['recipe']} {'reversed' if run['reverse'] else 'normal'} {mode} seed {run['seed']}"
                    ax.plot(xs, ys, marker="o", label=label)
    for ax, task in zip(axes, ("keep the reference speaker", "remove the reference speaker"), strict=True):
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_title(task)
        ax.set_xlabel("training steps")
        ax.set_ylabel("median SDR gain (dB), held-out speakers")
        ax.grid(alpha=0.3)
        if ax.lines[1:]:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save_figure(fig, path)
