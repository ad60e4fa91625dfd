"""What one sample is: its candidate triplets, and the original's mixing recipe, in memory.

The recipe: two different speakers; two different utterances of speaker 1
(the d-vector reference and the target) and one of speaker 2 (the
interference); each loaded at 16 kHz mono with its leading and trailing
silence trimmed (top_db 20); dropped when the reference is shorter than
1.1 x embedder.window x hop_length samples or, after the optional VAD merge,
the target or the interference is shorter than ``audio_len``; the first
``audio_len`` seconds of both are summed and all three are divided by
1.1 x max|mixed|.

The plan: for every sample index ``i``, :func:`plan_candidates` draws
``MAX_ATTEMPTS`` candidate triplets (reference, target, interference) from
block ``i`` of the random stream ``numpy.random.default_rng([seed,
split_code])``; a candidate equal to one drawn earlier (lower index, or lower
attempt of the same index) is struck out. Index ``i``'s candidates depend only
on the seed, the split, the data and ``i`` (never on the size asked for, the
process count or ``reverse``). Sample ``i`` is the first of its candidates
whose audio is long enough (the later ones are the retries of a dropped one).

Beyond the original, for on-the-fly mixing, which must never stop a running training for want of
a mixture: a sample whose planned candidates were all dropped (too short, or struck as repeats:
late samples of a large epoch drawn from a small pool lose most of theirs) takes further ones
from :func:`fallback_candidates`, an endless draw from its own seed among the utterances whose
headers say they can serve (:class:`Pools`), so the stream stays a function of the seed and the
data; data that cannot make one mixture is refused before any compute (:meth:`Pools.check`).

Nothing here writes a file: :func:`make_mixture` gives sample ``i`` of a split
from ``(speakers, seed, split, index)``, the same arrays generator.py writes
(:func:`reverse_voicefilter.data.samples.write_sample`) for sample ``i``.
"""
import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass

import librosa
import numpy as np
import torch

from reverse_voicefilter.core.audio import AudioError, load_wav
from reverse_voicefilter.data.augment import window

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 32                    # candidates per sample: a dropped one is retried with the next
TOP_DB = 20                          # librosa trim/split threshold of the original
REFERENCE_MIN_FACTOR = 1.1           # reference >= 1.1 * embedder.window * hop_length samples
NORM_HEADROOM = 1.1                  # all audio divided by 1.1 * max|mixed|
SPLIT_CODES = {"train": 1, "test": 2}
CACHE_ENTRIES = 256                  # per-process cache of trimmed audio heads (about 50 MB at 3 s)
DROP_REASONS = ("unreadable file", "reference too short", "target too short", "interference too short")
FALLBACK_TAG = 0xFA11                # seeds a sample's further candidates apart from its planned ones
FALLBACK_LIMIT = 20000               # further candidates tried before the data is declared unusable


# ----------------------------------------------------------------------------- the plan


def _pick(u, n):
    """Uniform integers in [0, n) from uniform floats ``u`` in [0, 1) (elementwise ``n``)."""
    return np.minimum((u * n).astype(np.int64), n - 1)


def plan_candidates(speakers, size, seed, split_code, stream=()):
    """Candidate triplets of each sample: int array [size, MAX_ATTEMPTS, 3] of utterance indices.

    Row ``[i, a]`` is attempt ``a`` of sample ``i``: (reference, target,
    interference) indices into ``speakers.paths``, drawn as the original drew
    (two different speakers uniformly, then two different utterances of the
    first and one of the second). Sample ``i`` owns block ``i`` (5 x
    MAX_ATTEMPTS uniform numbers) of the split's random stream
    ``default_rng([seed, split_code])``, so its candidates depend on the seed,
    the split, the data and ``i`` only. A triplet already drawn at an earlier
    (index, attempt) is struck out (set to -1): no two samples can be alike.
    ``stream``: more integers for the seed (the online loader's epoch); the
    generator's plan is that of ``stream=()``.
    """
    cand = np.full((size, MAX_ATTEMPTS, 3), -1, dtype=np.int64)
    if size == 0:
        return cand
    rng = np.random.default_rng([seed, split_code, *stream])
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


