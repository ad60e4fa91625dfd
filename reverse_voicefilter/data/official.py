"""Google's official VoiceFilter test set: the published LibriSpeech dev triplets, mixed as the authors did.

The VoiceFilter authors published their evaluation triplets
(``librispeech_dev_tuples.csv``: clean_utterance, embedding_utterance,
interference_utterance, LibriSpeech utterance ids over dev-clean and
dev-other). Their released demo mixtures show the recipe, which is not the
training generator's:

* mixture = clean + interference with gain 1; the interference is cut to the
  clean utterance's length or zero-padded at its end;
* whole utterances (no crop to ``data.audio_len``), no silence trimming, no
  level normalization, 16 kHz.

Which file of an utterance: the raw LibriSpeech ``.flac`` (16 kHz, 16-bit),
not the ``-norm.wav`` the training generator reads (``form.input``). The
``-norm.wav`` files are loudness-normalized (EBU R128) one by one, which
changes the level of clean against interference and so the input SDR the
paper reports (2.5 dB); the paper mixed the dev utterances as LibriSpeech
ships them. The d-vector reference (``-dvec.txt``) is the embedding
utterance's ``.flac`` too.

Sample ``NNNNNN`` is row ``NNNNNN`` (0-based, header excluded) of the triplet
file, so the same row has the same id for everyone; rows skipped with
``skip_missing`` leave a gap. The files are those of the trainer's format
(:mod:`reverse_voicefilter.data.samples`), written atomically with the ``-dvec.txt`` last,
into ``OUT/test``; a rerun skips complete samples and remakes the rest, and a
larger size extends the set.
"""
import csv
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reverse_voicefilter.core.audio import Audio, load_wav
from reverse_voicefilter.core.errors import UserError
from reverse_voicefilter.data.generation import AUDIO_KEYS, FORMAT_VERSION, counted, prepare_split_dir, worker_pool
from reverse_voicefilter.data.mixing import Mixture
from reverse_voicefilter.data.samples import complete_ids, read_record, sample_id, write_manifest, write_sample

logger = logging.getLogger(__name__)

COLUMNS = ("clean_utterance", "embedding_utterance", "interference_utterance")
DEFAULT_INPUT = "*.flac"    # the raw utterances (see the module docstring)
SPLIT = "test"
RECIPE = "official: clean + interference cut or zero-padded to the clean length, gain 1, whole, unnormalized"
_UTTERANCE_ID = re.compile(r"^(\d+)-(\d+)-(\d+)$")


# ----------------------------------------------------------------------------- the triplet file


@dataclass(frozen=True)
class Triplet:
    """One row of the triplet file: its 0-based row number, its line in the file, three utterance ids."""

    row: int
    line: int
    clean: str
    embedding: str
    interference: str


def read_triplets(path, limit=None):
    """The first ``limit`` rows (all when None) of a triplet file as :class:`Triplet`.

    A header line naming :data:`COLUMNS` is skipped; blank lines are ignored. A row that is
    not three LibriSpeech utterance ids is a :class:`UserError` naming its line (only rows
    up to ``limit`` are read, so a damaged tail does not stop a smaller set).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--tuples file not found: {path}")
    triplets = []
    with open(path, newline="", encoding="utf-8") as f:
        for line_no, fields in enumerate(csv.reader(f), start=1):
            if limit is not None and len(triplets) >= limit:
                break
            fields = [x.strip() for x in fields]
            if not any(fields):
                continue
            if not triplets and tuple(fields) == COLUMNS:
                continue
            if len(fields) != 3 or not all(_UTTERANCE_ID.match(x) for x in fields):
                shown = ",".join(fields)
                raise UserError(
                    f"{path} line {line_no}: expected three LibriSpeech utterance ids ({', '.join(COLUMNS)}), "
                    f"got {shown!r}" + (" (the file looks cut short: fetch it again, or pass --test_size "
                                        f"{len(triplets)} to use the rows before it)" if len(fields) < 3 else ""))
            triplets.append(Triplet(len(triplets), line_no, *fields))
    if limit is not None and len(triplets) < limit:
        raise UserError(f"--test_size {limit} asked for, but {path} holds only {len(triplets)} triplets")
    if not triplets:
        raise UserError(f"{path} holds no triplets")
    return triplets


# ----------------------------------------------------------------------------- where the utterances are


class UtteranceFinder:
    """LibriSpeech utterance id -> file under ``root``: ``SUBSET/SPEAKER/CHAPTER/ID<suffix>`` (any subset
    folder of the root), or ``SPEAKER/CHAPTER/ID<suffix>`` when the root is a subset folder itself."""

    def __init__(self, root, suffix=".flac"):
        self.root, self.suffix = Path(root), suffix
        self.bases = [self.root] + sorted(p for p in self.root.iterdir() if p.is_dir())
        self._found = {}

    def __call__(self, utterance):
        """Absolute path of ``utterance``'s file, or None when it is not under the root."""
        if utterance not in self._found:
            speaker, chapter, _ = utterance.split("-")
            tail = Path(speaker, chapter, utterance + self.suffix)
            hit = next((base / tail for base in self.bases if (base / tail).is_file()), None)
            self._found[utterance] = os.path.abspath(hit) if hit else None
        return self._found[utterance]


