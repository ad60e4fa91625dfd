"""The on-disk sample layout the generator writes and everything else reads.

A split folder (``OUT/train``, ``OUT/test``) holds, per sample ``NNNNNN``:
``-mixed.wav``, ``-target.wav`` (the interference when the data is reversed),
``-mixed.pt``, ``-target.pt`` (normalized magnitude spectrograms [T, F],
float32 or float16, ``torch.save``d) and ``-dvec.txt`` (the path of the
reference utterance whose d-vector conditions the sample). The names follow
the ``form`` section of the config, as in the original.
"""
import json
from dataclasses import dataclass
from pathlib import Path

from utils.errors import UserError

MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class Sample:
    sample_id: str
    dvec_txt: Path
    target_wav: Path
    mixed_wav: Path
    target_mag: Path
    mixed_mag: Path

    def reference_path(self):
        """The reference utterance named in the sample's ``-dvec.txt``."""
        text = self.dvec_txt.read_text().strip()
        if not text:
            raise UserError(f"{self.dvec_txt} names no reference file")
        return Path(text.splitlines()[0].strip())


def _suffix(pattern):
    """'*-target.wav' -> '-target.wav'."""
    return pattern.lstrip("*")


def list_samples(split_dir, hp, need_mags=True):
    """All complete samples of a split folder, sorted by id.

    A sample counts only when all its files exist, so a folder a killed
    generator left behind never yields half a sample. ``need_mags=False``
    accepts samples without ``.pt`` spectrograms (they can be recomputed from
    the wavs).
    """
    split_dir = Path(split_dir)
    if not str(split_dir) or not split_dir.is_dir():
        raise UserError(f"data folder not found: '{split_dir}' (set data.train_dir/test_dir or pass -d)")
    f = hp.form
    samples = []
    for dvec_txt in sorted(split_dir.glob(f.dvec)):
        sample_id = dvec_txt.name[: -len(_suffix(f.dvec))]
        paths = {
            "target_wav": split_dir / (sample_id + _suffix(f.target.wav)),
            "mixed_wav": split_dir / (sample_id + _suffix(f.mixed.wav)),
            "target_mag": split_dir / (sample_id + _suffix(f.target.mag)),
            "mixed_mag": split_dir / (sample_id + _suffix(f.mixed.mag)),
        }
        required = ["target_wav", "mixed_wav"] + (["target_mag", "mixed_mag"] if need_mags else [])
        if all(paths[k].is_file() for k in required):
            samples.append(Sample(sample_id=sample_id, dvec_txt=dvec_txt, **paths))
    return samples


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
