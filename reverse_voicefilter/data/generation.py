"""The generator's driver: split folders, settings check, resume, the process pool, the summary.

What a sample is (its plan and its mixing) lives in :mod:`reverse_voicefilter.data.mixing`,
where the speakers come from in :mod:`reverse_voicefilter.data.speakers`, and the files of a
sample in :mod:`reverse_voicefilter.data.samples`. Here they become an exact, seeded,
resumable split folder, the same whatever the process count:

* the main process plans every sample index of a split; a worker turns index
  ``i`` into the first of its candidates whose audio is long enough and writes
  it, so exactly the asked-for count comes out, ids contiguous from
  ``000000``, no two with the same triplet, whatever the scheduling;
* every file is written atomically and the ``-dvec.txt`` last, so a sample is
  complete once it exists; a rerun removes what a killed run left half
  written, skips complete samples and remakes the rest byte for byte;
* ``OUT/<split>/generation.json`` records the settings; a rerun with other
  settings into a folder holding samples is refused, a bigger size extends
  the set (the plan of index ``i`` does not depend on the size);
* ``manifest.jsonl`` is rebuilt in id order from the per-sample records at
  the end of every run.
"""
import contextlib
import json
import logging
import multiprocessing
import os
import signal
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from reverse_voicefilter.core import atomic
from reverse_voicefilter.core.audio import Audio
from reverse_voicefilter.core.cli import check_writable_dir
from reverse_voicefilter.core.errors import UserError
from reverse_voicefilter.data.mixing import (
    DROP_REASONS,
    MAX_ATTEMPTS,
    REFERENCE_MIN_FACTOR,
    SPLIT_CODES,
    Mixer,
    candidates_of,
    plan_candidates,
    struck_count,
)
from reverse_voicefilter.data.samples import (
    RECORDS_DIR,
    complete_ids,
    existing_ids,
    read_record,
    remove_stale_temporaries,
    sample_id,
    write_manifest,
    write_sample,
)
from reverse_voicefilter.data.speakers import DEFAULT_TEST_SUBSETS, DEFAULT_TRAIN_SUBSETS, Speakers, split_speakers

logger = logging.getLogger(__name__)

SETTINGS_FILE = "generation.json"
FORMAT_VERSION = 2
AUDIO_KEYS = ("sample_rate", "n_fft", "hop_length", "win_length", "min_level_db", "ref_level_db")
# What the workers need, imported once by the fork server rather than once per worker.
WORKER_MODULES = ["reverse_voicefilter.data.generation", "reverse_voicefilter.core.hparams", "librosa.effects",
                  "librosa.core.spectrum"]


# ----------------------------------------------------------------------------- the workers


# Per-process state of the workers (set by init_worker; also used in-process when -p 1).
_WORKER = {}


def init_worker(hp_str, splits, reverse, vad, float16, in_pool=True):
    """Pool initializer. ``splits``: {split_code: (split_dir, Speakers)}."""
    from reverse_voicefilter.core.hparams import HParam

    if in_pool:
        torch.set_num_threads(1)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    hp = HParam.from_string(hp_str)
    _WORKER.clear()
    _WORKER.update(form=hp.form, audio=Audio(hp), mixer=Mixer(hp, vad), splits=splits, reverse=reverse,
                   float16=float16)


def make_sample(job):
    """Make and write one sample. ``job``: (split_code, index, candidates [[ref, tgt, itf], ...]).

    Returns ``(split_code, index, record or None, Counter of drop reasons)``;
    None when every candidate was dropped.
    """
    split_code, index, candidates = job
    w = _WORKER
    split_dir, speakers = w["splits"][split_code]
    mixture, drops = w["mixer"].mix(speakers, index, candidates, w["reverse"])
    record = write_sample(split_dir, w["form"], mixture, w["audio"], w["float16"]) if mixture else None
    return split_code, index, record, drops


# ----------------------------------------------------------------------------- one split


def _settings(hp, split, size, seed, reverse, vad, float16, pattern, speakers, source):
    """What decides the bytes of a split's samples (a rerun with other values is refused)."""
    form = hp.form.to_dict()
    form.pop("input")
    return {
        "format": FORMAT_VERSION, "split": split, "size": size, "seed": seed, "reverse": bool(reverse),
        "vad": bool(vad), "float16": bool(float16), "audio": {k: hp.audio[k] for k in AUDIO_KEYS},
        "audio_len": hp.data.audio_len, "form": form, "input": pattern,
        "reference_min_samples": REFERENCE_MIN_FACTOR * hp.embedder.window * hp.audio.hop_length,
        "data": source["root"], "subsets": source[split], "speakers": len(speakers),
        "utterances": len(speakers.paths), "utterance_digest": speakers.digest(),
    }


