"""Mixture generation: exact, seeded, resumable, and the same whatever the process count.

How determinism and uniqueness are kept without the workers talking to each
other: the main process draws, from one generator seeded by (seed, split), a
list of candidate triplets (reference, target, interference) for every sample
index, each triplet used in at most one list. A worker turns index ``i`` into
the first candidate of list ``i`` whose audio is long enough. So the output
depends only on the seed and the data, never on ``-p`` or on scheduling, no
two samples share a triplet, and exactly the requested count comes out.
``reverse`` only swaps which voice is written as the target, so the same seed
gives the same mixtures both ways.
"""
import functools
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import librosa
import numpy as np
import torch
from tqdm import tqdm

from datasets.samples import MANIFEST
from utils.audio import Audio, AudioError, load_wav, save_wav
from utils.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_TRAIN_SUBSETS = ("train-clean-100", "train-clean-360")
DEFAULT_TEST_SUBSETS = ("dev-clean",)
VOXCELEB_TEST_SPEAKERS = 20
CANDIDATES_PER_SAMPLE = 32
SETTINGS_FILE = "generation.json"
RECORDS_DIR = ".records"
TOP_DB = 20


@dataclass(frozen=True)
class Job:
    index: int
    candidates: tuple  # ((reference, target, interference, target_speaker, interference_speaker), ...)


def find_speakers(folders, pattern):
    """``{speaker: [utterance paths]}`` of every speaker folder under ``folders`` (2+ utterances)."""
    speakers = {}
    for folder in folders:
        for speaker_dir in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
            files = sorted(str(p) for p in speaker_dir.rglob(pattern))
            if len(files) >= 2:
                speakers[speaker_dir.name] = files
    return speakers


def split_speakers(libri_dir, vox_dir, train_subsets, test_subsets, pattern, only_dev, holdout):
    """Train and test speakers as the original chose them (plus subset choice and hold-out)."""
    if vox_dir:
        vox = Path(vox_dir)
        if not vox.is_dir():
            raise UserError(f"VoxCeleb folder not found: {vox}")
        folders = sorted(p for p in vox.iterdir() if p.is_dir())
        everyone = find_speakers([vox], pattern)
        names = [p.name for p in folders if p.name in everyone]
        test = {n: everyone[n] for n in names[-VOXCELEB_TEST_SPEAKERS:]}
        train = {n: everyone[n] for n in names[:-VOXCELEB_TEST_SPEAKERS]}
        return train, test
    root = Path(libri_dir)
    if not root.is_dir():
        raise UserError(f"data folder not found: {root}")

    def subset_folders(names):
        missing = [n for n in names if not (root / n).is_dir()]
        if missing and tuple(names) == DEFAULT_TRAIN_SUBSETS and len(missing) < len(names):
            # as the original: train on whichever of the default subsets is there
            logger.info("subset %s not found under %s; using %s", missing[0], root,
                        ", ".join(n for n in names if n not in missing))
            return [root / n for n in names if n not in missing]
        if missing:
            raise UserError(f"LibriSpeech subset folder {root / missing[0]} not found "
                            f"(choose subsets with --train_subsets/--test_subsets)")
        return [root / n for n in names]

    test = find_speakers(subset_folders(test_subsets), pattern)
    train = find_speakers(subset_folders(train_subsets), pattern) if train_subsets else {}
    if only_dev:
        logger.warning("--only_dev True: the test speakers are added to training, so train and test share speakers")
        train.update(test)
    elif holdout:
        train = {s: u for s, u in train.items() if s not in holdout and s not in test}
    return train, test


def plan(speakers, size, seed, split_code):
    """Candidate triplets for each of ``size`` samples; no triplet appears twice."""
    names = sorted(speakers)
    if size and len(names) < 2:
        raise UserError(f"need at least two speakers with two usable utterances each, found {len(names)}")
    rng = np.random.default_rng([seed, split_code])
    used = set()
    jobs = []
    for index in range(size):
        candidates = []
        for _ in range(CANDIDATES_PER_SAMPLE * 4):
            if len(candidates) == CANDIDATES_PER_SAMPLE:
                break
            s1, s2 = rng.choice(len(names), size=2, replace=False)
            utts1, utts2 = speakers[names[s1]], speakers[names[s2]]
            ref, target = rng.choice(len(utts1), size=2, replace=False)
            triplet = (utts1[ref], utts1[target], utts2[rng.integers(len(utts2))])
            if triplet not in used:
                used.add(triplet)
                candidates.append((*triplet, names[s1], names[s2]))
        jobs.append(Job(index, tuple(candidates)))
    return jobs


