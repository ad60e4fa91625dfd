"""The on-disk sample layout the generator writes and everything else reads.

A split folder (``OUT/train``, ``OUT/test``) holds, per sample ``NNNNNN``:
``-mixed.wav``, ``-target.wav`` (the interference when the data is reversed),
``-mixed.pt``, ``-target.pt`` (normalized magnitude spectrograms [T, F],
float32 or float16, ``torch.save``d) and ``-dvec.txt`` (the path of the
reference utterance whose d-vector conditions the sample). The names follow
the ``form`` section of the config, as in the original. The generator also
keeps one JSON record per sample in ``.records/NNNNNN.json`` and rebuilds
``manifest.jsonl`` (the records in id order) from them.

Every file is written atomically (:mod:`reverse_voicefilter.core.atomic`) and the ``-dvec.txt``
last, so a sample is complete once its ``-dvec.txt`` exists.
"""
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from reverse_voicefilter.core import atomic
from reverse_voicefilter.core.audio import save_wav
from reverse_voicefilter.core.errors import UserError

MANIFEST = "manifest.jsonl"
RECORDS_DIR = ".records"
# a file of sample NNNNNN (or the temporary of one: a leading dot)
_SAMPLE_NAME = re.compile(r"^\.?(\d{6,})[-.]")


def sample_id(index):
    """``7`` -> ``'000007'``."""
    return f"{index:06d}"


@dataclass(frozen=True)
class Sample:
    sample_id: str
    dvec_txt: Path
    target_wav: Path
    mixed_wav: Path
    target_mag: Path
    mixed_mag: Path
    record: Path | None = None

    def reference_path(self):
        """The reference utterance named in the sample's ``-dvec.txt``."""
        text = self.dvec_txt.read_text().strip()
        if not text:
            raise UserError(f"{self.dvec_txt} names no reference file")
        return Path(text.splitlines()[0].strip())

    def written_files(self):
        """Every file the generator writes for the sample, in writing order (the ``-dvec.txt`` last)."""
        return [self.target_wav, self.mixed_wav, self.target_mag, self.mixed_mag, self.record, self.dvec_txt]


def _suffix(pattern):
    """'*-target.wav' -> '-target.wav'."""
    return pattern.lstrip("*")


def sample_files(split_dir, form, sample_id):
    """The paths of sample ``sample_id``'s files in ``split_dir`` (``form``: the config's form section)."""
    split_dir = Path(split_dir)
    return Sample(
        sample_id=sample_id,
        dvec_txt=split_dir / (sample_id + _suffix(form.dvec)),
        target_wav=split_dir / (sample_id + _suffix(form.target.wav)),
        mixed_wav=split_dir / (sample_id + _suffix(form.mixed.wav)),
        target_mag=split_dir / (sample_id + _suffix(form.target.mag)),
        mixed_mag=split_dir / (sample_id + _suffix(form.mixed.mag)),
        record=split_dir / RECORDS_DIR / f"{sample_id}.json",
    )


def listed_samples(split_dir, hp):
    """Every sample of a split folder that has its ``-dvec.txt``, sorted by id, whether or not its
    other files are all there (:func:`list_samples` keeps only the complete ones): the generator
    writes the ``-dvec.txt`` last, so a sample with it but without a wav was damaged after it was
    written, and evaluation names such a sample as failed instead of leaving it out unseen."""
    split_dir = Path(split_dir)
    if not str(split_dir) or not split_dir.is_dir():
        raise UserError(f"data folder not found: '{split_dir}' (set data.train_dir/test_dir or pass -d)")
    return [sample_files(split_dir, hp.form, dvec_txt.name[: -len(_suffix(hp.form.dvec))])
            for dvec_txt in sorted(split_dir.glob(hp.form.dvec))]


def list_samples(split_dir, hp, need_mags=True):
    """All complete samples of a split folder, sorted by id.

    A sample counts only when all its files exist, so a folder a killed
    generator left behind never yields half a sample. ``need_mags=False``
    accepts samples without ``.pt`` spectrograms (they can be recomputed from
    the wavs). The generator's records are not needed (the original wrote none).
    """
    samples = []
    for sample in listed_samples(split_dir, hp):
        required = [sample.target_wav, sample.mixed_wav] + ([sample.target_mag, sample.mixed_mag] if need_mags
                                                            else [])
        if all(p.is_file() for p in required):
            samples.append(sample)
    return samples


