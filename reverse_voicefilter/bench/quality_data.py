"""The data of the quality benchmark (bench.quality), made from librispeech-mini.

Training speakers: train-clean-100 of librispeech-mini, 251 speakers with one
long utterance each (median 14 s). A mixture needs a reference and a target
from the same speaker, so each utterance is cut into non-overlapping pieces at
its pauses (:func:`cut_at_pauses`); each piece becomes an "utterance" of a
LibriSpeech-shaped root, ``train-clean-100/SPK/CHAP/SPK-CHAP-NNNN.wav``, that
the trainer's online mixing reads. A speaker whose utterance gives one piece
only serves as interference.

Test speakers: test-other (10 speakers x 10 utterances), never in training (no
speaker id is in both subsets: :func:`write_training_pieces` checks). The
triplets (clean, reference, interference) are drawn with a fixed seed and
written in the format of Google's published list, so the test folder is made by
the official-triplet path (``generator.py --tuples``: whole utterances, gain 1,
no normalization): the figure means what the paper's does.

Everything here depends on the source files and the seed only.
"""
import csv
import io
import re
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf

from reverse_voicefilter.core.atomic import write_bytes, write_text
from reverse_voicefilter.core.errors import UserError
from reverse_voicefilter.data.official import COLUMNS

SAMPLE_RATE = 16000
TRAIN_SUBSET, TEST_SUBSET = "train-clean-100", "test-other"
MIN_PIECE_S = 3.2      # above the default audio_len (3 s): any piece can be a target
MIN_PAUSE_S = 0.08     # a quieter stretch at least this long is a place to cut (a pause between words)
TOP_DB = 25            # this much below the loudest frame counts as quiet
_UTTERANCE = re.compile(r"^(\d+)-(\d+)-(\d+)$")


def cut_at_pauses(wav, sample_rate=SAMPLE_RATE, min_piece_s=MIN_PIECE_S, min_pause_s=MIN_PAUSE_S, top_db=TOP_DB):
    """Non-overlapping pieces ``[(start, end)]`` (samples) covering ``wav``, each cut in the middle of a
    pause and at least ``min_piece_s`` long; a remainder shorter than that joins the piece before it.
    A recording shorter than two pieces is one piece."""
    n = len(wav)
    intervals = librosa.effects.split(wav, top_db=top_db, frame_length=1024, hop_length=256)
    min_pause, min_piece = int(min_pause_s * sample_rate), int(min_piece_s * sample_rate)
    cuts = [(a_end + b_start) // 2 for (_, a_end), (b_start, _) in zip(intervals[:-1], intervals[1:], strict=True)
            if b_start - a_end >= min_pause]
    bounds, start = [0], 0
    for cut in cuts:
        if cut - start >= min_piece and n - cut >= min_piece:
            bounds.append(cut)
            start = cut
    bounds.append(n)
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _utterances(folder, suffix=".flac"):
    """{speaker: sorted utterance files} under a LibriSpeech subset folder."""
    found = {}
    for path in sorted(Path(folder).glob(f"*/*/*{suffix}")):
        found.setdefault(path.parts[-3], []).append(path)
    return found


