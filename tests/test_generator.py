import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import LIBRI_MINI, ROOT, need

from datasets.generation import generate
from datasets.samples import list_samples, read_manifest
from utils.cli import str2bool
from utils.demo_corpus import make_corpus
from utils.errors import UserError
from utils.hparams import HParam

TINY = ROOT / "config" / "tiny.yaml"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root, subsets={"train-clean-100": (6, 4), "dev-clean": (4, 4)}, seed=3, duration=(2.5, 4.0),
                jobs=1, progress=False)
    return root


@pytest.fixture(scope="module")
def hp():
    return HParam(TINY)


def digest(folder):
    h = hashlib.sha1()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "generation.json"):
        h.update(path.relative_to(folder).as_posix().encode())
        data = path.read_bytes()
        if path.suffix in (".txt", ".jsonl", ".json"):
            data = data.replace(str(folder).encode(), b"")
        h.update(data)
    return h.hexdigest()


def gen(tmp_path, corpus, hp, name="out", **kwargs):
    args = {"train_size": 12, "test_size": 5, "processes": 1, "seed": 0, "train_subsets": ["train-clean-100"]}
    args.update(kwargs)
    generate(hp, corpus, tmp_path / name, **args)
    return tmp_path / name


def triplets(split_dir):
    return [(r["reference"], r["target"], r["interference"]) for r in read_manifest(split_dir).values()]


def test_exact_count_contiguous_ids_no_duplicates(tmp_path, corpus, hp):
    out = gen(tmp_path, corpus, hp)
    for split, size in (("train", 12), ("test", 5)):
        samples = list_samples(out / split, hp)
        assert [s.sample_id for s in samples] == [f"{i:06d}" for i in range(size)]
        trips = triplets(out / split)
        assert len(trips) == size == len(set(trips))
        for s in samples:
            mixed, rate = sf.read(s.mixed_wav)
            assert rate == 16000 and len(mixed) == 32000
            assert torch.load(s.mixed_mag, weights_only=True).shape == (201, 257)
    record = read_manifest(out / "test")["000000"]
    assert record["target_speaker"] != record["interference_speaker"]
    assert record["reference"] != record["target"] and record["reversed"] is False
    assert (out / "test" / "000000-dvec.txt").read_text() == record["reference"]
    test_speakers = {r["target_speaker"] for r in read_manifest(out / "test").values()}
    train_speakers = {r["target_speaker"] for r in read_manifest(out / "train").values()}
    assert not test_speakers & train_speakers


def test_same_output_whatever_the_process_count(tmp_path, corpus, hp):
    one = gen(tmp_path, corpus, hp, "p1", processes=1)
    two = gen(tmp_path, corpus, hp, "p2", processes=2)
    assert digest(one) == digest(two)
    other = gen(tmp_path, corpus, hp, "seed1", seed=1)
    assert digest(one) != digest(other)


def test_reverse_data_swaps_the_target_of_the_same_mixtures(tmp_path, corpus, hp):
    normal = gen(tmp_path, corpus, hp, "n", train_size=0)
    reverse = gen(tmp_path, corpus, hp, "r", train_size=0, reverse=True)
    for i in range(5):
        a, b = (sf.read(d / "test" / f"{i:06d}-target.wav")[0] for d in (normal, reverse))
        m1, m2 = (sf.read(d / "test" / f"{i:06d}-mixed.wav")[0] for d in (normal, reverse))
        np.testing.assert_array_equal(m1, m2)
        np.testing.assert_allclose(a + b, m1, atol=1e-6)
    assert all(r["reversed"] for r in read_manifest(reverse / "test").values())