def complete_ids(split_dir, form, size):
    """Indices below ``size`` whose files (the record included) are all in ``split_dir``."""
    split_dir = Path(split_dir)
    names = set(os.listdir(split_dir))
    records = set(os.listdir(split_dir / RECORDS_DIR)) if (split_dir / RECORDS_DIR).is_dir() else set()
    done = []
    for i in range(size):
        sample = sample_files(split_dir, form, sample_id(i))
        if sample.record.name in records and all(
                p.name in names for p in sample.written_files() if p != sample.record):
            done.append(i)
    return done


def existing_ids(split_dir):
    """Sample indices that have any file (or record, or temporary) in ``split_dir``."""
    ids = set()
    for folder in (Path(split_dir), Path(split_dir) / RECORDS_DIR):
        if folder.is_dir():
            for name in os.listdir(folder):
                m = _SAMPLE_NAME.match(name)
                if m:
                    ids.add(int(m.group(1)))
    return ids


def write_sample(split_dir, form, mixture, audio, float16=False):
    """Write ``mixture`` (a :class:`mixing.Mixture`) as sample ``mixture.index``; returns its record.

    The spectrograms are :func:`reverse_voicefilter.data.mixing.magnitude` of the written wavs
    (``audio``: the :class:`reverse_voicefilter.core.audio.Audio` of the config); the ``-dvec.txt``
    comes last: the sample is complete once it exists.
    """
    sample = sample_files(split_dir, form, sample_id(mixture.index))
    record = mixture.record(sample.sample_id)
    target_mag, mixed_mag = mixture.spectrograms(audio, float16)
    sr = audio.hp.audio.sample_rate
    save_wav(sample.target_wav, mixture.output_wav, sr)
    save_wav(sample.mixed_wav, mixture.mixed_wav, sr)
    atomic.save_torch(target_mag, sample.target_mag)
    atomic.save_torch(mixed_mag, sample.mixed_mag)
    atomic.write_text(sample.record, json.dumps(record))
    atomic.write_text(sample.dvec_txt, mixture.reference)
    return record


def read_record(split_dir, sample_id):
    """The generator's record of one sample."""
    return json.loads((Path(split_dir) / RECORDS_DIR / f"{sample_id}.json").read_text())


def write_manifest(split_dir, records):
    """``manifest.jsonl``: one record per line, in the order given (id order)."""
    atomic.write_text(Path(split_dir) / MANIFEST, "".join(json.dumps(r) + "\n" for r in records))


def read_manifest(split_dir):
    """``{sample_id: record}`` from the split's manifest.jsonl ({} where there is none)."""
    path = Path(split_dir) / MANIFEST
    if not path.is_file():
        return {}
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            records[rec["id"]] = rec
    return records


def _legacy_temporary(name, other_files):
    """``NAME.tmp``, what earlier versions wrote before renaming, for a file of this layout
    (a sample's file, a record, the manifest, a d-vector cache or one of ``other_files``), or the
    suite's old write probe."""
    if name == ".write-test.tmp":
        return True
    if not name.endswith(".tmp"):
        return False
    stem = name[:-len(".tmp")]
    return bool(_SAMPLE_NAME.match(name)) or stem in (MANIFEST, *other_files) or (
        stem.startswith("dvec-cache-") and stem.endswith(".pt"))


def remove_stale_temporaries(split_dir, other_files=()):
    """Delete what a killed writer left in ``split_dir`` and its records folder: the temporaries of
    :mod:`reverse_voicefilter.core.atomic`, and the ``NAME.tmp`` files of earlier versions of this layout. Nothing
    else is touched. Returns the removed paths."""
    removed = []
    for folder in (Path(split_dir), Path(split_dir) / RECORDS_DIR):
        removed += atomic.remove_stale_temporaries(folder)
        if folder.is_dir():
            for entry in folder.iterdir():
                if _legacy_temporary(entry.name, other_files) and entry.is_file():
                    entry.unlink(missing_ok=True)
                    removed.append(entry)
    return removed