def _wav_bytes(wav, sample_rate):
    buffer = io.BytesIO()
    sf.write(buffer, wav, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def write_training_pieces(mini_root, out_root, min_piece_s=MIN_PIECE_S):
    """Cut every train-clean-100 utterance of ``mini_root`` into pieces written under
    ``out_root/train-clean-100``; returns a summary (speakers, pieces, durations). Pieces already
    there are kept (the cutting is deterministic, so they are the same)."""
    mini_root, out_root = Path(mini_root), Path(out_root)
    train = _utterances(mini_root / TRAIN_SUBSET)
    test = _utterances(mini_root / TEST_SUBSET)
    if not train or not test:
        raise UserError(f"{mini_root} must hold {TRAIN_SUBSET} and {TEST_SUBSET} (librispeech-mini)")
    shared = sorted(set(train) & set(test))
    if shared:
        raise UserError(f"speaker(s) {', '.join(shared)} are in both {TRAIN_SUBSET} and {TEST_SUBSET}")
    lengths, per_speaker = [], []
    for speaker, files in train.items():
        count = 0
        for path in files:
            wav, rate = sf.read(path, dtype="float32")
            if rate != SAMPLE_RATE:
                raise UserError(f"{path} is {rate} Hz, not {SAMPLE_RATE}")
            _, chapter, number = _UTTERANCE.match(path.name[:-len(path.suffix)]).groups()
            for k, (a, b) in enumerate(cut_at_pauses(wav, rate, min_piece_s)):
                index = int(number) * 100 + k
                dst = out_root / TRAIN_SUBSET / speaker / chapter / f"{speaker}-{chapter}-{index:04d}.wav"
                if not dst.is_file():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    write_bytes(dst, _wav_bytes(wav[a:b], rate))
                lengths.append((b - a) / rate)
                count += 1
        per_speaker.append(count)
    per_speaker = np.array(per_speaker)
    return {"speakers": len(train), "pieces": len(lengths), "speakers_with_2_or_more": int((per_speaker >= 2).sum()),
            "pieces_per_speaker_median": float(np.median(per_speaker)),
            "piece_seconds": {"min": round(min(lengths), 2), "median": round(float(np.median(lengths)), 2),
                              "max": round(max(lengths), 2)},
            "test_speakers": len(test), "test_utterances": sum(len(v) for v in test.values())}


def draw_triplets(mini_root, seed):
    """One triplet per test-other utterance as the clean one: a reference of the same speaker (another
    utterance) and an interference of another speaker, drawn with ``seed``; [(clean, reference,
    interference)] utterance ids, in the order of the clean utterances."""
    test = {spk: [p.name[:-len(p.suffix)] for p in files] for spk, files in _utterances(Path(mini_root) /
                                                                                          TEST_SUBSET).items()}
    speakers = sorted(test)
    if len(speakers) < 2 or any(len(test[s]) < 2 for s in speakers):
        raise UserError(f"{mini_root}/{TEST_SUBSET} needs 2+ speakers with 2+ utterances each")
    rng = np.random.default_rng(seed)
    rows = []
    for s in speakers:
        for clean in test[s]:
            others = [u for u in test[s] if u != clean]
            reference = others[rng.integers(len(others))]
            other_speaker = [x for x in speakers if x != s][rng.integers(len(speakers) - 1)]
            interference = test[other_speaker][rng.integers(len(test[other_speaker]))]
            rows.append((clean, reference, interference))
    return rows


def write_triplets(rows, path):
    """The triplets as a CSV in the format of ``librispeech_dev_tuples.csv`` (header, then ids)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(rows)
    write_text(path, buffer.getvalue())
    return Path(path)


def prepare(mini_root, data_dir, size_config, size, test_seed, jobs=1):
    """The benchmark's data under ``data_dir``: the training pieces (``libri/``), the test triplets
    (``triplets-seedS.csv``) and the test folder of this size's spectrograms (``test-SIZE-seedS/test``,
    made by the official-triplet path); returns the paths and a summary. Made once, then reused."""
    from reverse_voicefilter.core.hparams import HParam
    from reverse_voicefilter.data.official import generate_official

    mini_root, data_dir = Path(mini_root), Path(data_dir)
    if not mini_root.is_dir():
        raise UserError(f"librispeech-mini not found: {mini_root} (pass --data)")
    libri_root = data_dir / "libri"
    summary = write_training_pieces(mini_root, libri_root)
    triplets = write_triplets(draw_triplets(mini_root, test_seed), data_dir / f"triplets-seed{test_seed}.csv")
    out = data_dir / f"test-{size}-seed{test_seed}"
    made = generate_official(HParam(str(size_config)), triplets, mini_root, out, processes=jobs, progress=False)
    return {**summary, "libri_root": libri_root, "triplets": str(triplets), "test_dir": Path(made["dir"]),
            "test_samples": made["size"]}


def describe(data):
    """What the benchmark trains and tests on, in two lines."""
    s = data["piece_seconds"]
    return (f"training: {TRAIN_SUBSET}, {data['speakers']} speakers with one long utterance each, cut at pauses "
            f"into {data['pieces']} pieces of {s['min']}-{s['max']} s (median {s['median']}); "
            f"{data['speakers_with_2_or_more']} speakers have 2+ pieces (a speaker needs two: the others are "
            f"left out)\n"
            f"test: {TEST_SUBSET}, {data['test_speakers']} speakers never seen in training, {data['test_samples']} "
            f"mixtures of whole utterances (gain 1) from {Path(data['triplets']).name}")