def test_resume_completes_only_what_is_missing(tmp_path, corpus, hp):
    out = gen(tmp_path, corpus, hp, train_size=6, test_size=0)
    train = out / "train"
    reference_digest = digest(out)
    kept = train / "000001-mixed.wav"
    mtime = kept.stat().st_mtime_ns
    (train / "000003-dvec.txt").unlink()  # killed before the sample was complete
    (train / "000004-mixed.pt").unlink()
    (train / "000005-mixed.wav.tmp").write_bytes(b"half")
    gen(tmp_path, corpus, hp, train_size=6, test_size=0)
    assert kept.stat().st_mtime_ns == mtime
    assert not list(train.glob("*.tmp"))
    assert digest(out) == reference_digest


def test_other_settings_into_the_same_folder_are_refused(tmp_path, corpus, hp):
    gen(tmp_path, corpus, hp, train_size=2, test_size=0)
    with pytest.raises(UserError, match="other settings"):
        gen(tmp_path, corpus, hp, train_size=2, test_size=0, seed=5)


def test_float16_spectrograms(tmp_path, corpus, hp):
    out = gen(tmp_path, corpus, hp, train_size=0, test_size=2, float16=True)
    assert torch.load(out / "test" / "000000-mixed.pt", weights_only=True).dtype == torch.float16


def test_only_dev_shares_speakers_and_warns(tmp_path, corpus, hp, caplog):
    out = gen(tmp_path, corpus, hp, only_dev=True, train_size=30)
    assert "share speakers" in caplog.text
    train_speakers = {r["target_speaker"] for r in read_manifest(out / "train").values()}
    assert train_speakers & {p.name for p in (corpus / "dev-clean").iterdir()}


@pytest.mark.parametrize("text, value", [("True", True), ("false", False), ("0", False), ("yes", True),
                                         ("NO", False), ("1", True)])
def test_booleans_parse_as_written(text, value):
    assert str2bool(text) is value


def run_generator(*args):
    return subprocess.run([sys.executable, "generator.py", "-c", str(TINY), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True)


def test_cli_reverse_data_false_is_false(tmp_path, corpus):
    result = run_generator("-d", corpus, "-o", tmp_path / "o", "-p", "1", "--train_size", "0",
                           "--test_size", "1", "--reverse_data", "False", "--train_subsets", "train-clean-100")
    assert result.returncode == 0, result.stderr
    assert read_manifest(tmp_path / "o" / "test")["000000"]["reversed"] is False
    result = run_generator("-d", corpus, "-o", tmp_path / "b", "-p", "1", "--train_size", "0",
                           "--test_size", "1", "--reverse_data", "--train_subsets", "train-clean-100")
    assert read_manifest(tmp_path / "b" / "test")["000000"]["reversed"] is True


@pytest.mark.parametrize("case", ["missing_dir", "no_speakers", "unwritable", "bad_bool"])
def test_cli_errors_are_one_line(tmp_path, corpus, case):
    args = ["-d", corpus, "-o", tmp_path / "o", "-p", "1", "--train_subsets", "train-clean-100"]
    if case == "missing_dir":
        args[1] = tmp_path / "nowhere"
    elif case == "no_speakers":
        empty = tmp_path / "empty"
        for sub in ("train-clean-100", "dev-clean"):
            (empty / sub / "1" / "1").mkdir(parents=True)
        args[1] = empty
    elif case == "unwritable":
        blocker = tmp_path / "file"
        blocker.write_text("x")
        args[3] = blocker / "o"
    elif case == "bad_bool":
        args += ["--reverse_data", "maybe"]
    result = run_generator(*args)
    assert result.returncode != 0
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr


def test_real_speech(tmp_path):
    libri = need(LIBRI_MINI)
    hp = HParam(text="form:\n  input: '*.flac'\n")
    out = tmp_path / "o"
    generate(hp, libri, out, train_size=4, test_size=4, processes=1, train_subsets=["test-other"],
             test_subsets=["test-other"], only_dev=False)
    samples = list_samples(out / "test", hp)
    assert len(samples) == 4
    assert torch.load(samples[0].mixed_mag, weights_only=True).shape == (301, 601)
    os.sync()
    assert json.loads((out / "test" / "generation.json").read_text())["seed"] == 0