class Pools:
    """Which utterances can serve as a reference, and which as a target or an interference, by their
    headers' lengths (an upper bound of what trimming leaves): the pools further candidates are drawn
    from, and the check that the data can make a mixture at all."""

    def __init__(self, speakers, seconds, audio_len, reference_min_seconds):
        self.speakers = speakers
        self.can_reference = np.asarray(seconds) >= reference_min_seconds
        self.can_target = np.asarray(seconds) >= audio_len
        self.audio_len, self.reference_min = audio_len, reference_min_seconds
        per = [(np.flatnonzero(self.can_reference[o:o + c]) + o, np.flatnonzero(self.can_target[o:o + c]) + o)
               for o, c in zip(speakers.offsets.tolist(), speakers.counts.tolist(), strict=True)]
        self.references = [r for r, _ in per]
        self.targets = [t for _, t in per]
        # a first speaker needs a reference and another utterance that can be the target
        self.first = np.array([s for s, (r, t) in enumerate(per) if len(r) and len(t) and len(np.union1d(r, t)) >= 2],
                              dtype=np.int64)
        self.second = np.array([s for s, (_, t) in enumerate(per) if len(t)], dtype=np.int64)

    def check(self):
        """Raise a UserError when no (reference, target, interference) triplet can be long enough."""
        # a first speaker and a different second one: among two first speakers one differs from any second
        if any(np.any(self.second != s1) for s1 in self.first[:2]):
            return
        from reverse_voicefilter.core.errors import UserError

        raise UserError(f"online mixing: the data cannot make a single mixture: it needs a speaker with a reference "
                        f"of at least {self.reference_min:.2f} s and another utterance of at least data.audio_len "
                        f"{self.audio_len:g} s, and another speaker with an utterance of at least {self.audio_len:g} s "
                        f"({int(self.can_target.sum())} of {len(self.can_target)} utterances are that long by their "
                        f"headers); use more data or a shorter audio_len")


def fallback_candidates(pools, seed, split_code, stream, index):
    """Sample ``index``'s further candidates, endless: drawn as the plan draws (two different speakers,
    two different utterances of the first and one of the second) from ``default_rng([seed, split_code,
    *stream, index, FALLBACK_TAG])``, among the utterances :class:`Pools` says can serve."""
    rng = np.random.default_rng([seed, split_code, *stream, index, FALLBACK_TAG])
    while True:
        s1 = int(pools.first[rng.integers(len(pools.first))])
        others = pools.second[pools.second != s1]
        if not len(others):
            continue
        s2 = int(others[rng.integers(len(others))])
        ref = int(pools.references[s1][rng.integers(len(pools.references[s1]))])
        targets = pools.targets[s1][pools.targets[s1] != ref]
        if not len(targets):
            continue
        tgt = int(targets[rng.integers(len(targets))])
        itf = int(pools.targets[s2][rng.integers(len(pools.targets[s2]))])
        yield [ref, tgt, itf]


def candidates_of(plan, index):
    """Sample ``index``'s candidates that are not repeats: ``[[reference, target, interference], ...]``."""
    rows = plan[index]
    return rows[rows[:, 0] >= 0].tolist()


def struck_count(plan, index):
    """How many of sample ``index``'s candidates were repeats of earlier ones."""
    return int(np.sum(plan[index, :, 0] < 0))


# ----------------------------------------------------------------------------- the audio


def vad_merge(wav):
    """The non-silent intervals (top_db 20) of ``wav`` [N], concatenated."""
    intervals = librosa.effects.split(wav, top_db=TOP_DB)
    return np.concatenate([wav[s:e] for s, e in intervals]) if len(intervals) else wav[:0]


class TrimmedAudio:
    """LRU cache of what a sample needs of an utterance, per process.

    For each file: the trimmed length (the reference test), the length after
    the optional VAD merge and its first ``length`` samples (the target and
    interference), or None when it cannot be read. A file picked again is not
    decoded and trimmed again.
    """

    def __init__(self, sample_rate, length, vad, capacity=CACHE_ENTRIES, whole=False):
        self.sample_rate, self.length, self.vad, self.capacity = sample_rate, length, vad, capacity
        self.whole = whole  # keep all of the usable audio (random crops), not only its head
        self._entries = OrderedDict()

    def get(self, path):
        """``(trimmed_len, usable_len, head [<= length] float32, or all of it with ``whole``)``, or None for an
        unreadable file."""
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
            entry = (trimmed.shape[0], usable.shape[0], np.array(usable if self.whole else usable[:self.length]))
        self._entries[path] = entry
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return entry