@functools.lru_cache(maxsize=256)
def _trimmed(path, sample_rate):
    wav = load_wav(path, sample_rate)
    trimmed, _ = librosa.effects.trim(wav, top_db=TOP_DB)
    return trimmed


def _vad_merge(wav):
    intervals = librosa.effects.split(wav, top_db=TOP_DB)
    return np.concatenate([wav[s:e] for s, e in intervals]) if len(intervals) else wav[:0]


def mix(hp, reference, target, interference, vad):
    """The original's sample recipe; returns (target, interference, mixed) or a drop reason."""
    sr = hp.audio.sample_rate
    try:
        w1, w2, w3 = (_trimmed(p, sr) for p in (reference, target, interference))
    except AudioError:
        return "unreadable audio"
    if w1.shape[0] < 1.1 * hp.embedder.window * hp.audio.hop_length:
        return "reference too short"
    if vad:
        w2, w3 = _vad_merge(w2), _vad_merge(w3)
    length = int(sr * hp.data.audio_len)
    if w2.shape[0] < length:
        return "target too short"
    if w3.shape[0] < length:
        return "interference too short"
    w2, w3 = w2[:length], w3[:length]
    mixed = w2 + w3
    norm = np.max(np.abs(mixed)) * 1.1
    return w2 / norm, w3 / norm, mixed / norm


def _save_tensor(array, path, float16):
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    tmp = path.with_name(path.name + ".tmp")
    torch.save(tensor.half() if float16 else tensor, tmp)
    os.replace(tmp, path)


def _paths(out, hp, sample_id):
    f = hp.form
    return {
        "target_wav": out / (sample_id + f.target.wav.lstrip("*")),
        "mixed_wav": out / (sample_id + f.mixed.wav.lstrip("*")),
        "target_mag": out / (sample_id + f.target.mag.lstrip("*")),
        "mixed_mag": out / (sample_id + f.mixed.mag.lstrip("*")),
        "dvec": out / (sample_id + f.dvec.lstrip("*")),
        "record": out / RECORDS_DIR / f"{sample_id}.json",
    }


def _is_done(paths):
    return all(p.is_file() for p in paths.values())


_STATE = {}


def _init_worker(hp_str, out, reverse, vad, float16):
    from utils.hparams import HParam

    torch.set_num_threads(1)
    hp = HParam.from_string(hp_str)
    _STATE.update(hp=hp, audio=Audio(hp), out=Path(out), reverse=reverse, vad=vad, float16=float16)


def make_sample(job):
    """Write sample ``job.index``; return ``(index, record or None, drop reasons)``."""
    s = _STATE
    hp, out = s["hp"], s["out"]
    sample_id = f"{job.index:06d}"
    paths = _paths(out, hp, sample_id)
    if _is_done(paths):
        return job.index, json.loads(paths["record"].read_text()), Counter()
    drops = Counter()
    for reference, target, interference, spk1, spk2 in job.candidates:
        result = mix(hp, reference, target, interference, s["vad"])
        if isinstance(result, str):
            drops[result] += 1
            continue
        target_wav, interference_wav, mixed_wav = result
        written = interference_wav if s["reverse"] else target_wav
        # dvec.txt and the record last: a sample counts as done only when they exist
        save_wav(paths["target_wav"], written, hp.audio.sample_rate)
        save_wav(paths["mixed_wav"], mixed_wav, hp.audio.sample_rate)
        _save_tensor(s["audio"].wav2spec(written)[0], paths["target_mag"], s["float16"])
        _save_tensor(s["audio"].wav2spec(mixed_wav)[0], paths["mixed_mag"], s["float16"])
        record = {"id": sample_id, "reference": reference, "target": target, "interference": interference,
                  "target_speaker": spk1, "interference_speaker": spk2, "reversed": s["reverse"]}
        _write_text(paths["dvec"], reference)
        _write_text(paths["record"], json.dumps(record))
        return job.index, record, drops
    return job.index, None, drops


