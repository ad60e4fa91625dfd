"""Utterances for GE2E training: speakers found in LibriSpeech/VoxCeleb folders, and the
N speakers x M utterances batch of each step.

Speakers are found as generator.py finds them (LibriSpeech subset folders or VoxCeleb's
speaker folders, the last 20 held out; a hold-out list never trained on), but a speaker
with a single recording is kept: with ``ge2e.split_long_utterances`` that recording is cut
into disjoint crops that count as its utterances.

Every random choice of step ``s`` (speakers, utterances, crop offsets) comes from
``numpy.random.default_rng([seed, s])``: the batch depends on the seed and the step only,
so a resumed run, a run with data workers and a run without see the same batches.
"""
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from reverse_voicefilter.core.audio import load_wav
from reverse_voicefilter.core.errors import UserError
from reverse_voicefilter.data.speakers import VOXCELEB_TEST_SPEAKERS, read_speaker_list
from reverse_voicefilter.model.embedder import ResemblyzerEncoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Utterance:
    """A recording, or the part ``[start, stop)`` (samples at 16 kHz) of one."""
    path: str
    start: int = 0
    stop: int | None = None


def _subsets(text):
    return [s.strip() for s in str(text).split(",") if s.strip()]


def speaker_files(folders, pattern):
    """``{speaker: [sorted absolute paths]}`` of the speaker folders directly under ``folders``
    (files matching ``pattern`` recursively; a speaker in several folders gets all its files)."""
    found = {}
    for folder in folders:
        for speaker_dir in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
            files = [os.path.abspath(p) for p in speaker_dir.rglob(pattern) if p.is_file()]
            if files:
                found.setdefault(speaker_dir.name, []).extend(files)
    return {name: sorted(files) for name, files in found.items()}


def _voxceleb_speakers(root, pattern):
    """VoxCeleb's speaker folders: all but the last 20 (sorted) to train, those 20 to validate."""
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    val_names = {p.name for p in folders[len(folders) - min(VOXCELEB_TEST_SPEAKERS, len(folders) // 2):]}
    everyone = speaker_files([root], pattern)
    return ({k: v for k, v in everyone.items() if k not in val_names},
            {k: v for k, v in everyone.items() if k in val_names})


def _librispeech_speakers(root, g):
    def folders(key):
        names = _subsets(g[key])
        missing = [n for n in names if not (root / n).is_dir()]
        if missing:
            raise UserError(f"LibriSpeech subset folder {root / missing[0]} not found (ge2e.{key})")
        return [root / n for n in names]
    val = speaker_files(folders("val_subsets"), g.input_glob)
    train = speaker_files(folders("train_subsets"), g.input_glob)
    return {k: v for k, v in train.items() if k not in val}, val


def find_training_speakers(g):
    """``(train, validation)``: {speaker: [paths]} from the ``ge2e`` config section ``g``: the
    speakers of LibriSpeech (``libri_dir``), of VoxCeleb (``vox_dir``), or of both together."""
    if not g.libri_dir and not g.vox_dir:
        raise UserError("set ge2e.libri_dir (a LibriSpeech root) and/or ge2e.vox_dir (a VoxCeleb folder), "
                        "or pass --libri_dir/--vox_dir")
    train, val = {}, {}
    for key in ("libri_dir", "vox_dir"):
        if not g[key]:
            continue
        root = Path(g[key])
        if not root.is_dir():
            raise UserError(f"data folder not found: {root} (ge2e.{key})")
        more_train, more_val = _voxceleb_speakers(root, g.input_glob) if key == "vox_dir" else \
            _librispeech_speakers(root, g)
        for mine, more in ((train, more_train), (val, more_val)):
            for name, files in more.items():
                mine.setdefault(name, []).extend(files)
    train = {k: v for k, v in train.items() if k not in val}  # a validation speaker is never trained on
    if g.holdout_list:
        held = set(read_speaker_list(g.holdout_list))
        train = {k: v for k, v in train.items() if k not in held}
    if not train:
        roots = " and ".join(str(g[k]) for k in ("libri_dir", "vox_dir") if g[k])
        raise UserError(f"no training speaker with '{g.input_glob}' files under {roots} "
                        f"(check ge2e.input_glob and ge2e.train_subsets)")
    return train, val


def split_into_crops(paths, crop_samples):
    """Disjoint ``crop_samples``-long parts of each recording, as separate utterances."""
    parts = []
    for path in paths:
        try:
            info = sf.info(path)
        except (sf.LibsndfileError, RuntimeError) as err:
            raise UserError(f"cannot read audio file {path}: {err}") from None
        length = int(info.frames * 16000 / info.samplerate)
        parts += [Utterance(path, k * crop_samples, (k + 1) * crop_samples)
                  for k in range(length // crop_samples)]
    return parts


def utterance_lists(speakers, split, crop_samples):
    """{speaker: [Utterance]}: whole recordings, or their disjoint crops when ``split``."""
    if split:
        return {k: split_into_crops(v, crop_samples) for k, v in speakers.items()}
    return {k: [Utterance(p) for p in v] for k, v in speakers.items()}


class BatchSource:
    """``source[step]`` -> waveform crops [N * M, crop_samples] float32 (speaker-major), from the
    speakers with at least M utterances. A map-style dataset indexed by step, so a DataLoader's
    workers can prepare the next batches."""

    def __init__(self, utterances, n_speakers, n_utterances, crop_samples, seed, volume_normalize, cache_audio):
        self.names = sorted(k for k, v in utterances.items() if len(v) >= n_utterances)
        if len(self.names) < n_speakers:
            raise UserError(f"only {len(self.names)} training speakers have ge2e.utterances_per_speaker "
                            f"({n_utterances}) utterances or more, but ge2e.speakers_per_batch is {n_speakers}: "
                            f"lower either (or set ge2e.split_long_utterances for one long recording per speaker)")
        if len(self.names) < len(utterances):
            logger.info("%d of %d training speakers have fewer than %d utterances and are not used",
                        len(utterances) - len(self.names), len(utterances), n_utterances)
        self.utterances = {k: utterances[k] for k in self.names}
        self.n_speakers, self.n_utterances, self.crop_samples = n_speakers, n_utterances, crop_samples
        self.seed, self.volume_normalize = seed, volume_normalize
        self._cache = {} if cache_audio else None

    def __len__(self):
        return 2 ** 62  # indexed by step, without end

    def load(self, utt):
        """An utterance's samples [n] (numpy float32), volume-normalized for the resemblyzer front-end."""
        wav = self._cache.get(utt.path) if self._cache is not None else None
        if wav is None:
            wav = load_wav(utt.path)
            if self.volume_normalize:  # on the whole recording, as inference does
                wav = ResemblyzerEncoder.normalize_volume(torch.from_numpy(wav)).numpy()
            if self._cache is not None:
                self._cache[utt.path] = wav
        return wav[utt.start:utt.stop]

    def __getitem__(self, step):
        rng = np.random.default_rng([self.seed, int(step)])
        speakers = rng.choice(len(self.names), size=self.n_speakers, replace=False)
        crops = np.zeros((self.n_speakers * self.n_utterances, self.crop_samples), dtype=np.float32)
        row = 0
        for s in speakers:
            pool = self.utterances[self.names[s]]
            for u in rng.choice(len(pool), size=self.n_utterances, replace=False):
                wav = self.load(pool[u])
                offset = int(rng.integers(0, max(1, wav.size - self.crop_samples + 1)))
                piece = wav[offset:offset + self.crop_samples]
                crops[row, :piece.size] = piece  # a short utterance is zero-padded, as resemblyzer pads
                row += 1
        return torch.from_numpy(crops)