def mix_candidate(cache, reference, target, interference, reference_min, augment=None, reverse=False):
    """The original's sample recipe; ``(target_wav, interference_wav, mixed_wav)`` [L] or a drop reason.
    ``augment``: ``(target offset, interference offset, gain)`` of
    :meth:`reverse_voicefilter.data.augment.Augmentation.draw` (None: the original's); the gain scales
    the voice the model is to remove (the interference; the target where ``reverse``)."""
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
    if augment is None:
        target_wav, interference_wav = tgt[2][:cache.length], itf[2][:cache.length]
    else:
        target_offset, interference_offset, gain = augment
        target_wav = window(tgt[2], cache.length, target_offset)
        interference_wav = window(itf[2], cache.length, interference_offset)
        if reverse:
            target_wav = target_wav * np.float32(gain)
        else:
            interference_wav = interference_wav * np.float32(gain)
    mixed_wav = target_wav + interference_wav
    norm = np.max(np.abs(mixed_wav)) * NORM_HEADROOM
    return target_wav / norm, interference_wav / norm, mixed_wav / norm


def magnitude(audio, wav):
    """Normalized log magnitude [T, F] float32 of ``wav`` [N]: ``Audio.wav2spec(wav)[0]``, C-ordered
    (the byte layout ``torch.save`` writes depends on it)."""
    return np.ascontiguousarray(audio.wav2spec(wav)[0])


# ----------------------------------------------------------------------------- one sample


@dataclass(frozen=True, eq=False)
class Mixture:
    """One sample in memory: its utterances and its audio, all [L] float32 after the common scaling."""

    index: int
    reference: str
    target: str
    interference: str
    target_speaker: str
    interference_speaker: str
    reversed: bool
    target_wav: np.ndarray
    interference_wav: np.ndarray
    mixed_wav: np.ndarray

    @property
    def output_wav(self):
        """What the model is to extract (the sample's ``-target.wav``): the interference when reversed."""
        return self.interference_wav if self.reversed else self.target_wav

    def record(self, sample_id):
        """The sample's manifest record."""
        return {"id": sample_id, "reference": self.reference, "target": self.target,
                "interference": self.interference, "target_speaker": self.target_speaker,
                "interference_speaker": self.interference_speaker, "reversed": self.reversed}

    def spectrograms(self, audio, float16=False):
        """``(output_mag, mixed_mag)``: tensors [T, F] of :func:`magnitude`, float32 or float16."""
        mags = (torch.from_numpy(magnitude(audio, w)) for w in (self.output_wav, self.mixed_wav))
        return tuple(m.half() if float16 else m for m in mags)


class Mixer:
    """Turns a sample's candidates into its :class:`Mixture`; one per process (it holds the audio cache)."""

    def __init__(self, hp, vad=False, capacity=CACHE_ENTRIES, whole=False):
        sr = hp.audio.sample_rate
        self.cache = TrimmedAudio(sr, int(sr * hp.data.audio_len), vad, capacity, whole)
        self.reference_min = REFERENCE_MIN_FACTOR * hp.embedder.window * hp.audio.hop_length

    def mix(self, speakers, index, candidates, reverse=False, limit=None, augment=None):
        """``(Mixture or None, Counter of drop reasons)``: the first candidate long enough, None when all
        were dropped (or ``limit`` of them). ``candidates``: utterance index triplets into ``speakers``, as
        :func:`candidates_of`, or an endless :func:`fallback_candidates`."""
        drops = Counter()
        for n, (ref, tgt, itf) in enumerate(candidates):
            if limit is not None and n >= limit:
                break
            reference, target, interference = (speakers.paths[u] for u in (ref, tgt, itf))
            result = mix_candidate(self.cache, reference, target, interference, self.reference_min, augment, reverse)
            if isinstance(result, str):
                drops[result] += 1
                continue
            return Mixture(index, reference, target, interference, speakers.speaker_name(ref),
                           speakers.speaker_name(itf), bool(reverse), *result), drops
        return None, drops


def make_mixture(hp, speakers, seed, split, index, vad=False, reverse=False, mixer=None, plan=None):
    """Sample ``index`` of ``split`` ("train" or "test") in memory: ``(Mixture or None, drops)``.

    The same audio generator.py writes for that sample with the same config,
    data, seed and ``vad``. ``plan``: :func:`plan_candidates` of at least
    ``index + 1`` samples, to reuse across calls; ``mixer``: a :class:`Mixer`
    to reuse its cache.
    """
    if plan is None:
        plan = plan_candidates(speakers, index + 1, seed, SPLIT_CODES[split])
    mixer = mixer or Mixer(hp, vad)
    return mixer.mix(speakers, index, candidates_of(plan, index), reverse)