def _check_settings(split_dir, settings, existing):
    """Refuse a folder holding samples made with other settings, or more samples than asked for."""
    settings_path = split_dir / SETTINGS_FILE
    if not settings_path.is_file():
        raise UserError(f"{split_dir} already holds samples not made by this generator (no {SETTINGS_FILE}); "
                        f"use another -o or empty it")
    before = json.loads(settings_path.read_text())
    changed = sorted(k for k in set(before) | set(settings) if k != "size" and before.get(k) != settings.get(k))
    if changed:
        shown = ", ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" if not isinstance(
            settings.get(k), dict) else k for k in changed)
        raise UserError(f"{split_dir} holds samples generated with other settings ({shown}); "
                        f"rerun with the same settings, use another -o, or delete the folder")
    beyond = sorted(i for i in existing if i >= settings["size"])
    if beyond:
        raise UserError(f"{split_dir} holds samples up to {sample_id(max(beyond))}, more than the "
                        f"{settings['size']} asked for; ask for at least {max(beyond) + 1} or use another -o")
    if before.get("size") != settings["size"]:
        logger.info("%s: extending from %s to %d samples", split_dir, before.get("size"), settings["size"])


def prepare_split_dir(split_dir, settings):
    """Create ``split_dir``, remove what a killed run left half written and check earlier settings.

    A folder holding samples made with other settings (seed, reverse, config,
    data...) is refused; a different size is fine when it only extends the set
    (the plan of index i does not depend on the size), refused when samples
    beyond the new size exist.
    """
    check_writable_dir(split_dir, "output")
    (split_dir / RECORDS_DIR).mkdir(exist_ok=True)
    removed = remove_stale_temporaries(split_dir, other_files=(SETTINGS_FILE,))
    if removed:
        logger.info("%s: removed %d half-written temporary file(s) of an interrupted run", split_dir, len(removed))
    existing = existing_ids(split_dir)
    if existing:
        _check_settings(split_dir, settings, existing)
    atomic.write_text(split_dir / SETTINGS_FILE, json.dumps(settings, indent=1, sort_keys=True) + "\n")


def _jobs(split_code, indices, plan):
    for i in indices:
        yield split_code, i, candidates_of(plan, i)


def _format_drops(drops):
    return ", ".join(f"{drops[k]} {k}" for k in DROP_REASONS if drops.get(k)) or "none"


def counted(results, total, desc, progress=True):
    """Yield ``results``, counting them on a progress bar whose clock starts at the first result.

    The pool's start-up (each worker importing librosa and torch) is no
    sample's time: counted as the first sample's, it made the first estimate
    of the time left hours long.
    """
    bar = None
    try:
        for result in results:
            if bar is None:
                bar = tqdm(total=total, initial=1, desc=desc, unit="sample", disable=not progress)
            else:
                bar.update()
            yield result
    finally:
        if bar is not None:
            bar.close()