def resolve_triplets(triplets, finder, skip_missing=False):
    """``(jobs, skipped)``: ``jobs`` [(row, clean path, embedding path, interference path)] of the rows
    whose three files exist; rows naming a missing utterance are a :class:`UserError` naming the
    first (with ``skip_missing``: left out and counted in ``skipped``)."""
    jobs, missing = [], []
    for t in triplets:
        paths = [finder(u) for u in (t.clean, t.embedding, t.interference)]
        absent = [u for u, p in zip((t.clean, t.embedding, t.interference), paths, strict=True) if p is None]
        if absent:
            missing.append((t, absent))
        else:
            jobs.append((t.row, *paths))
    if missing and not skip_missing:
        t, absent = missing[0]
        more = f"; {len(missing)} of the {len(triplets)} rows name a missing utterance" if len(missing) > 1 else ""
        raise UserError(
            f"row {t.row} (line {t.line}) of the triplet file names utterance {absent[0]}, but no "
            f"{absent[0]}{finder.suffix} is under {finder.root} (looked in its subset folders, e.g. dev-clean/ "
            f"and dev-other/){more}: download dev-clean and dev-other "
            f"(python -m reverse_voicefilter.prepare.librispeech -o DIR --subsets dev-clean dev-other), or pass "
            f"--skip_missing to leave such rows out")
    return jobs, len(missing)


# ----------------------------------------------------------------------------- the mixing


def mix_official(clean_wav, interference_wav):
    """``(clean [L], interference [L], mixed [L])``: the interference cut to the clean utterance's length
    ``L`` or zero-padded at its end, and summed with gain 1 (no normalization)."""
    n = clean_wav.shape[0]
    fitted = np.zeros(n, dtype=np.float32)
    m = min(n, interference_wav.shape[0])
    fitted[:m] = interference_wav[:m]
    return clean_wav, fitted, clean_wav + fitted


def make_official_mixture(row, clean, embedding, interference, sample_rate, reverse=False):
    """The :class:`~reverse_voicefilter.data.mixing.Mixture` of one row (paths of its three utterances)."""
    target_wav, interference_wav, mixed_wav = mix_official(load_wav(clean, sample_rate),
                                                           load_wav(interference, sample_rate))
    return Mixture(row, embedding, clean, interference, _speaker(clean), _speaker(interference), bool(reverse),
                   target_wav, interference_wav, mixed_wav)


def _speaker(path):
    return Path(path).name.split("-")[0]


# ----------------------------------------------------------------------------- the workers

_WORKER = {}


def init_worker(hp_str, split_dir, reverse, float16, in_pool=True):
    from reverse_voicefilter.core.hparams import HParam

    if in_pool:
        torch.set_num_threads(1)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    hp = HParam.from_string(hp_str)
    _WORKER.clear()
    _WORKER.update(hp=hp, audio=Audio(hp), split_dir=split_dir, reverse=reverse, float16=float16)


def make_sample(job):
    """Mix and write one row. ``job``: (row, clean, embedding, interference paths); returns (row, record)."""
    w = _WORKER
    mixture = make_official_mixture(*job, w["hp"].audio.sample_rate, w["reverse"])
    return job[0], write_sample(w["split_dir"], w["hp"].form, mixture, w["audio"], w["float16"])


# ----------------------------------------------------------------------------- the split


def _settings(hp, size, reverse, float16, pattern, root, tuples):
    form = hp.form.to_dict()
    form.pop("input")
    return {"format": FORMAT_VERSION, "split": SPLIT, "size": size, "recipe": RECIPE, "tuples": Path(tuples).name,
            "reverse": bool(reverse), "float16": bool(float16), "input": pattern, "data": os.path.abspath(root),
            "audio": {k: hp.audio[k] for k in AUDIO_KEYS}, "form": form}


