"""Mixture generation: exact, seeded, resumable, and the same whatever the process count.

What one sample is (the original's recipe): two different speakers; two
different utterances of speaker 1 (the d-vector reference and the target) and
one of speaker 2 (the interference); each loaded at 16 kHz mono with its
leading and trailing silence trimmed (top_db 20); dropped when the reference is
shorter than 1.1 x embedder.window x hop_length samples or, after the optional
VAD merge, the target or the interference is shorter than ``audio_len``; the
first ``audio_len`` seconds of both are summed and all three are divided by
1.1 x max|mixed|.

How the output stays exact and deterministic without the workers talking to
each other:

* the plan: for every sample index ``i`` the main process draws
  ``MAX_ATTEMPTS`` candidate triplets (reference, target, interference) from
  block ``i`` of the random stream ``numpy.random.default_rng([seed,
  split_code])``; a candidate equal to
  one drawn earlier (lower index, or lower attempt of the same index) is
  struck out. Index ``i``'s candidates depend only on the seed, the split, the
  data and ``i`` (never on the size asked for, ``-p`` or ``--reverse_data``),
  so a bigger ``--train_size`` extends a set, and ``--reverse_data True`` gives
  the same mixtures;
* a worker turns index ``i`` into the first of its candidates whose audio is
  long enough (the later candidates are the retries of a dropped one), so
  exactly the asked-for count comes out, ids contiguous from ``000000``, no
  two with the same triplet, whatever the scheduling;
* every file is written to a temporary name and renamed; the ``-dvec.txt`` is
  written last, so a sample is complete once it exists; a rerun skips complete
  samples and remakes the rest byte for byte.

``OUT/<split>/generation.json`` records the settings; a rerun with other
settings into a folder holding samples is refused. ``OUT/<split>/.records/``
keeps one JSON record per sample, from which ``manifest.jsonl`` is rebuilt in
id order at the end of every run.
"""
import hashlib
import json
import logging
import multiprocessing
import os
import re
import signal
import time
from collections import Counter, OrderedDict
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
VOXCELEB_TEST_SPEAKERS = 20          # the original took the last 20 VoxCeleb folders as the test set
MAX_ATTEMPTS = 32                    # candidates per sample: a dropped one is retried with the next
TOP_DB = 20                          # librosa trim/split threshold of the original
REFERENCE_MIN_FACTOR = 1.1           # reference >= 1.1 * embedder.window * hop_length samples
NORM_HEADROOM = 1.1                  # all audio divided by 1.1 * max|mixed|
SPLIT_CODES = {"train": 1, "test": 2}
SETTINGS_FILE = "generation.json"
RECORDS_DIR = ".records"
FORMAT_VERSION = 2
CACHE_ENTRIES = 256                  # per-worker cache of trimmed audio heads (about 50 MB at 3 s)

DROP_REASONS = ("unreadable file", "reference too short", "target too short", "interference too short")
_SAMPLE_NAME = re.compile(r"^\.?(\d{6,})[-.]")


# ----------------------------------------------------------------------------- speakers


