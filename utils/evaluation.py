"""Evaluation of a trained VoiceFilter over a generator test folder.

For every sample (``NNNNNN-mixed.wav``, ``-target.wav``, ``-dvec.txt``) and mask
mode, the mixture and the output are scored against a clean reference signal:

* ``org`` against ``-target.wav`` (what the model was trained to keep: the
  reference speaker, or with reversed data the interfering speaker);
* ``inv_div`` / ``inv_sub`` against ``mixed.wav - target.wav`` (everything the
  mask is meant to take away).

Metrics: SDR (mir_eval ``bss_eval_sources``, as the original's validation) and
SI-SDR, before (the mixture) and after (the output), and the speaker
similarity (cosine) of the mixture's and the output's d-vectors with the
reference's d-vector. Spectrograms and the network run batched on the device
(:class:`utils.separation.Separator`); mir_eval runs per sample on the CPU,
optionally in a process pool.
"""
import csv
import io
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from datasets.samples import list_samples, read_manifest
from utils.audio import load_wav
from utils.dvec_cache import load_dvecs, reference_key
from utils.errors import UserError
from utils.metrics import sdr, si_sdr

logger = logging.getLogger(__name__)

TARGET, RESIDUAL = "target", "mixed_minus_target"
CSV_COLUMNS = ("sample_id", "mode", "reference", "sdr_before", "sdr_after", "sdr_gain", "si_sdr_before",
               "si_sdr_after", "si_sdr_gain", "similarity_before", "similarity_after")
SUMMARY_METRICS = CSV_COLUMNS[3:]


def reference_kind(mode):
    """The clean signal a mode's output is scored against."""
    return TARGET if mode == "org" else RESIDUAL


def describe_reference(kind, reversed_data):
    if kind == TARGET:
        who = "the interfering speaker (reversed data)" if reversed_data else "the reference speaker"
        return f"-target.wav: {who}"
    who = "the reference speaker (reversed data)" if reversed_data else "the interfering speaker"
    return f"-mixed.wav minus -target.wav: {who}"


def resolve_reversed(samples, split_dir, flag=None):
    """Whether the folder holds reversed data: ``flag`` if given, else its manifest.jsonl."""
    manifest = read_manifest(split_dir)
    values = {bool(manifest[s.sample_id].get("reversed", False)) for s in samples if s.sample_id in manifest}
    if flag is not None:
        if values and values != {flag}:
            logger.warning("--reversed %s, but the manifest of %s says reversed: %s", flag, split_dir,
                           sorted(values))
        return bool(flag), "flag"
    if len(values) > 1:
        raise UserError(f"the manifest of {split_dir} mixes reversed and normal samples: pass --reversed "
                        f"True or False")
    if values:
        return values.pop(), "manifest"
    return False, "default (no manifest)"


def score_sample(task):
    """SDR and SI-SDR of one sample's mixture and outputs (a module-level function for the pool).

    ``task``: (mixed [N], target [N], {mode: output [N]}) -> {mode: {metric: value}}.
    """
    mixed, target, outputs = task
    references = {TARGET: target, RESIDUAL: mixed - target}
    before = {}
    scores = {}
    for mode, output in outputs.items():
        kind = reference_kind(mode)
        ref = references[kind]
        if kind not in before:
            before[kind] = (sdr(ref, mixed), si_sdr(ref, mixed))
        sdr_in, si_in = before[kind]
        sdr_out, si_out = sdr(ref, output), si_sdr(ref, output)
        scores[mode] = {"sdr_before": sdr_in, "sdr_after": sdr_out, "sdr_gain": sdr_out - sdr_in,
                        "si_sdr_before": si_in, "si_sdr_after": si_out, "si_sdr_gain": si_out - si_in}
    return scores


