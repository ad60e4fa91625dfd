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
(:class:`reverse_voicefilter.separation.separator.Separator`); mir_eval runs per sample on the CPU,
optionally in a process pool. Separation and SDR follow :mod:`reverse_voicefilter.evaluation.scoring`,
the path the trainer's validation takes too.
"""
import csv
import io
import json
import logging
import math
import multiprocessing
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from reverse_voicefilter.core.atomic import write_text
from reverse_voicefilter.core.audio import load_wav
from reverse_voicefilter.core.errors import UserError
from reverse_voicefilter.core.hparams import HParam
from reverse_voicefilter.core.jsonfile import write_json
from reverse_voicefilter.data.dvec_cache import load_dvecs, reference_key
from reverse_voicefilter.data.generation import SETTINGS_FILE
from reverse_voicefilter.data.samples import listed_samples, read_manifest
from reverse_voicefilter.evaluation.scoring import (
    RESIDUAL,
    TARGET,
    check_lengths,
    nan_mean,
    nan_median,
    reference_kind,
    score_sample,
)

logger = logging.getLogger(__name__)

CSV_COLUMNS = ("sample_id", "mode", "reference", "sdr_before", "sdr_after", "sdr_gain", "si_sdr_before",
               "si_sdr_after", "si_sdr_gain", "similarity_before", "similarity_after")
SUMMARY_METRICS = CSV_COLUMNS[3:]
SCATTER_FILE = "sdr_before_after.png"


def describe_reference(kind, reversed_data):
    """What the clean signal ``kind`` holds in a folder of normal or reversed data."""
    if kind == TARGET:
        who = "the interfering speaker (reversed data)" if reversed_data else "the reference speaker"
        return f"-target.wav: {who}"
    who = "the reference speaker (reversed data)" if reversed_data else "the interfering speaker"
    return f"-mixed.wav minus -target.wav: {who}"


def split_reversed(split_dir, samples=None):
    """Whether a generator folder holds reversed data, and from what: ``(True/False, "manifest")``,
    ``(.., "generation.json")``, or ``(None, "unknown")`` for a folder without either.
    A manifest that mixes reversed and normal samples is a :class:`UserError`."""
    split_dir = Path(split_dir)
    manifest = read_manifest(split_dir)
    ids = [s.sample_id for s in samples] if samples is not None else list(manifest)
    values = {bool(manifest[i].get("reversed", False)) for i in ids if i in manifest}
    if len(values) > 1:
        raise UserError(f"the manifest of {split_dir} mixes reversed and normal samples: pass --reversed "
                        f"True or False")
    if values:
        return values.pop(), "manifest"
    settings = split_dir / SETTINGS_FILE
    if settings.is_file():
        try:
            return bool(json.loads(settings.read_text())["reverse"]), SETTINGS_FILE
        except (OSError, ValueError, KeyError, TypeError):
            logger.warning("cannot read %s: whether %s is reversed is unknown", settings, split_dir)
    return None, "unknown"


def model_reversed(hp_str):
    """Whether the model was trained on reversed data: from the checkpoint's config with online
    mixing (data.reverse_data), else from the training folder it names (data.train_dir):
    ``(True/False, why)``, or ``(None, why)`` when that cannot be told."""
    if not hp_str:
        return None, "the checkpoint stores no config"
    try:
        data = HParam.from_string(hp_str).data
    except UserError:
        return None, "the checkpoint's config cannot be read"
    if data.mixing == "online":  # mixed on the fly: the config itself says which speaker was the target
        return bool(data.reverse_data), f"its config (data.mixing online, data.reverse_data {data.reverse_data})"
    train_dir = data.train_dir
    if not train_dir:
        return None, "the checkpoint's config names no data.train_dir"
    if not Path(train_dir).is_dir():
        return None, f"its training folder {train_dir} is not here"
    try:
        value, source = split_reversed(train_dir)
    except UserError as err:
        return None, str(err)
    if value is None:
        return None, f"its training folder {train_dir} has no manifest.jsonl or {SETTINGS_FILE}"
    return value, f"its training folder {train_dir} ({source})"


@dataclass
class Targets:
    """What ``org`` is scored against, and why.

    ``model_reversed``: the model keeps the interfering speaker (trained on reversed data);
    ``because``: "flag" (--reversed), "model" (its training folder), "folder" (the test
    folder, when the model's data cannot be told) or "default". ``folder_reversed``: the test
    folder's -target.wav holds the interfering speaker.
    """

    model_reversed: bool
    because: str
    explanation: str
    folder_reversed: bool
    folder_source: str

    @property
    def org_kind(self):
        return TARGET if self.model_reversed == self.folder_reversed else RESIDUAL

    def as_dict(self):
        return {"org_reference": reference_kind("org", self.org_kind),
                "org_reference_is": describe_reference(self.org_kind, self.folder_reversed),
                "org_keeps": "the interfering speaker" if self.model_reversed else "the reference speaker",
                "because": self.because, "explanation": self.explanation,
                "model_reversed": self.model_reversed, "folder_reversed": self.folder_reversed,
                "folder_reversed_source": self.folder_source}


def decide_targets(samples, split_dir, flag=None, hp_str=None):
    """:class:`Targets` from ``--reversed`` (``flag``), else the model's training data, else the
    test folder; a model and a folder that disagree are a warning (the scores follow the model)."""
    folder, folder_source = split_reversed(split_dir, samples)
    trained, model_why = model_reversed(hp_str)
    if flag is not None:
        value, because, explanation = bool(flag), "flag", f"--reversed {bool(flag)}"
    elif trained is not None:
        value, because, explanation = trained, "model", f"the model: {model_why}"
    elif folder is not None:
        value, because = folder, "folder"
        explanation = f"the test folder ({folder_source}), as the model's data cannot be told: {model_why}"
    else:
        value, because = False, "default"
        explanation = f"default: neither the model's data ({model_why}) nor the test folder tells"
    if folder is None:
        folder, folder_source = value, "unknown: taken to match the model"
    elif folder != value:
        logger.warning("the model keeps %s (%s) but %s holds %s data: org is scored against %s",
                       "the interfering speaker" if value else "the reference speaker", explanation, split_dir,
                       "reversed" if folder else "normal", describe_reference(
                           TARGET if value == folder else RESIDUAL, folder))
    return Targets(value, because, explanation, folder, folder_source)


def _cosine(a, b):
    """Rows of a [B, E] with rows of b [B, E] -> [B]."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1).cpu().numpy()


def _pool_context():
    """fork where the platform forks safely (Linux: workers start at once, as DataLoader's do);
    spawn elsewhere (macOS, Windows). Each worker computes its samples' SDRs on one torch thread
    (:func:`_one_thread`)."""
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _one_thread():
    """A pool worker's torch on one thread: ``jobs`` workers each starting torch's default (all the
    cores) oversubscribe the machine, and a forked OpenMP pool of many threads can hang."""
    torch.set_num_threads(1)


class _Scorer:
    """SDRs in this process (jobs 1, or on a GPU ``device``: batched there) or in a process pool with
    a bounded queue."""

    def __init__(self, jobs, device=None):
        on_gpu = device is not None and device.type != "cpu"
        self.device = device if on_gpu else None
        self.pool = _pool_context().Pool(jobs, initializer=_one_thread) if jobs > 1 and not on_gpu else None
        self.limit = 4 * jobs
        self.pending = deque()
        self.done = []

    def submit(self, meta, task):
        if self.pool is None:
            self.done.append((meta, score_sample(task, device=self.device)))
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
    """Score every sample of ``split_dir`` (every ``-dvec.txt``); returns (rows, info). A sample whose
    wavs are missing or unreadable is not scored but named in ``info["failed"]``.

    ``rows``: one dict per sample and mode with the :data:`CSV_COLUMNS`. ``info``: counts,
    what the references are, and the :class:`Targets` (what org is scored against, and why:
    ``reversed_flag``, else the training data named by the checkpoint's config).
    """
    hp = separator.hp
    rate = hp.audio.sample_rate
    split_dir = Path(split_dir)
    samples = listed_samples(split_dir, hp)  # a sample without its wavs is a failure to name, not to hide
    found = len(samples)
    if limit:
        samples = samples[:limit]
    if not samples:
        raise UserError(f"no samples (NNNNNN-dvec.txt with its -mixed.wav and -target.wav) in {split_dir}")
    source = separator.source
    targets = decide_targets(samples, split_dir, reversed_flag, source.hp_str if source else None)
    org_kind = targets.org_kind
    dvec_of = load_dvecs(samples, split_dir, separator.embedder, rate, write=True, progress=progress)
    ref_dvecs = torch.stack([dvec_of[reference_key(s)] for s in samples]).float()  # [S, E] on CPU

    clean = {}  # index -> (mixed, target) until its outputs come back
    failed = {}  # sample id -> why it could not be scored (missing, unreadable, silent, lengths differ)
    items = _readable_samples(samples, rate, ref_dvecs, clean, failed)

    scorer = _Scorer(jobs, separator.device)
    similarities = {}
    try:
        buffer = []
        stream = separator.separate_stream(items, modes, factor)
        with tqdm(total=len(samples), desc="evaluating", unit="sample", disable=None if progress else True) as bar:
            for i, result in stream:
                buffer.append((i, result))
                if len(buffer) >= separator.batch_size:
                    _score_buffer(buffer, separator, clean, ref_dvecs, modes, scorer, similarities, org_kind)
                    bar.update(len(buffer))
                    buffer = []
            if buffer:
                _score_buffer(buffer, separator, clean, ref_dvecs, modes, scorer, similarities, org_kind)
                bar.update(len(buffer))
        scored = scorer.finish()
    except BaseException:
        scorer.terminate()
        raise
    if len(failed) == len(samples):
        first = next(iter(failed.items()))
        raise UserError(f"none of the {len(samples)} samples of {split_dir} could be scored (sample {first[0]}: "
                        f"{first[1]})")
    rows = [{"sample_id": samples[i].sample_id, "mode": mode, "reference": reference_kind(mode, org_kind),
             **scores[mode], "similarity_before": similarities[i][mode][0],
             "similarity_after": similarities[i][mode][1]}
            for i, scores in sorted(scored, key=lambda item: item[0]) for mode in modes]
    info = {"samples_found": found, "samples": len(samples) - len(failed), "failed": failed, "targets": targets,
            "references": {kind: describe_reference(kind, targets.folder_reversed) for kind in (TARGET, RESIDUAL)}}
    return rows, info


def _readable_samples(samples, rate, ref_dvecs, clean, failed):
    """Yield ``(index, mixed wav, reference d-vector)`` of each sample whose wavs can be read, keeping
    ``(mixed, target)`` in ``clean``; a sample that cannot be read (missing, corrupt, silent, lengths differ) goes
    to ``failed`` with the reason: one bad sample must not cost the scores of all the others."""
    for i, s in enumerate(samples):
        try:
            mixed, target = load_wav(s.mixed_wav, rate), load_wav(s.target_wav, rate)
            check_lengths(mixed, target, s.mixed_wav, s.target_wav)
        except UserError as err:
            failed[s.sample_id] = str(err)
            logger.warning("sample %s skipped: %s", s.sample_id, err)
            continue
        clean[i] = (mixed, target)
        yield i, mixed, ref_dvecs[i]


def _embed_or_nan(embedder, waves):
    """D-vectors [N, E] of ``waves`` in one batch; when some are too short for the embedder's window
    (the original embedder refuses them), those rows are NaN, so their similarity is left out of the
    summary instead of the whole evaluation stopping."""
    try:
        return embedder.embed_many(waves).float().cpu()
    except UserError:
        rows = []
        for wav in waves:
            try:
                rows.append(embedder.embed_many([wav]).float().cpu()[0])
            except UserError:
                rows.append(None)
        size = next((r.numel() for r in rows if r is not None), 1)
        return torch.stack([r if r is not None else torch.full((size,), float("nan")) for r in rows])


def _score_buffer(buffer, separator, clean, ref_dvecs, modes, scorer, similarities, org_kind):
    """D-vectors of mixtures and outputs in one embedder call; SDRs to the scorer."""
    keys = [i for i, _ in buffer]
    waves = [clean[i][0] for i in keys] + [r.wavs[m] for _, r in buffer for m in modes]
    emb = _embed_or_nan(separator.embedder, waves)  # [B + B * M, E]
    refs = ref_dvecs[keys]  # [B, E]
    before = _cosine(emb[:len(keys)], refs)
    after = _cosine(emb[len(keys):], refs.repeat_interleave(len(modes), dim=0)).reshape(len(keys), len(modes))
    for j, (i, result) in enumerate(buffer):
        similarities[i] = {m: (float(before[j]), float(after[j, k])) for k, m in enumerate(modes)}
        mixed, target = clean.pop(i)
        scorer.submit(i, (mixed, target, {m: result.wavs[m] for m in modes}, org_kind))


# ---- summary and files -------------------------------------------------------------------------
def summarize(rows, modes, targets):
    """Per mode: the reference, the count, and median/mean of every metric (NaN left out)."""
    summary = {}
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        kind = reference_kind(mode, targets.org_kind)
        entry = {"reference": kind, "reference_is": describe_reference(kind, targets.folder_reversed),
                 "count": len(mine),
                 "sdr_undefined": int(sum(not math.isfinite(r["sdr_after"]) for r in mine))}
        for metric in SUMMARY_METRICS:
            values = [r[metric] for r in mine]
            entry[metric] = {"median": nan_median(values), "mean": nan_mean(values)}
        summary[mode] = entry
    return summary


def write_csv(path, rows):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    return write_text(path, out.getvalue())


def write_report(path, report):
    return write_json(path, report, indent=2)


def write_scatter(out_dir, rows, summary):
    """``sdr_before_after.png``: per mode, each sample's SDR of the mixture against its output's."""
    from reverse_voicefilter.core.plotting import save_before_after

    pairs = {}
    for mode, entry in summary.items():
        mine = [r for r in rows if r["mode"] == mode]
        pairs[mode] = (f"scored against {entry['reference_is']}", [r["sdr_before"] for r in mine],
                       [r["sdr_after"] for r in mine])
    return save_before_after(Path(out_dir) / SCATTER_FILE, pairs,
                             title="SDR per sample: above the diagonal, the output beats the mixture")


def format_table(summary, targets=None):
    """The summary as a text table: per mode, a median and a mean line; then what each mode is
    scored against, and why (``targets``: :meth:`Targets.as_dict`)."""
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
    if targets is not None:
        lines.append(f"why: the model keeps {targets['org_keeps']}, as said by {targets['explanation']}")
    return "\n".join(lines)


def run_evaluation(separator, split_dir, out_dir, modes, factor, limit=0, reversed_flag=None, jobs=1,
                   progress=True, meta=None):
    """Evaluate, write report.json, per_sample.csv and the SDR scatter; return the report dict
    (its ``targets`` entry is the :class:`Targets` as a dict)."""
    start = time.time()
    rows, info = evaluate(separator, split_dir, modes, factor, limit=limit, reversed_flag=reversed_flag,
                          jobs=jobs, progress=progress)
    targets = info["targets"]
    summary = summarize(rows, modes, targets)
    out_dir = Path(out_dir)
    report = {**(meta or {}), "test_dir": str(split_dir), "factor": factor, "inv_div_eps": separator.eps,
              "reversed_data": targets.folder_reversed, "reversed_source": targets.folder_source,
              "org_scored_against": targets.as_dict(),
              "counts": {"samples_found": info["samples_found"], "samples": info["samples"],
                         "failed": len(info["failed"]), "modes": len(modes), "rows": len(rows)},
              "references": info["references"], "modes": summary, "failed_samples": info["failed"],
              "seconds": round(time.time() - start, 1)}
    write_csv(out_dir / "per_sample.csv", rows)
    write_scatter(out_dir, rows, summary)
    write_report(out_dir / "report.json", report)
    return report