class Speakers:
    """The utterances of one split, as flat arrays the plan can index.

    ``names[s]`` is speaker ``s``'s id (folder name), its utterances are
    ``paths[offsets[s] : offsets[s] + counts[s]]`` (sorted absolute paths).
    """

    def __init__(self, utterances):
        """``utterances``: {speaker id: [paths]} of speakers with 2+ utterances."""
        self.names = sorted(utterances)
        self.paths = [p for name in self.names for p in utterances[name]]
        self.counts = np.array([len(utterances[n]) for n in self.names], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.speaker_of = np.repeat(np.arange(len(self.names)), self.counts)

    def __len__(self):
        return len(self.names)

    def triplet_count(self):
        """How many distinct (reference, target, interference) triplets the data holds."""
        c = self.counts.astype(np.float64)
        return int(np.sum(c * (c - 1) * (len(self.paths) - c)))

    def digest(self):
        h = hashlib.sha1()
        for name in self.names:
            h.update(name.encode() + b"\0")
        for path in self.paths:
            h.update(path.encode() + b"\0")
        return h.hexdigest()


def find_speakers(folders, pattern, speaker_dirs=None):
    """``{speaker: [utterance paths]}`` of every speaker folder in ``folders`` (or of ``speaker_dirs``).

    Utterances are the files under the speaker folder matching ``pattern``
    (recursively), as absolute paths; a speaker found in several folders gets
    all its utterances; speakers with fewer than two are dropped (logged).
    """
    if speaker_dirs is None:
        speaker_dirs = [p for folder in folders for p in sorted(Path(folder).iterdir()) if p.is_dir()]
    found = {}
    for speaker_dir in speaker_dirs:
        files = [os.path.abspath(p) for p in Path(speaker_dir).rglob(pattern) if p.is_file()]
        found.setdefault(Path(speaker_dir).name, []).extend(files)
    speakers = {name: sorted(files) for name, files in found.items() if len(files) >= 2}
    if len(speakers) < len(found):
        logger.info("%d of %d speaker folders have fewer than two '%s' files and are skipped",
                    len(found) - len(speakers), len(found), pattern)
    return speakers


def _no_speakers_hint(folders, pattern):
    """Why no speaker was found: a hint naming what is there instead."""
    for other in ("*.flac", "*.wav"):
        if other != pattern and any(next(Path(f).rglob(other), None) for f in folders):
            return (f"; the folders hold {other} files: run utils/normalize-resample.sh (or "
                    f"python -m prepare.normalize) or pass --input_glob '{other}'")
    return ""


def _subset_folders(root, names, role):
    """The folders of LibriSpeech subsets ``names`` under ``root``; a missing one is an error.

    As the original, the default training subsets may be partly absent (many
    people download train-clean-100 only): a missing one is a warning.
    """
    missing = [n for n in names if not (root / n).is_dir()]
    if missing and role == "train" and tuple(names) == DEFAULT_TRAIN_SUBSETS and len(missing) < len(names):
        logger.warning("LibriSpeech subset %s not found under %s: training on %s only", ", ".join(missing), root,
                       ", ".join(n for n in names if n not in missing))
        return [root / n for n in names if n not in missing]
    if missing:
        raise UserError(f"LibriSpeech subset folder {root / missing[0]} not found "
                        f"(choose the {role} subsets with --{role}_subsets)")
    return [root / n for n in names]


def read_speaker_list(path):
    """Speaker ids from a text file: one per line, first token; '#' and ';' start comments."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"speaker list not found: {path}")
    ids = []
    for line in path.read_text().splitlines():
        line = re.split(r"[#;]", line, maxsplit=1)[0].strip()
        if line:
            ids.append(re.split(r"[\s|,]+", line, maxsplit=1)[0])
    return ids


def split_speakers(libri_dir=None, vox_dir=None, pattern="*-norm.wav", train_subsets=DEFAULT_TRAIN_SUBSETS,
                   test_subsets=DEFAULT_TEST_SUBSETS, only_dev=False, exclude_test_speakers=True, holdout=(),
                   need_train=True, need_test=True):
    """``(train, test, source)``: {speaker: [paths]} of each split and a description of the data.

    LibriSpeech: train = every speaker folder of ``train_subsets``, test =
    those of ``test_subsets``. VoxCeleb: all speaker folders (sorted), the
    last 20 for test. ``only_dev`` adds the test speakers to train (as the
    original; train and test then share speakers); otherwise, with
    ``exclude_test_speakers``, a test speaker is never a train speaker (a no-op
    for the default subsets, which are disjoint). ``holdout`` speaker ids are
    never used for training.
    """
    if libri_dir and vox_dir:
        raise UserError("give either -d LIBRI_DIR or -v VOXCELEB_DIR, not both")
    if not libri_dir and not vox_dir:
        raise UserError("give the data folder with -d LIBRI_DIR (or -v VOXCELEB_DIR)")
    root = Path(vox_dir or libri_dir)
    if not root.is_dir():
        raise UserError(f"data folder not found: {root}")
    if vox_dir:
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        n_test = min(VOXCELEB_TEST_SPEAKERS, len(folders))
        train_folders, test_folders = folders[:len(folders) - n_test], folders[len(folders) - n_test:]
        train = find_speakers([], pattern, train_folders) if need_train or only_dev else {}
        test = find_speakers([], pattern, test_folders)
        train_desc, test_desc = [str(root)], [str(root)]
    else:
        if need_test or only_dev:
            test_dirs = _subset_folders(root, list(test_subsets), "test")
        elif exclude_test_speakers:  # no test set asked for, but its speakers still stay out of training
            test_dirs = [root / n for n in test_subsets if (root / n).is_dir()]
        else:
            test_dirs = []
        train_dirs = _subset_folders(root, list(train_subsets), "train") if need_train else []
        test = find_speakers(test_dirs, pattern)
        train = find_speakers(train_dirs, pattern)
        train_desc, test_desc = [str(d) for d in train_dirs], [str(d) for d in test_dirs]
        if need_train and not train:
            raise UserError(f"no training speaker with two or more '{pattern}' files in "
                            f"{', '.join(train_desc)}{_no_speakers_hint(train_dirs, pattern)}")
        if need_test and not test:
            raise UserError(f"no test speaker with two or more '{pattern}' files in "
                            f"{', '.join(test_desc)}{_no_speakers_hint(test_dirs, pattern)}")
    if only_dev:
        logger.warning("--only_dev True: the test speakers are added to training, so train and test share "
                       "speakers and test scores will look better than on unseen speakers")
        for name, files in test.items():
            train[name] = sorted(set(train.get(name, [])) | set(files))
    elif exclude_test_speakers:
        shared = sorted(set(train) & set(test))
        train = {k: v for k, v in train.items() if k not in test}
        if shared and need_train:
            if len(train) < 2:
                raise UserError(f"the training subsets hold {len(shared)} test speakers and {len(train)} other "
                                f"speakers: choose other --train_subsets/--test_subsets, or pass "
                                f"--exclude_test_speakers False to train on the test speakers")
            logger.warning("%d test speakers are also in the training subsets: left out of training "
                           "(--exclude_test_speakers False keeps them)", len(shared))
    elif set(train) & set(test):
        logger.warning("train and test share %d speakers (--exclude_test_speakers False)",
                       len(set(train) & set(test)))
    if holdout:
        holdout = set(holdout)
        unknown = holdout - set(train) - set(test)
        if unknown:
            logger.warning("%d of the %d hold-out speaker ids are not in the data (e.g. %s)",
                           len(unknown), len(holdout), sorted(unknown)[0])
        train = {k: v for k, v in train.items() if k not in holdout}
    source = {"root": os.path.abspath(root), "kind": "voxceleb" if vox_dir else "librispeech",
              "train": train_desc, "test": test_desc}
    return train, test, source


# ----------------------------------------------------------------------------- the plan


def _pick(u, n):
    """Uniform integers in [0, n) from uniform floats ``u`` in [0, 1) (elementwise ``n``)."""
    return np.minimum((u * n).astype(np.int64), n - 1)


def plan_candidates(speakers, size, seed, split_code):
    """Candidate triplets of each sample: int array [size, MAX_ATTEMPTS, 3] of utterance indices.

    Row ``[i, a]`` is attempt ``a`` of sample ``i``: (reference, target,
    interference) indices into ``speakers.paths``, drawn as the original drew
    (two different speakers uniformly, then two different utterances of the
    first and one of the second). Sample ``i`` owns block ``i`` (5 x
    MAX_ATTEMPTS uniform numbers) of the split's random stream
    ``default_rng([seed, split_code])``, so its candidates depend on the seed,
    the split, the data and ``i`` only. A triplet already drawn at an earlier
    (index, attempt) is struck out (set to -1): no two samples can be alike.
    """
    cand = np.full((size, MAX_ATTEMPTS, 3), -1, dtype=np.int64)
    if size == 0:
        return cand
    rng = np.random.default_rng([seed, split_code])
    n_speakers, counts, offsets = len(speakers), speakers.counts, speakers.offsets
    block = 8192
    for start in range(0, size, block):
        u = rng.random((min(block, size - start), 5, MAX_ATTEMPTS))  # [n, 5, K], row i = sample start + i
        s1 = _pick(u[:, 0], n_speakers)
        s2 = _pick(u[:, 1], n_speakers - 1)
        s2 += s2 >= s1
        ref = _pick(u[:, 2], counts[s1])
        tgt = _pick(u[:, 3], counts[s1] - 1)
        tgt += tgt >= ref
        itf = _pick(u[:, 4], counts[s2])
        rows = cand[start:start + len(u)]
        rows[..., 0], rows[..., 1], rows[..., 2] = offsets[s1] + ref, offsets[s1] + tgt, offsets[s2] + itf
    flat = cand.reshape(-1, 3)
    n = len(speakers.paths)
    if n < 2 ** 20:
        keys = (flat[:, 0] * n + flat[:, 1]) * n + flat[:, 2]
        first = np.unique(keys, return_index=True)[1]
    else:
        first = np.unique(flat, axis=0, return_index=True)[1]
    keep = np.zeros(len(flat), dtype=bool)
    keep[first] = True
    flat[~keep] = -1
    return cand


# ----------------------------------------------------------------------------- one sample


def vad_merge(wav):
    """The non-silent intervals (top_db 20) of ``wav`` [N], concatenated."""
    intervals = librosa.effects.split(wav, top_db=TOP_DB)
    return np.concatenate([wav[s:e] for s, e in intervals]) if len(intervals) else wav[:0]


class TrimmedAudio:
    """LRU cache of what a sample needs of an utterance, per worker.

    For each file: the trimmed length (the reference test), the length after
    the optional VAD merge and its first ``length`` samples (the target and
    interference), or the reason it cannot be read. A file picked again is not
    decoded and trimmed again.
    """

    def __init__(self, sample_rate, length, vad, capacity=CACHE_ENTRIES):
        self.sample_rate, self.length, self.vad, self.capacity = sample_rate, length, vad, capacity
        self._entries = OrderedDict()

    def get(self, path):
        """``(trimmed_len, usable_len, head [<= length] float32)``, or None for an unreadable file."""
        if path in self._entries:
            self._entries.move_to_end(path)
            return self._entries[path]
        try:
            wav = load_wav(path, self.sample_rate)
        except AudioError as err:
            logger.warning("%s", err)
            entry = None
        else:
            trimmed, _ = librosa.effects.trim(wav, top_db=TOP_DB)
            usable = vad_merge(trimmed) if self.vad else trimmed
            entry = (trimmed.shape[0], usable.shape[0], np.array(usable[:self.length]))
        self._entries[path] = entry
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return entry


def mix_candidate(cache, reference, target, interference, reference_min):
    """The original's sample recipe; ``(target_wav, interference_wav, mixed_wav)`` [L] or a drop reason."""
    ref = cache.get(reference)
    if ref is None:
        return "unreadable file"
    if ref[0] < reference_min:
        return "reference too short"
    tgt = cache.get(target)
    if tgt is None:
        return "unreadable file"
    if tgt[1] < cache.length:
        return "target too short"
    itf = cache.get(interference)
    if itf is None:
        return "unreadable file"
    if itf[1] < cache.length:
        return "interference too short"
    target_wav, interference_wav = tgt[2], itf[2]
    mixed_wav = target_wav + interference_wav
    norm = np.max(np.abs(mixed_wav)) * NORM_HEADROOM
    return target_wav / norm, interference_wav / norm, mixed_wav / norm


def magnitude(audio, wav):
    """Normalized log magnitude [T, F] float32: ``Audio.wav2spec(wav)[0]`` without the unused phase."""
    S = audio.amp_to_db(np.abs(audio.stft(np.asarray(wav, dtype=np.float32)))) - audio.hp.audio.ref_level_db
    return np.ascontiguousarray(audio.normalize(S).T.astype(np.float32))


def sample_paths(split_dir, form, sample_id):
    """Every file of sample ``sample_id``; the dvec.txt (written last) comes last."""
    split_dir = Path(split_dir)
    return {
        "target_wav": split_dir / (sample_id + form.target.wav.lstrip("*")),
        "mixed_wav": split_dir / (sample_id + form.mixed.wav.lstrip("*")),
        "target_mag": split_dir / (sample_id + form.target.mag.lstrip("*")),
        "mixed_mag": split_dir / (sample_id + form.mixed.mag.lstrip("*")),
        "record": split_dir / RECORDS_DIR / f"{sample_id}.json",
        "dvec": split_dir / (sample_id + form.dvec.lstrip("*")),
    }


def write_text(path, text):
    """Write ``text`` to ``path`` atomically."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_tensor(array, path, float16):
    """``torch.save`` a [T, F] array as a float32 (or float16) tensor, atomically."""
    tensor = torch.from_numpy(array)
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    torch.save(tensor.half() if float16 else tensor, tmp)
    os.replace(tmp, path)


# Per-process state of the workers (set by init_worker; also used in-process when -p 1).
_WORKER = {}


def init_worker(hp_str, splits, reverse, vad, float16, in_pool=True):
    """Pool initializer. ``splits``: {split_code: (split_dir, [utterance paths], [speaker of each])}."""
    from utils.hparams import HParam

    if in_pool:
        torch.set_num_threads(1)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    hp = HParam.from_string(hp_str)
    sr = hp.audio.sample_rate
    _WORKER.clear()
    _WORKER.update(
        hp=hp, audio=Audio(hp), splits=splits, reverse=reverse, float16=float16,
        cache=TrimmedAudio(sr, int(sr * hp.data.audio_len), vad),
        reference_min=REFERENCE_MIN_FACTOR * hp.embedder.window * hp.audio.hop_length,
    )


def make_sample(job):
    """Write one sample. ``job``: (split_code, index, candidates [[ref, tgt, itf], ...]).

    Returns ``(split_code, index, record or None, Counter of drop reasons)``;
    None when every candidate was dropped.
    """
    split_code, index, candidates = job
    w = _WORKER
    hp, cache = w["hp"], w["cache"]
    split_dir, paths, speaker_of = w["splits"][split_code]
    drops = Counter()
    for ref, tgt, itf in candidates:
        reference, target, interference = paths[ref], paths[tgt], paths[itf]
        result = mix_candidate(cache, reference, target, interference, w["reference_min"])
        if isinstance(result, str):
            drops[result] += 1
            continue
        target_wav, interference_wav, mixed_wav = result
        written = interference_wav if w["reverse"] else target_wav
        sample_id = f"{index:06d}"
        out = sample_paths(split_dir, hp.form, sample_id)
        record = {"id": sample_id, "reference": reference, "target": target, "interference": interference,
                  "target_speaker": speaker_of[ref], "interference_speaker": speaker_of[itf],
                  "reversed": w["reverse"]}
        sr = hp.audio.sample_rate
        save_wav(out["target_wav"], written, sr)
        save_wav(out["mixed_wav"], mixed_wav, sr)
        save_tensor(magnitude(w["audio"], written), out["target_mag"], w["float16"])
        save_tensor(magnitude(w["audio"], mixed_wav), out["mixed_mag"], w["float16"])
        write_text(out["record"], json.dumps(record))
        write_text(out["dvec"], reference)  # last: the sample is complete once this exists
        return split_code, index, record, drops
    return split_code, index, None, drops


# ----------------------------------------------------------------------------- one split


AUDIO_KEYS = ("sample_rate", "n_fft", "hop_length", "win_length", "min_level_db", "ref_level_db")


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


def _existing_ids(split_dir):
    """Sample ids that have any file (or record) in ``split_dir``."""
    ids = set()
    for folder in (split_dir, split_dir / RECORDS_DIR):
        if folder.is_dir():
            for name in os.listdir(folder):
                m = _SAMPLE_NAME.match(name)
                if m:
                    ids.add(int(m.group(1)))
    return ids


def prepare_split_dir(split_dir, settings):
    """Create ``split_dir``, clear stale temporaries and check earlier settings.

    A folder holding samples made with other settings (seed, reverse, config,
    data...) is refused; a different size is fine when it only extends the set
    (the plan of index i does not depend on the size), refused when samples
    beyond the new size exist.
    """
    try:
        (split_dir / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
        probe = split_dir / ".write-test.tmp"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to output folder {split_dir}: {err.strerror or err}") from None
    for folder in (split_dir, split_dir / RECORDS_DIR):
        for name in os.listdir(folder):
            if name.endswith(".tmp") and (_SAMPLE_NAME.match(name) or name.startswith((SETTINGS_FILE, MANIFEST))):
                (folder / name).unlink(missing_ok=True)
    existing = _existing_ids(split_dir)
    settings_path = split_dir / SETTINGS_FILE
    if existing and not settings_path.is_file():
        raise UserError(f"{split_dir} already holds samples not made by this generator (no {SETTINGS_FILE}); "
                        f"use another -o or empty it")
    if settings_path.is_file() and existing:
        before = json.loads(settings_path.read_text())
        changed = sorted(k for k in set(before) | set(settings) if k != "size" and before.get(k) != settings.get(k))
        if changed:
            shown = ", ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" if not isinstance(
                settings.get(k), dict) else k for k in changed)
            raise UserError(f"{split_dir} holds samples generated with other settings ({shown}); "
                            f"rerun with the same settings, use another -o, or delete the folder")
        beyond = sorted(i for i in existing if i >= settings["size"])
        if beyond:
            raise UserError(f"{split_dir} holds samples up to {max(beyond):06d}, more than the "
                            f"{settings['size']} asked for; ask for at least {max(beyond) + 1} or use another -o")
        if before.get("size") != settings["size"]:
            logger.info("%s: extending from %s to %d samples", split_dir, before.get("size"), settings["size"])
    write_text(settings_path, json.dumps(settings, indent=1, sort_keys=True) + "\n")


def _done_ids(split_dir, form, size):
    """Indices below ``size`` whose files are all there."""
    names = set(os.listdir(split_dir))
    records = set(os.listdir(split_dir / RECORDS_DIR))
    done = []
    for i in range(size):
        p = sample_paths(split_dir, form, f"{i:06d}")
        if p["record"].name in records and all(v.name in names for k, v in p.items() if k != "record"):
            done.append(i)
    return done


def _jobs(split_code, indices, candidates):
    for i in indices:
        rows = candidates[i]
        yield split_code, i, rows[rows[:, 0] >= 0].tolist()


def _format_drops(drops):
    return ", ".join(f"{drops[k]} {k}" for k in DROP_REASONS if drops.get(k)) or "none"


def _run_split(name, todo, candidates, pool, progress, audio_len):
    """Make samples ``todo`` of one split; returns (records made, drop counter)."""
    split_code = SPLIT_CODES[name]
    jobs = _jobs(split_code, todo, candidates)
    if pool is None:
        results = map(make_sample, jobs)
    else:
        chunk = max(1, min(16, len(todo) // (pool._processes * 8) or 1))
        results = pool.imap_unordered(make_sample, jobs, chunksize=chunk)
    records, drops = {}, Counter()
    with tqdm(total=len(todo), desc=f"{name} samples", unit="sample", disable=not progress) as bar:
        for _, index, record, dropped in results:
            drops.update(dropped)
            if record is None:
                struck = int(np.sum(candidates[index, :, 0] < 0))
                repeats = f"; {struck} more were repeats of earlier samples' candidates" if struck else ""
                raise UserError(
                    f"{name}: all {MAX_ATTEMPTS - struck} candidates of sample {index:06d} were dropped "
                    f"({_format_drops(drops)} so far{repeats}): the data has too few utterances long enough "
                    f"for data.audio_len {audio_len} s (or too few distinct triplets); use more data, a "
                    f"shorter data.audio_len or --vad 0 (the samples made so far are kept)")
            records[index] = record
            bar.update()
    return records, drops


# ----------------------------------------------------------------------------- everything


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
    only_dev : add the test speakers to training (train and test then share speakers).
    train_subsets, test_subsets : LibriSpeech subset folder names.
    exclude_test_speakers : never train on a test speaker (unless ``only_dev``).
    holdout : speaker ids never used for training.
    float16 : store the spectrograms as float16.
    input_glob : utterance file pattern; default ``hp.form.input``.

    Returns
    -------
    {split: {"split", "dir", "size", "made", "reused", "dropped": {reason: n}, "seconds"}}
    """
    if processes is None:
        processes = default_processes()
    if processes < 1:
        raise UserError(f"-p must be at least 1, got {processes}")
    if train_size < 0 or test_size < 0:
        raise UserError(f"--train_size and --test_size must not be negative, got {train_size} and {test_size}")
    if seed < 0:
        raise UserError(f"--seed must not be negative, got {seed}")
    pattern = input_glob or hp.form.input
    sizes = {"train": train_size, "test": test_size}
    train, test, source = split_speakers(
        libri_dir, vox_dir, pattern, train_subsets, test_subsets, only_dev=only_dev,
        exclude_test_speakers=exclude_test_speakers, holdout=holdout, need_train=train_size > 0,
        need_test=test_size > 0)
    speakers = {"train": Speakers(train), "test": Speakers(test)}
    for name, size in sizes.items():
        n = len(speakers[name])
        if size and n < 2:
            raise UserError(f"need at least two {name} speakers with two or more '{pattern}' files, found {n}")
        if size and size > speakers[name].triplet_count():
            raise UserError(f"{name}: {size} samples asked for but the data holds only "
                            f"{speakers[name].triplet_count()} distinct (reference, target, interference) triplets")

    out = Path(out_dir)
    plans, todo, done = {}, {}, {}
    for name, size in sizes.items():
        split_dir = out / name
        settings = _settings(hp, name, size, seed, reverse, vad, float16, pattern, speakers[name], source)
        prepare_split_dir(split_dir, settings)
        done[name] = _done_ids(split_dir, hp.form, size)
        todo[name] = sorted(set(range(size)) - set(done[name]))
        plans[name] = plan_candidates(speakers[name], size, seed, SPLIT_CODES[name]) if todo[name] else None
        if done[name]:
            logger.info("%s: %d of %d samples already there, making the other %d",
                        name, len(done[name]), size, len(todo[name]))

    splits = {SPLIT_CODES[n]: (str(out / n), speakers[n].paths, [speakers[n].names[s] for s in speakers[n].speaker_of])
              for n in sizes}
    init = (hp.hp_str, splits, bool(reverse), bool(vad), bool(float16))
    total = sum(len(t) for t in todo.values())
    workers = min(processes, total)
    pool = None
    if workers > 1:
        pool = _process_context().Pool(workers, initializer=init_worker, initargs=init)
    elif total:
        init_worker(*init, in_pool=False)
    summaries = {}
    try:
        for name, size in sizes.items():
            split_dir = out / name
            start = time.perf_counter()
            made, drops = _run_split(name, todo[name], plans[name], pool, progress, hp.data.audio_len) \
                if todo[name] else ({}, Counter())
            seconds = time.perf_counter() - start
            records = dict(made)
            for i in done[name]:
                records[i] = json.loads(sample_paths(split_dir, hp.form, f"{i:06d}")["record"].read_text())
            write_text(split_dir / MANIFEST, "".join(json.dumps(records[i]) + "\n" for i in range(size)))
            summaries[name] = {"split": name, "dir": str(split_dir), "size": size, "made": len(made),
                               "reused": len(done[name]), "seconds": seconds,
                               "dropped": {k: drops[k] for k in DROP_REASONS if drops.get(k)}}
            rate = f", {len(made) / seconds:.1f} samples/s" if made and seconds > 0 else ""
            logger.info("%s: %d samples in %s (%d made, %d already there%s); candidates dropped: %s",
                        name, size, split_dir, len(made), len(done[name]), rate, _format_drops(drops))
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
        _WORKER.clear()  # the in-process cache of audio (-p 1)
    return summaries


# What the workers need, imported once by the fork server rather than once per worker.
WORKER_MODULES = ["datasets.generation", "utils.hparams", "librosa.effects", "librosa.core.spectrum"]


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