def _write_text(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _prepare_output(out, settings):
    try:
        (out / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to output folder {out}: {err.strerror}") from None
    for stale in out.glob("*.tmp"):
        stale.unlink()
    for stale in (out / RECORDS_DIR).glob("*.tmp"):
        stale.unlink()
    settings_path = out / SETTINGS_FILE
    if settings_path.is_file():
        before = json.loads(settings_path.read_text())
        if {k: v for k, v in before.items() if k != "size"} != {k: v for k, v in settings.items() if k != "size"}:
            changed = sorted(k for k in settings if before.get(k) != settings[k] and k != "size")
            raise UserError(f"{out} holds samples generated with other settings ({', '.join(changed)}); "
                            f"use another -o or delete it")
    _write_text(settings_path, json.dumps(settings, indent=1))


def generate_split(hp, speakers, out, size, seed, split_code, processes, reverse, vad, float16, name):
    """Generate one split; returns a summary dict (made, reused, dropped by reason)."""
    out = Path(out)
    settings = {"seed": seed, "reverse": reverse, "vad": vad, "float16": float16, "size": size,
                "audio": hp.audio.to_dict(), "audio_len": hp.data.audio_len, "input": hp.form.input,
                "speakers": sorted(speakers)}
    _prepare_output(out, settings)
    jobs = plan(speakers, size, seed, split_code)
    done_before = sum(_is_done(_paths(out, hp, f"{j.index:06d}")) for j in jobs)
    records, drops, failed = {}, Counter(), []
    init = (hp.hp_str, str(out), reverse, vad, float16)
    if processes == 1:
        _init_worker(*init)
        results = map(make_sample, jobs)
        pool = None
    else:
        pool = get_context("spawn").Pool(processes, initializer=_init_worker, initargs=init)
        results = pool.imap_unordered(make_sample, jobs, chunksize=max(1, min(64, size // (processes * 8) or 1)))
    try:
        for index, record, dropped in tqdm(results, total=len(jobs), desc=f"{name} samples", unit="sample"):
            drops.update(dropped)
            if record is None:
                failed.append(index)
            else:
                records[index] = record
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if failed:
        raise UserError(f"{name}: {len(failed)} samples could not be made: all {CANDIDATES_PER_SAMPLE} candidates "
                        f"of sample {failed[0]:06d} were dropped ({dict(drops)}); the data has too few long utterances")
    _write_text(out / MANIFEST, "".join(json.dumps(records[i]) + "\n" for i in sorted(records)))
    summary = {"split": name, "made": size - done_before, "reused": done_before, "dropped": dict(drops)}
    drop_text = ", ".join(f"{v} {k}" for k, v in sorted(drops.items())) or "none"
    logger.info("%s: %d samples in %s (%d made, %d already there); candidates dropped: %s",
                name, size, out, size - done_before, done_before, drop_text)
    return summary


def generate(hp, libri_dir, out_dir, train_size=40, test_size=20, processes=1, reverse=False, seed=0,
             vad=False, only_dev=False, vox_dir=None, train_subsets=DEFAULT_TRAIN_SUBSETS,
             test_subsets=DEFAULT_TEST_SUBSETS, holdout=(), float16=False):
    """Generate ``OUT/train`` and ``OUT/test``; returns the two split summaries."""
    if processes < 1:
        raise UserError("-p must be at least 1")
    if train_size < 0 or test_size < 0:
        raise UserError("--train_size and --test_size must not be negative")
    train, test = split_speakers(libri_dir, vox_dir, train_subsets, test_subsets, hp.form.input,
                                 only_dev, set(holdout))
    for name, speakers, size in (("train", train, train_size), ("test", test, test_size)):
        if size and len(speakers) < 2:
            raise UserError(f"no {name} data: need at least two speakers with two utterances matching "
                            f"'{hp.form.input}', found {len(speakers)} (check -d and the subsets)")
    out = Path(out_dir)
    return [
        generate_split(hp, train, out / "train", train_size, seed, 1, processes, reverse, vad, float16, "train"),
        generate_split(hp, test, out / "test", test_size, seed, 2, processes, reverse, vad, float16, "test"),
    ]