def _cosine(a, b):
    """Rows of a [B, E] with rows of b [B, E] -> [B]."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1).cpu().numpy()


def _pool_context():
    """fork where the platform forks safely (Linux: workers start at once, as DataLoader's do);
    spawn elsewhere (macOS, Windows). The workers only run numpy/scipy code."""
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


class _Scorer:
    """mir_eval in this process (jobs 1) or in a process pool with a bounded queue."""

    def __init__(self, jobs):
        self.pool = _pool_context().Pool(jobs) if jobs > 1 else None
        self.limit = 4 * jobs
        self.pending = deque()
        self.done = []

    def submit(self, meta, task):
        if self.pool is None:
            self.done.append((meta, score_sample(task)))
            return
        self.pending.append((meta, self.pool.apply_async(score_sample, (task,))))
        while len(self.pending) > self.limit:
            self._collect_one()

    def _collect_one(self):
        meta, result = self.pending.popleft()
        self.done.append((meta, result.get()))

    def finish(self):
        while self.pending:
            self._collect_one()
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
        return self.done

    def terminate(self):
        if self.pool is not None:
            self.pool.terminate()


def evaluate(separator, split_dir, modes, factor, limit=0, reversed_flag=None, jobs=1, progress=True):
    """Score every complete sample of ``split_dir``; returns (rows, info).

    ``rows``: one dict per sample and mode with the :data:`CSV_COLUMNS`. ``info``: counts and
    what the references are.
    """
    hp = separator.hp
    rate = hp.audio.sample_rate
    split_dir = Path(split_dir)
    samples = list_samples(split_dir, hp, need_mags=False)
    found = len(samples)
    if limit:
        samples = samples[:limit]
    if not samples:
        raise UserError(f"no complete samples (-mixed.wav, -target.wav, -dvec.txt) in {split_dir}")
    reversed_data, reversed_source = resolve_reversed(samples, split_dir, reversed_flag)
    dvec_of = load_dvecs(samples, split_dir, separator.embedder, rate, write=True, progress=progress)
    ref_dvecs = torch.stack([dvec_of[reference_key(s)] for s in samples]).float()  # [S, E] on CPU

    clean = {}  # index -> (mixed, target) until its outputs come back

    def items():
        for i, s in enumerate(samples):
            mixed, target = load_wav(s.mixed_wav, rate), load_wav(s.target_wav, rate)
            if mixed.size != target.size:
                raise UserError(f"{s.mixed_wav} and {s.target_wav} differ in length ({mixed.size} and "
                                f"{target.size} samples): regenerate the sample")
            clean[i] = (mixed, target)
            yield i, mixed, ref_dvecs[i]

    scorer = _Scorer(jobs)
    similarities = {}
    try:
        buffer = []
        stream = separator.separate_stream(items(), modes, factor)
        with tqdm(total=len(samples), desc="evaluating", unit="sample", disable=None if progress else True) as bar:
            for i, result in stream:
                buffer.append((i, result))
                if len(buffer) >= separator.batch_size:
                    _score_buffer(buffer, separator, clean, ref_dvecs, modes, scorer, similarities)
                    bar.update(len(buffer))
                    buffer = []
            if buffer:
                _score_buffer(buffer, separator, clean, ref_dvecs, modes, scorer, similarities)
                bar.update(len(buffer))
        scored = scorer.finish()
    except BaseException:
        scorer.terminate()
        raise
    rows = []
    for i, scores in sorted(scored, key=lambda item: item[0]):
        for mode in modes:
            sim_before, sim_after = similarities[i][mode]
            rows.append({"sample_id": samples[i].sample_id, "mode": mode, "reference": reference_kind(mode),
                         **scores[mode], "similarity_before": sim_before, "similarity_after": sim_after})
    info = {"samples_found": found, "samples": len(samples), "reversed_data": reversed_data,
            "reversed_source": reversed_source,
            "references": {kind: describe_reference(kind, reversed_data) for kind in (TARGET, RESIDUAL)}}
    return rows, info


def _score_buffer(buffer, separator, clean, ref_dvecs, modes, scorer, similarities):
    """D-vectors of mixtures and outputs in one embedder call; SDRs to the scorer."""
    keys = [i for i, _ in buffer]
    waves = [clean[i][0] for i in keys] + [r.wavs[m] for _, r in buffer for m in modes]
    emb = separator.embedder.embed_many(waves).float().cpu()  # [B + B * M, E]
    refs = ref_dvecs[keys]  # [B, E]
    before = _cosine(emb[:len(keys)], refs)
    after = _cosine(emb[len(keys):], refs.repeat_interleave(len(modes), dim=0)).reshape(len(keys), len(modes))
    for j, (i, result) in enumerate(buffer):
        similarities[i] = {m: (float(before[j]), float(after[j, k])) for k, m in enumerate(modes)}
        mixed, target = clean.pop(i)
        scorer.submit(i, (mixed, target, {m: result.wavs[m] for m in modes}))


# ---- summary and files -------------------------------------------------------------------------
def _stat(values, fn):
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(fn(values)) if values.size else float("nan")


def summarize(rows, modes, reversed_data):
    """Per mode: the reference, the count, and median/mean of every metric (NaN left out)."""
    summary = {}
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        entry = {"reference": reference_kind(mode), "reference_is": describe_reference(reference_kind(mode),
                                                                                      reversed_data),
                 "count": len(mine),
                 "sdr_undefined": int(sum(not math.isfinite(r["sdr_after"]) for r in mine))}
        for metric in SUMMARY_METRICS:
            values = [r[metric] for r in mine]
            entry[metric] = {"median": _stat(values, np.median), "mean": _stat(values, np.mean)}
        summary[mode] = entry
    return summary


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def _write_text(path, text):
    """Write a text file atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_csv(path, rows):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    return _write_text(path, out.getvalue())


def write_report(path, report):
    return _write_text(path, json.dumps(_json_safe(report), indent=2) + "\n")


def histogram_series(rows, modes):
    """``{label: SDR values}``: the mixture once per reference, then each mode's output."""
    series = {}
    for kind in dict.fromkeys(reference_kind(m) for m in modes):
        first = next(m for m in modes if reference_kind(m) == kind)
        label = "mixture vs target" if kind == TARGET else "mixture vs mixed - target"
        series[label] = [r["sdr_before"] for r in rows if r["mode"] == first]
    for mode in modes:
        series[f"{mode} output"] = [r["sdr_after"] for r in rows if r["mode"] == mode]
    return series


def write_histograms(out_dir, rows, modes):
    """``sdr_histogram.png`` (all modes), and one per mode when there are several."""
    from utils.plotting import save_histogram

    out_dir = Path(out_dir)
    paths = [save_histogram(out_dir / "sdr_histogram.png", histogram_series(rows, modes),
                            title="SDR before (mixture) and after (output)")]
    if len(modes) > 1:
        for mode in modes:
            paths.append(save_histogram(out_dir / f"sdr_histogram_{mode}.png", histogram_series(rows, [mode]),
                                        title=f"SDR, {mode} (against {reference_kind(mode)})"))
    return paths


def format_table(summary):
    """The summary as a text table: per mode, a median and a mean line."""
    head = (f"{'mode':<8} {'stat':<6} {'SDR in':>8} {'SDR out':>8} {'gain':>7} {'SI-SDR in':>10} "
            f"{'SI-SDR out':>10} {'gain':>7} {'sim in':>7} {'sim out':>7}")
    lines = [head, "-" * len(head)]
    for mode, entry in summary.items():
        for stat in ("median", "mean"):
            values = [entry[m][stat] for m in SUMMARY_METRICS]
            cells = " ".join(f"{v:>{w}.{p}f}" for v, w, p in zip(values, (8, 8, 7, 10, 10, 7, 7, 7),
                                                                (2, 2, 2, 2, 2, 2, 3, 3), strict=True))
            lines.append(f"{mode if stat == 'median' else '':<8} {stat:<6} {cells}")
    lines.append("")
    for mode, entry in summary.items():
        lines.append(f"{mode}: {entry['count']} samples, scored against {entry['reference_is']}")
    return "\n".join(lines)


def run_evaluation(separator, split_dir, out_dir, modes, factor, limit=0, reversed_flag=None, jobs=1,
                   progress=True, meta=None):
    """Evaluate, write report.json, per_sample.csv and the histograms; return the report dict."""
    start = time.time()
    rows, info = evaluate(separator, split_dir, modes, factor, limit=limit, reversed_flag=reversed_flag,
                          jobs=jobs, progress=progress)
    summary = summarize(rows, modes, info["reversed_data"])
    out_dir = Path(out_dir)
    report = {**(meta or {}), "test_dir": str(split_dir), "factor": factor, "inv_div_eps": separator.eps,
              "reversed_data": info["reversed_data"], "reversed_source": info["reversed_source"],
              "counts": {"samples_found": info["samples_found"], "samples": info["samples"],
                         "modes": len(modes), "rows": len(rows)},
              "references": info["references"], "modes": summary,
              "seconds": round(time.time() - start, 1)}
    write_csv(out_dir / "per_sample.csv", rows)
    write_histograms(out_dir, rows, modes)
    write_report(out_dir / "report.json", report)
    return report
