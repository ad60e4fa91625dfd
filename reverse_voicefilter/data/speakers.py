"""Which speakers and utterances each split draws from.

LibriSpeech (``-d``): train = the speaker folders of the training subsets,
test = those of the test subsets. VoxCeleb (``-v``): all speaker folders,
sorted, the last 20 for test (as the original). A speaker's utterances are
the files under its folder matching the input pattern (``*-norm.wav`` by
default), recursively; a speaker needs two (a reference and a target).

:class:`Speakers` holds one split's utterances as the flat arrays the plan
(:mod:`reverse_voicefilter.data.mixing`) indexes.
"""
import hashlib
import logging
import os
import re
from pathlib import Path

import numpy as np

from reverse_voicefilter.core.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_TRAIN_SUBSETS = ("train-clean-100", "train-clean-360")
DEFAULT_TEST_SUBSETS = ("dev-clean",)
VOXCELEB_TEST_SPEAKERS = 20          # the original took the last 20 VoxCeleb folders as the test set
OTHER_FORMATS = ("*.flac", "*.wav")  # what a folder without the pattern's files may hold instead


class Speakers:
    """The utterances of one split, as flat arrays the plan can index.

    ``names[s]`` is speaker ``s``'s id (folder name), its utterances are
    ``paths[offsets[s] : offsets[s] + counts[s]]`` (sorted absolute paths), and
    ``speaker_of[u]`` is the speaker of utterance ``u``.
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

    def speaker_name(self, utterance):
        """The speaker id of utterance index ``utterance``."""
        return self.names[self.speaker_of[utterance]]

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


def _speaker_dirs(folders):
    return [p for folder in folders for p in sorted(Path(folder).iterdir()) if p.is_dir()]


def _utterances(speaker_dirs, pattern):
    """``{speaker: [paths]}`` of every speaker folder, however few files it holds."""
    found = {}
    for speaker_dir in speaker_dirs:
        files = [os.path.abspath(p) for p in Path(speaker_dir).rglob(pattern) if p.is_file()]
        found.setdefault(Path(speaker_dir).name, []).extend(files)
    return found


def find_speakers(folders, pattern, speaker_dirs=None):
    """``{speaker: [utterance paths]}`` of every speaker folder in ``folders`` (or of ``speaker_dirs``).

    Utterances are the files under the speaker folder matching ``pattern``
    (recursively), as absolute paths; a speaker found in several folders gets
    all its utterances; speakers with fewer than two are dropped (logged).
    """
    found = _utterances(_speaker_dirs(folders) if speaker_dirs is None else speaker_dirs, pattern)
    speakers = {name: sorted(files) for name, files in found.items() if len(files) >= 2}
    if len(speakers) < len(found):
        logger.info("%d of %d speaker folders have fewer than two '%s' files and are skipped",
                    len(found) - len(speakers), len(found), pattern)
    return speakers


def why_no_speakers(folders, pattern, advice=None):
    """What the ``folders`` hold instead of speakers with two ``pattern`` files, in words; ``advice``
    ("train" or "test"): add what to do about speakers with one file."""
    found = _utterances(_speaker_dirs(folders), pattern)
    if not found:
        return "no speaker folders there"
    one = sum(len(files) == 1 for files in found.values())
    none = sum(not files for files in found.values())
    parts = []
    if one:
        parts.append(f"{one} speaker folder{'s hold' if one > 1 else ' holds'} one '{pattern}' file each, and a "
                     f"speaker needs two (a reference and a target)" + {
                         "train": ": use --train_subsets with more utterances per speaker, or --only_dev True "
                                  "to train on the test speakers too",
                         "test": ": use --test_subsets with more utterances per speaker"}.get(advice, ""))
    if none:
        other = next((o for o in OTHER_FORMATS if o != pattern and any(
            next(Path(f).rglob(o), None) for f in folders)), None)
        what = f"no '{pattern}' files at all" if none == len(found) else f"{none} hold no '{pattern}' file"
        if other:
            what += (f" (the folders hold {other} files: run utils/normalize-resample.sh (or python -m "
                     f"reverse_voicefilter.prepare.normalize) or pass --input_glob '{other}')")
        parts.append(what)
    return "; ".join(parts)


def _subset_folders(root, names, role, optional=False):
    """The folders of LibriSpeech subsets ``names`` under ``root``; a missing one is an error.

    As the original, the default training subsets may be partly absent (many
    people download train-clean-100 only), and with ``optional`` (--only_dev:
    the test speakers train too) any training subset may be: a warning.
    """
    missing = [n for n in names if not (root / n).is_dir()]
    present = [root / n for n in names if n not in missing]
    partial = role == "train" and tuple(names) == DEFAULT_TRAIN_SUBSETS and present
    if missing and optional:
        logger.warning("LibriSpeech subset %s not found under %s: --only_dev trains on %s", ", ".join(missing),
                       root, ", ".join([p.name for p in present] + ["the test speakers"]))
        return present
    if missing and partial:
        logger.warning("LibriSpeech subset %s not found under %s: training on %s only", ", ".join(missing), root,
                       ", ".join(p.name for p in present))
        return present
    if missing:
        raise UserError(f"LibriSpeech subset folder {root / missing[0]} not found "
                        f"(choose the {role} subsets with --{role}_subsets)")
    return present


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


def _voxceleb(root, pattern, need_train):
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    n_test = min(VOXCELEB_TEST_SPEAKERS, len(folders))
    train_folders, test_folders = folders[:len(folders) - n_test], folders[len(folders) - n_test:]
    train = find_speakers([], pattern, train_folders) if need_train else {}
    return train, find_speakers([], pattern, test_folders), [str(root)], [str(root)]


def _librispeech(root, pattern, train_subsets, test_subsets, only_dev, exclude_test_speakers, need_train,
                 need_test):
    if need_test or only_dev:
        test_dirs = _subset_folders(root, list(test_subsets), "test")
    elif exclude_test_speakers:  # no test set asked for, but its speakers still stay out of training
        test_dirs = [root / n for n in test_subsets if (root / n).is_dir()]
    else:
        test_dirs = []
    train_dirs = _subset_folders(root, list(train_subsets), "train", optional=only_dev) if need_train else []
    train, test = find_speakers(train_dirs, pattern), find_speakers(test_dirs, pattern)
    if need_train and not train and not only_dev:  # with --only_dev the test speakers fill the training set
        raise UserError(f"no training speaker with two or more '{pattern}' files in "
                        f"{', '.join(map(str, train_dirs))}: {why_no_speakers(train_dirs, pattern, 'train')}")
    if need_train and not train and only_dev and train_dirs:
        logger.warning("no training speaker with two or more '%s' files in %s (%s): --only_dev trains on the "
                       "test speakers only", pattern, ", ".join(map(str, train_dirs)),
                       why_no_speakers(train_dirs, pattern))
    if need_test and not test:
        raise UserError(f"no test speaker with two or more '{pattern}' files in "
                        f"{', '.join(map(str, test_dirs))}: {why_no_speakers(test_dirs, pattern, 'test')}")
    return train, test, [str(d) for d in train_dirs], [str(d) for d in test_dirs]


def _leave_test_speakers_out(train, test, need_train):
    shared = sorted(set(train) & set(test))
    train = {k: v for k, v in train.items() if k not in test}
    if shared and need_train:
        if len(train) < 2:
            raise UserError(f"the training subsets hold {len(shared)} test speakers and {len(train)} other "
                            f"speakers: choose other --train_subsets/--test_subsets, or pass "
                            f"--exclude_test_speakers False to train on the test speakers")
        logger.warning("%d test speakers are also in the training subsets: left out of training "
                       "(--exclude_test_speakers False keeps them)", len(shared))
    return train


def _leave_holdout_out(train, test, holdout):
    holdout = set(holdout)
    unknown = holdout - set(train) - set(test)
    if unknown:
        logger.warning("%d of the %d hold-out speaker ids are not in the data (e.g. %s)",
                       len(unknown), len(holdout), sorted(unknown)[0])
    return {k: v for k, v in train.items() if k not in holdout}


def split_speakers(libri_dir=None, vox_dir=None, pattern="*-norm.wav", train_subsets=DEFAULT_TRAIN_SUBSETS,
                   test_subsets=DEFAULT_TEST_SUBSETS, only_dev=False, exclude_test_speakers=True, holdout=(),
                   need_train=True, need_test=True):
    """``(train, test, source)``: {speaker: [paths]} of each split and a description of the data.

    ``only_dev`` adds the test speakers to train (as the original; train and
    test then share speakers), and the training subsets may then be missing or
    unusable; otherwise, with ``exclude_test_speakers``, a test speaker is
    never a train speaker (a no-op for the default subsets, which are
    disjoint). ``holdout`` speaker ids are never used for training.
    """
    if libri_dir and vox_dir:
        raise UserError("give either -d LIBRI_DIR or -v VOXCELEB_DIR, not both")
    if not libri_dir and not vox_dir:
        raise UserError("give the data folder with -d LIBRI_DIR (or -v VOXCELEB_DIR)")
    root = Path(vox_dir or libri_dir)
    if not root.is_dir():
        raise UserError(f"data folder not found: {root}")
    if vox_dir:
        train, test, train_desc, test_desc = _voxceleb(root, pattern, need_train or only_dev)
    else:
        train, test, train_desc, test_desc = _librispeech(root, pattern, train_subsets, test_subsets, only_dev,
                                                          exclude_test_speakers, need_train, need_test)
    if only_dev:
        logger.warning("--only_dev True: the test speakers are added to training, so train and test share "
                       "speakers and test scores will look better than on unseen speakers")
        for name, files in test.items():
            train[name] = sorted(set(train.get(name, [])) | set(files))
    elif exclude_test_speakers:
        train = _leave_test_speakers_out(train, test, need_train)
    elif set(train) & set(test):
        logger.warning("train and test share %d speakers (--exclude_test_speakers False)",
                       len(set(train) & set(test)))
    if holdout:
        train = _leave_holdout_out(train, test, holdout)
    source = {"root": os.path.abspath(root), "kind": "voxceleb" if vox_dir else "librispeech",
              "train": train_desc, "test": test_desc}
    return train, test, source