def _run_split(name, todo, plan, pool, progress, audio_len):
    """Make samples ``todo`` of one split; returns (records made, drop counter)."""
    jobs = _jobs(SPLIT_CODES[name], todo, plan)
    if pool is None:
        results = map(make_sample, jobs)
    else:
        chunk = max(1, min(16, len(todo) // (pool._processes * 8) or 1))
        results = pool.imap_unordered(make_sample, jobs, chunksize=chunk)
    records, drops = {}, Counter()
    for _, index, record, dropped in counted(results, len(todo), f"{name} samples", progress):
        drops.update(dropped)
        if record is None:
            struck = struck_count(plan, index)
            repeats = f"; {struck} more were repeats of earlier samples' candidates" if struck else ""
            raise UserError(
                f"{name}: all {MAX_ATTEMPTS - struck} candidates of sample {sample_id(index)} were dropped "
                f"({_format_drops(drops)} so far{repeats}): the data has too few utterances long enough "
                f"for data.audio_len {audio_len} s (or too few distinct triplets); use more data, a "
                f"shorter data.audio_len or --vad 0 (the samples made so far are kept)")
        records[index] = record
    return records, drops


def _finish_split(name, split_dir, size, made, done, drops, seconds):
    """Write the manifest and log the split's closing summary; returns the summary."""
    records = dict(made)
    for i in done:
        records[i] = read_record(split_dir, sample_id(i))
    write_manifest(split_dir, [records[i] for i in range(size)])
    rate = f", {len(made) / seconds:.1f} samples/s" if made and seconds > 0 else ""
    logger.info("%s: %d samples in %s (%d made, %d already there%s); candidates dropped: %s",
                name, size, split_dir, len(made), len(done), rate, _format_drops(drops))
    return {"split": name, "dir": str(split_dir), "size": size, "made": len(made), "reused": len(done),
            "seconds": seconds, "dropped": {k: drops[k] for k in DROP_REASONS if drops.get(k)}}


# ----------------------------------------------------------------------------- everything


def _check_numbers(processes, train_size, test_size, seed):
    if processes < 1:
        raise UserError(f"-p must be at least 1, got {processes}")
    if train_size < 0 or test_size < 0:
        raise UserError(f"--train_size and --test_size must not be negative, got {train_size} and {test_size}")
    if seed < 0:
        raise UserError(f"--seed must not be negative, got {seed}")


def _check_speakers(speakers, sizes, pattern):
    for name, size in sizes.items():
        n = len(speakers[name])
        if size and n < 2:
            raise UserError(f"need at least two {name} speakers with two or more '{pattern}' files, found {n}")
        if size and size > speakers[name].triplet_count():
            raise UserError(f"{name}: {size} samples asked for but the data holds only "
                            f"{speakers[name].triplet_count()} distinct (reference, target, interference) triplets")


@contextlib.contextmanager
def worker_pool(processes, total, initializer, initargs, worker_state):
    """Yield the pool of worker processes for ``total`` jobs (None: this process does the work, set
    up as a worker by ``initializer(*initargs, in_pool=False)``). On an error or Ctrl-C the workers
    are terminated, so none outlives the run; ``worker_state`` (this process's worker dict, e.g.
    its audio cache) is cleared on the way out."""
    workers = min(processes, total)
    pool = None
    if workers > 1:
        logger.info("starting %d worker processes", workers)
        pool = _process_context().Pool(workers, initializer=initializer, initargs=initargs)
    elif total:
        initializer(*initargs, in_pool=False)
    try:
        yield pool
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
            pool = None
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        worker_state.clear()


def generate(hp, libri_dir=None, out_dir="", train_size=40, test_size=20, processes=None, reverse=False, seed=0,
             vad=False, only_dev=False, vox_dir=None, train_subsets=DEFAULT_TRAIN_SUBSETS,
             test_subsets=DEFAULT_TEST_SUBSETS, exclude_test_speakers=True, holdout=(), float16=False,
             input_glob=None, progress=True):
    """Generate ``OUT/train`` and ``OUT/test`` (see the module docstring).

    Parameters
    ----------
    hp : HParam; uses audio, data.audio_len, form and embedder.window.
    libri_dir, vox_dir : LibriSpeech root (with the subset folders) or VoxCeleb root; one of them.
    train_size, test_size : samples per split (exact).
    processes : worker processes (default: all cores); 1 works in this process.
    reverse : write the interference as the target (the reverse task); the mixtures do not change.
    seed : the same seed gives byte-identical output whatever ``processes``.
    vad : concatenate the non-silent parts of target and interference.
    only_dev : add the test speakers to training (train and test then share speakers); the
        training subsets may then be missing or unusable.
    train_subsets, test_subsets : LibriSpeech subset folder names.
    exclude_test_speakers : never train on a test speaker (unless ``only_dev``).
    holdout : speaker ids never used for training.
    float16 : store the spectrograms as float16.
    input_glob : utterance file pattern; default ``hp.form.input``.

    Returns
    -------
    {split: {"split", "dir", "size", "made", "reused", "dropped": {reason: n}, "seconds"}}
    """
    processes = default_processes() if processes is None else processes
    _check_numbers(processes, train_size, test_size, seed)
    pattern = input_glob or hp.form.input
    sizes = {"train": train_size, "test": test_size}
    train, test, source = split_speakers(
        libri_dir, vox_dir, pattern, train_subsets, test_subsets, only_dev=only_dev,
        exclude_test_speakers=exclude_test_speakers, holdout=holdout, need_train=train_size > 0,
        need_test=test_size > 0)
    speakers = {"train": Speakers(train), "test": Speakers(test)}
    _check_speakers(speakers, sizes, pattern)

    out = Path(out_dir)
    plans, todo, done = {}, {}, {}
    for name, size in sizes.items():
        split_dir = out / name
        prepare_split_dir(split_dir, _settings(hp, name, size, seed, reverse, vad, float16, pattern,
                                               speakers[name], source))
        done[name] = complete_ids(split_dir, hp.form, size)
        todo[name] = sorted(set(range(size)) - set(done[name]))
        plans[name] = plan_candidates(speakers[name], size, seed, SPLIT_CODES[name]) if todo[name] else None
        if done[name]:
            logger.info("%s: %d of %d samples already there, making the other %d",
                        name, len(done[name]), size, len(todo[name]))

    splits = {SPLIT_CODES[n]: (str(out / n), speakers[n]) for n in sizes}
    init = (hp.hp_str, splits, bool(reverse), bool(vad), bool(float16))
    summaries = {}
    with worker_pool(processes, sum(len(t) for t in todo.values()), init_worker, init, _WORKER) as pool:
        for name, size in sizes.items():
            start = time.perf_counter()
            made, drops = _run_split(name, todo[name], plans[name], pool, progress, hp.data.audio_len) \
                if todo[name] else ({}, Counter())
            summaries[name] = _finish_split(name, out / name, size, made, done[name], drops,
                                            time.perf_counter() - start)
    return summaries


def _process_context():
    """Where available, a fork server: one clean process (no threads, no torch state) imports the
    worker modules once and forks the workers from itself, so they start in milliseconds; elsewhere,
    spawn. Both give the same output (the workers keep no state that changes it)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(WORKER_MODULES)
        return ctx
    return multiprocessing.get_context("spawn")


def default_processes():
    """All cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