def _check_done_rows(split_dir, done, by_row, suffix):
    """A sample made from another row than the file's same row now (the file was edited) is refused."""
    for row in done:
        record = read_record(split_dir, sample_id(row))
        expected = by_row[row]
        made = tuple(Path(record[k]).name[:-len(suffix)] for k in ("target", "reference", "interference"))
        if made != (expected.clean, expected.embedding, expected.interference):
            raise UserError(f"{split_dir} sample {sample_id(row)} was made from {', '.join(made)}, but row {row} "
                            f"of the triplet file now names {expected.clean}, {expected.embedding}, "
                            f"{expected.interference}: use another -o or delete the folder")


def suffix_of(pattern):
    """``'*.flac'`` -> ``'.flac'``: the file of utterance ID is ``ID<suffix>``."""
    if not pattern.startswith("*") or any(c in pattern[1:] for c in "*?["):
        raise UserError(f"--input_glob {pattern!r} with --tuples must be '*' and a fixed ending, e.g. '*.flac' "
                        f"or '*-norm.wav'")
    return pattern[1:]


def generate_official(hp, tuples, libri_dir, out_dir, test_size=None, skip_missing=False, reverse=False,
                      float16=False, processes=1, input_glob=None, progress=True):
    """Write the official test set into ``OUT/test`` (see the module docstring); returns the summary.

    ``test_size``: the first N rows (None: all). ``skip_missing``: leave out rows naming an
    utterance that is not under ``libri_dir`` (else the first is an error). ``reverse``: the
    (cut or padded) interference is the target. ``input_glob``: the utterance files, ``'*.flac'``.
    """
    if processes < 1:
        raise UserError(f"-p must be at least 1, got {processes}")
    if test_size is not None and test_size < 1:
        raise UserError(f"--test_size must be at least 1 with --tuples, got {test_size}")
    if not libri_dir:
        raise UserError("give the LibriSpeech root holding dev-clean and dev-other with -d LIBRI_DIR")
    if not Path(libri_dir).is_dir():
        raise UserError(f"data folder not found: {libri_dir}")
    pattern = input_glob or DEFAULT_INPUT
    finder = UtteranceFinder(libri_dir, suffix_of(pattern))
    triplets = read_triplets(tuples, test_size)
    jobs, skipped = resolve_triplets(triplets, finder, skip_missing)
    if not jobs:
        raise UserError(f"none of the {len(triplets)} rows of {tuples} has its three utterances under {libri_dir}")
    size = len(triplets)
    split_dir = Path(out_dir) / SPLIT
    prepare_split_dir(split_dir, _settings(hp, size, reverse, float16, pattern, libri_dir, tuples))
    done = complete_ids(split_dir, hp.form, size)
    _check_done_rows(split_dir, done, {t.row: t for t in triplets}, finder.suffix)
    done_rows = set(done)
    todo = [job for job in jobs if job[0] not in done_rows]
    if done:
        logger.info("%s: %d samples already there, making the other %d", SPLIT, len(done), len(todo))
    init = (hp.hp_str, str(split_dir), bool(reverse), bool(float16))
    start = time.perf_counter()
    records = _run(todo, processes, init, progress)
    seconds = time.perf_counter() - start
    for row in done:
        records[row] = read_record(split_dir, sample_id(row))
    write_manifest(split_dir, [records[row] for row in sorted(records)])
    rate = f", {len(todo) / seconds:.1f} samples/s" if todo and seconds > 0 else ""
    logger.info("%s: %d samples of the official triplets in %s (%d made, %d already there%s); %d row(s) "
                "skipped for a missing utterance", SPLIT, len(records), split_dir, len(todo), len(done), rate,
                skipped)
    return {"split": SPLIT, "dir": str(split_dir), "size": len(records), "rows": size, "made": len(todo),
            "reused": len(done), "skipped": skipped, "seconds": seconds}


def _run(todo, processes, init, progress):
    """Make the samples of ``todo`` (in this process, or a pool); returns {row: record}."""
    records = {}
    with worker_pool(processes, len(todo), init_worker, init, _WORKER) as pool:
        results = map(make_sample, todo) if pool is None else pool.imap_unordered(make_sample, todo, chunksize=4)
        for row, record in counted(results, len(todo), f"{SPLIT} samples", progress):
            records[row] = record
    return records

