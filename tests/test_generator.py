"""generator.py / reverse_voicefilter.data.generation: exact, seeded, resumable, reverse-consistent mixtures."""
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch
import tqdm
from conftest import LIBRI_MINI, ROOT, need

from reverse_voicefilter.commands import generator
from reverse_voicefilter.core.audio import Audio
from reverse_voicefilter.core.errors import UserError, run_cli
from reverse_voicefilter.core.hparams import HParam
from reverse_voicefilter.data import generation
from reverse_voicefilter.data.generation import generate
from reverse_voicefilter.data.mixing import MAX_ATTEMPTS, SPLIT_CODES, Mixer, magnitude, make_mixture, plan_candidates
from reverse_voicefilter.data.samples import list_samples, read_manifest
from reverse_voicefilter.data.speakers import Speakers, split_speakers
from reverse_voicefilter.prepare.demo_corpus import make_corpus

TINY = ROOT / "config" / "tiny.yaml"
TRAIN_SPEAKERS, TEST_SPEAKERS = 6, 4
MANIFEST_KEYS = ["id", "reference", "target", "interference", "target_speaker", "interference_speaker", "reversed"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root, subsets={"train-clean-100": (TRAIN_SPEAKERS, 4), "dev-clean": (TEST_SPEAKERS, 4),
                               "test-other": (3, 3)},
                seed=3, duration=(2.5, 4.0), jobs=1, progress=False)
    return root


@pytest.fixture(scope="module")
def hp():
    return HParam(TINY)


def digest(folder):
    """One hash of every file under ``folder`` (paths inside text files made relative)."""
    h = hashlib.sha1()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode())
        data = path.read_bytes()
        if path.suffix in (".txt", ".jsonl", ".json"):
            data = data.replace(str(folder).encode(), b"")
        h.update(data)
    return h.hexdigest()


def gen(tmp_path, corpus, hp, name="out", **kwargs):
    args = {"train_size": 12, "test_size": 5, "processes": 1, "seed": 0, "train_subsets": ["train-clean-100"],
            "progress": False}
    args.update(kwargs)
    summary = generate(hp, corpus, tmp_path / name, **args)
    return tmp_path / name, summary


def triplets(split_dir):
    return [(r["reference"], r["target"], r["interference"]) for r in read_manifest(split_dir).values()]


def speaker_of(path):
    return os.path.basename(os.path.dirname(os.path.dirname(path)))


def test_exact_count_contiguous_ids_no_duplicates_manifest(tmp_path, corpus, hp):
    out, summary = gen(tmp_path, corpus, hp)
    audio = Audio(hp)
    for split, size in (("train", 12), ("test", 5)):
        samples = list_samples(out / split, hp)
        assert [s.sample_id for s in samples] == [f"{i:06d}" for i in range(size)]
        assert summary[split]["size"] == summary[split]["made"] == size and summary[split]["reused"] == 0
        manifest = read_manifest(out / split)
        assert list(manifest) == [s.sample_id for s in samples]
        trips = triplets(out / split)
        assert len(set(trips)) == size
        for s in samples:
            record = manifest[s.sample_id]
            assert list(record) == MANIFEST_KEYS and record["reversed"] is False
            assert s.dvec_txt.read_text() == record["reference"] and os.path.isabs(record["reference"])
            assert record["reference"] != record["target"]
            assert speaker_of(record["reference"]) == speaker_of(record["target"]) == record["target_speaker"]
            assert speaker_of(record["interference"]) == record["interference_speaker"] != record["target_speaker"]
            mixed, rate = sf.read(s.mixed_wav, dtype="float32")
            target, _ = sf.read(s.target_wav, dtype="float32")
            assert rate == 16000 and mixed.shape == target.shape == (32000,)
            assert np.max(np.abs(mixed)) == pytest.approx(1 / 1.1, rel=1e-5)
            # the .pt files are Audio.wav2spec of the wavs, bit for bit
            mixed_mag = torch.load(s.mixed_mag, weights_only=True)
            assert mixed_mag.dtype == torch.float32 and mixed_mag.shape == (201, 257)
            np.testing.assert_array_equal(mixed_mag.numpy(), audio.wav2spec(mixed)[0])
            np.testing.assert_array_equal(torch.load(s.target_mag, weights_only=True).numpy(),
                                          audio.wav2spec(target)[0])
    train_speakers = {r["target_speaker"] for r in read_manifest(out / "train").values()}
    test_speakers = {r["target_speaker"] for r in read_manifest(out / "test").values()}
    assert not train_speakers & test_speakers
    assert test_speakers <= {p.name for p in (corpus / "dev-clean").iterdir()}


def test_magnitude_is_wav2spec(hp):
    wav = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    audio = Audio(hp)
    np.testing.assert_array_equal(magnitude(audio, wav), audio.wav2spec(wav)[0])


def test_plan_depends_on_index_only_and_has_no_duplicates():
    speakers = Speakers({"a": ["a1", "a2"], "b": ["b1", "b2", "b3"], "c": ["c1", "c2"]})
    big, small = plan_candidates(speakers, 30, 0, 1), plan_candidates(speakers, 10, 0, 1)
    np.testing.assert_array_equal(big[:10], small)  # a bigger size extends, never reshuffles
    rows = big.reshape(-1, 3)
    rows = rows[rows[:, 0] >= 0]
    assert len({tuple(r) for r in rows}) == len(rows) <= speakers.triplet_count() == 2 * 1 * 5 + 3 * 2 * 4 + 2 * 1 * 5
    assert big.shape == (30, MAX_ATTEMPTS, 3)


def test_same_output_whatever_the_process_count_and_on_rerun(tmp_path, corpus, hp):
    one, _ = gen(tmp_path, corpus, hp, "p1", processes=1)
    two, _ = gen(tmp_path, corpus, hp, "p2", processes=2)
    again, _ = gen(tmp_path, corpus, hp, "again", processes=1)
    assert digest(one) == digest(two) == digest(again)
    other, _ = gen(tmp_path, corpus, hp, "seed1", seed=1)
    assert digest(one) != digest(other)


def test_reverse_data_swaps_the_target_of_the_same_mixtures(tmp_path, corpus, hp):
    normal, _ = gen(tmp_path, corpus, hp, "n", train_size=0)
    reverse, _ = gen(tmp_path, corpus, hp, "r", train_size=0, reverse=True)
    normal_records, reverse_records = read_manifest(normal / "test"), read_manifest(reverse / "test")
    for i in range(5):
        a, b = (sf.read(d / "test" / f"{i:06d}-target.wav", dtype="float32")[0] for d in (normal, reverse))
        m1, m2 = ((d / "test" / f"{i:06d}-mixed.wav").read_bytes() for d in (normal, reverse))
        assert m1 == m2
        np.testing.assert_allclose(a + b, sf.read(normal / "test" / f"{i:06d}-mixed.wav")[0], atol=1e-6)
        record = reverse_records[f"{i:06d}"]
        assert record["reversed"] is True
        assert {**record, "reversed": False} == {**normal_records[f"{i:06d}"], "reversed": False}


def test_resume_completes_only_what_is_missing(tmp_path, corpus, hp):
    out, _ = gen(tmp_path, corpus, hp, train_size=8, test_size=0)
    train = out / "train"
    reference_digest = digest(out)
    kept = [train / f"000000{suffix}" for suffix in ("-mixed.wav", "-target.pt", "-dvec.txt")]
    mtimes = [p.stat().st_mtime_ns for p in kept]
    # what a kill leaves: samples without their dvec.txt (written last), missing files, temporaries
    (train / "000003-dvec.txt").unlink()
    (train / "000004-mixed.pt").unlink()
    (train / ".records" / "000005.json").unlink()
    for name in ("000006-dvec.txt", "000006-target.wav", "000006-mixed.pt"):
        (train / name).unlink()
    (train / "000006-mixed.pt.tmp").write_bytes(b"half")
    (train / ".000006-target.wav.x1y2.tmp").write_bytes(b"half")
    (train / "manifest.jsonl").write_text("")
    _, summary = gen(tmp_path, corpus, hp, train_size=8, test_size=0)
    assert summary["train"]["made"] == 4 and summary["train"]["reused"] == 4
    assert [p.stat().st_mtime_ns for p in kept] == mtimes
    assert not [p for p in train.rglob("*") if p.name.endswith(".tmp")]
    assert digest(out) == reference_digest
    _, summary = gen(tmp_path, corpus, hp, train_size=8, test_size=0)
    assert summary["train"]["made"] == 0


def test_bigger_size_extends_smaller_is_refused(tmp_path, corpus, hp):
    direct, _ = gen(tmp_path, corpus, hp, "direct", train_size=9, test_size=0)
    out, _ = gen(tmp_path, corpus, hp, "grown", train_size=4, test_size=0)
    _, summary = gen(tmp_path, corpus, hp, "grown", train_size=9, test_size=0)
    assert summary["train"]["made"] == 5
    assert digest(direct / "train") == digest(out / "train")
    with pytest.raises(UserError, match="more than the 3 asked for"):
        gen(tmp_path, corpus, hp, "grown", train_size=3, test_size=0)


@pytest.mark.parametrize("change", [{"seed": 5}, {"reverse": True}, {"float16": True}, {"vad": True}])
def test_other_settings_into_the_same_folder_are_refused(tmp_path, corpus, hp, change):
    gen(tmp_path, corpus, hp, train_size=2, test_size=0)
    key = next(iter(change))
    with pytest.raises(UserError, match=f"other settings.*{key}"):
        gen(tmp_path, corpus, hp, train_size=2, test_size=0, **change)


def test_other_config_and_foreign_samples_are_refused(tmp_path, corpus, hp):
    gen(tmp_path, corpus, hp, train_size=2, test_size=0)
    other = HParam.from_string(hp.hp_str)
    other.data.audio_len = 2.5
    with pytest.raises(UserError, match="audio_len"):
        generate(other, corpus, tmp_path / "out", train_size=2, test_size=0, processes=1,
                 train_subsets=["train-clean-100"], progress=False)
    foreign = tmp_path / "foreign" / "train"
    foreign.mkdir(parents=True)
    (foreign / "000000-dvec.txt").write_text("x")
    with pytest.raises(UserError, match="not made by this generator"):
        gen(tmp_path, corpus, hp, "foreign", train_size=2, test_size=0)


def test_float16_spectrograms(tmp_path, corpus, hp):
    out, _ = gen(tmp_path, corpus, hp, train_size=0, test_size=2, float16=True)
    mag = torch.load(out / "test" / "000000-mixed.pt", weights_only=True)
    full, _ = gen(tmp_path, corpus, hp, "full", train_size=0, test_size=2)
    reference = torch.load(full / "test" / "000000-mixed.pt", weights_only=True)
    assert mag.dtype == torch.float16 and mag.shape == reference.shape
    torch.testing.assert_close(mag.float(), reference, atol=1e-3, rtol=0)


def test_subset_choice(tmp_path, corpus, hp):
    out, _ = gen(tmp_path, corpus, hp, train_subsets=["dev-clean"], test_subsets=["test-other"],
                 train_size=6, test_size=3)
    dev, other = ({p.name for p in (corpus / s).iterdir()} for s in ("dev-clean", "test-other"))
    assert {r["target_speaker"] for r in read_manifest(out / "train").values()} <= dev
    assert {r["interference_speaker"] for r in read_manifest(out / "test").values()} <= other
    with pytest.raises(UserError, match="test-clean not found"):
        gen(tmp_path, corpus, hp, "x", test_subsets=["test-clean"])


def test_default_train_subsets_may_lack_train_clean_360(tmp_path, corpus, hp, caplog):
    out, _ = gen(tmp_path, corpus, hp, train_subsets=("train-clean-100", "train-clean-360"), test_size=0)
    assert "train-clean-360 not found" in caplog.text
    assert len(list_samples(out / "train", hp)) == 12


def test_only_dev_shares_speakers_and_warns(tmp_path, corpus, hp, caplog):
    out, _ = gen(tmp_path, corpus, hp, only_dev=True, train_size=30)
    assert "share speakers" in caplog.text
    train_speakers = {r["target_speaker"] for r in read_manifest(out / "train").values()}
    assert train_speakers & {p.name for p in (corpus / "dev-clean").iterdir()}


def test_test_and_holdout_speakers_stay_out_of_training(tmp_path, corpus, hp, caplog):
    both = ["train-clean-100", "dev-clean"]
    dev = {p.name for p in (corpus / "dev-clean").iterdir()}
    out, _ = gen(tmp_path, corpus, hp, "excluded", train_subsets=both, train_size=30, test_size=0)
    assert "left out of training" in caplog.text
    records = read_manifest(out / "train").values()
    assert not {r["target_speaker"] for r in records} & dev
    assert not {r["interference_speaker"] for r in records} & dev
    out, _ = gen(tmp_path, corpus, hp, "kept", train_subsets=both, train_size=30, test_size=0,
                 exclude_test_speakers=False)
    assert {r["target_speaker"] for r in read_manifest(out / "train").values()} & dev
    holdout = sorted(p.name for p in (corpus / "train-clean-100").iterdir())[:2]
    holdout_file = tmp_path / "holdout.txt"
    holdout_file.write_text(f"# speakers kept for evaluation\n{holdout[0]}\n{holdout[1]} | F | extra\n")
    out, _ = gen(tmp_path, corpus, hp, "held", holdout=generator.read_speaker_list(holdout_file),
                 train_size=20, test_size=0)
    records = read_manifest(out / "train").values()
    assert not {r["target_speaker"] for r in records} & set(holdout)
    assert not {r["interference_speaker"] for r in records} & set(holdout)
    with pytest.raises(UserError, match="exclude_test_speakers False"):
        gen(tmp_path, corpus, hp, "same", train_subsets=["dev-clean"], test_subsets=["dev-clean"])


def test_unreadable_files_are_counted_as_drops(tmp_path, corpus, hp):
    broken = tmp_path / "broken"
    for speaker in sorted((corpus / "train-clean-100").iterdir())[:3]:
        shutil.copytree(speaker, broken / "train-clean-100" / speaker.name)
    bad = broken / "train-clean-100" / "9999" / "1"
    bad.mkdir(parents=True)
    for i in range(3):
        (bad / f"9999-1-{i:04d}-norm.wav").write_bytes(b"RIFF not really a wav")
    shutil.copytree(corpus / "dev-clean", broken / "dev-clean")
    out, summary = gen(tmp_path, broken, hp, train_size=10, test_size=0)
    assert summary["train"]["dropped"]["unreadable file"] > 0
    assert len(list_samples(out / "train", hp)) == 10
    assert "9999" not in {r["target_speaker"] for r in read_manifest(out / "train").values()}


def test_gives_up_clearly_when_the_audio_is_too_short(tmp_path, corpus, hp):
    long = HParam.from_string(hp.hp_str)
    long.data.audio_len = 30.0
    with pytest.raises(UserError, match="candidates of sample 000000 were dropped .* target too short"):
        generate(long, corpus, tmp_path / "o", train_size=0, test_size=2, processes=1, progress=False)
    with pytest.raises(UserError, match="distinct"):
        gen(tmp_path, corpus, hp, "many", train_size=0, test_size=100000)


def test_voxceleb_layout_last_20_speakers_are_the_test_set(tmp_path, hp):
    vox = tmp_path / "vox"
    make_corpus(vox, subsets={"dev": (24, 3)}, seed=5, duration=(2.8, 3.2), jobs=1, progress=False)
    folders = sorted(p.name for p in (vox / "dev").iterdir())
    out = tmp_path / "o"
    generate(hp, None, out, train_size=3, test_size=6, processes=1, vox_dir=vox / "dev", progress=False)
    train = read_manifest(out / "train").values()
    assert {r["target_speaker"] for r in train} | {r["interference_speaker"] for r in train} <= set(folders[:4])
    assert {r["target_speaker"] for r in read_manifest(out / "test").values()} <= set(folders[4:])


@pytest.mark.parametrize("text, value", [("True", True), ("false", False), ("0", False), ("yes", True),
                                         ("NO", False), ("1", True), (None, True)])
def test_booleans_parse_as_written(text, value):
    base = ["-c", "c.yaml", "-d", "d", "-o", "o"]
    flag = ["--reverse_data"] + ([text] if text is not None else [])
    args = generator.build_parser().parse_args(base + flag + ["--vad"] + ([text] if text is not None else []))
    assert args.reverse_data is value and args.vad is value


def test_defaults():
    args = generator.build_parser().parse_args(["-c", "c.yaml", "-d", "d", "-o", "o"])
    assert (args.train_size, args.test_size, args.seed) == (40, 20, 0)
    assert args.reverse_data is False and args.vad is False and args.only_dev is False
    assert args.exclude_test_speakers is True and args.float16 is False
    assert args.process_num >= 1
    assert args.train_subsets == ["train-clean-100", "train-clean-360"] and args.test_subsets == ["dev-clean"]


def cli(capsys, *args):
    """Run generator.main as the command line does; (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(generator.main, ["-c", str(TINY), *map(str, args), "--progress", "False"])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.mark.parametrize("case, message", [
    ("missing_dir", "data folder not found"),
    ("missing_subset", "train-clean-360 not found"),
    ("no_speakers", "no training speaker with two or more '*-norm.wav' files"),
    ("flac_only", "--input_glob"),
    ("unwritable", "cannot write to -o folder"),
    ("processes", "-p must be at least 1"),
    ("size", "must not be negative"),
    ("bad_bool", "expected a boolean"),
    ("both_dirs", "not both"),
])
def test_cli_errors_are_one_line(tmp_path, corpus, capsys, case, message):
    args = ["-d", corpus, "-o", tmp_path / "o", "-p", "1", "--train_subsets", "train-clean-100"]
    if case == "missing_dir":
        args[1] = tmp_path / "nowhere"
    elif case == "missing_subset":
        args[-1:] = ["train-clean-100", "train-clean-360", "dev-clean"]
    elif case in ("no_speakers", "flac_only"):
        empty = tmp_path / "empty"
        for sub in ("train-clean-100", "dev-clean"):
            (empty / sub / "1" / "1").mkdir(parents=True)
        if case == "flac_only":
            (empty / "train-clean-100" / "1" / "1" / "1-1-0000.flac").write_bytes(b"")
        args[1] = empty
    elif case == "unwritable":
        blocker = tmp_path / "file"
        blocker.write_text("x")
        args[3] = blocker / "o"
    elif case == "processes":
        args[5] = "0"
    elif case == "size":
        args += ["--test_size", "-1"]
    elif case == "bad_bool":
        args += ["--reverse_data", "maybe"]
    elif case == "both_dirs":
        args += ["-v", corpus]
    code, _, err = cli(capsys, *args)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()  # a refused run makes no output folder


@pytest.mark.slow
def test_command_line_end_to_end(tmp_path, corpus):
    """The real script in a subprocess: `--reverse_data False` means False; the summary comes once; a user
    error is one line."""
    def run(*args):
        return subprocess.run([sys.executable, "generator.py", "-c", str(TINY), *map(str, args)],
                              cwd=ROOT, capture_output=True, text=True)

    result = run("-d", corpus, "-o", tmp_path / "o", "-p", "1", "--train_size", "2", "--test_size", "1",
                 "--reverse_data", "False", "--train_subsets", "train-clean-100")
    assert result.returncode == 0, result.stderr
    assert read_manifest(tmp_path / "o" / "test")["000000"]["reversed"] is False
    for summary in ("train: 2 samples", "test: 1 samples"):  # the closing summary, logged once
        assert (result.stdout + result.stderr).count(summary) == 1, result.stderr
    result = run("-d", tmp_path / "nowhere", "-o", tmp_path / "o")
    assert result.returncode == 2 and result.stderr.strip().startswith("error: data folder not found")
    assert len(result.stderr.strip().splitlines()) == 1


def test_real_speech(tmp_path, caplog):
    libri = need(LIBRI_MINI)
    caplog.set_level(logging.INFO)
    hp = HParam()  # the default config: 3 s, n_fft 1200
    out = tmp_path / "o"
    summary = generate(hp, libri, out, train_size=3, test_size=3, processes=1, train_subsets=["test-other"],
                       test_subsets=["test-other"], exclude_test_speakers=False, input_glob="*.flac",
                       progress=False)
    samples = list_samples(out / "test", hp)
    assert len(samples) == 3 and summary["test"]["made"] == 3
    assert torch.load(samples[0].mixed_mag, weights_only=True).shape == (301, 601)
    assert sf.info(str(samples[0].mixed_wav)).frames == 48000
    assert json.loads((out / "test" / "generation.json").read_text())["input"] == "*.flac"
    assert "test: 3 samples" in caplog.text


# ----------------------------------------------------------------------------- in-memory samples


@pytest.mark.parametrize("reverse, float16", [(False, False), (True, True)])
def test_in_memory_sample_equals_the_written_one(tmp_path, corpus, hp, reverse, float16):
    """data.mixing makes sample i in memory, without writing anything, exactly as generator.py writes it."""
    out, _ = gen(tmp_path, corpus, hp, train_size=6, test_size=3, reverse=reverse, float16=float16)
    train, test, _ = split_speakers(corpus, train_subsets=["train-clean-100"])
    audio = Audio(hp)
    for split, utterances, size in (("train", train, 6), ("test", test, 3)):
        speakers, mixer = Speakers(utterances), Mixer(hp)
        plan = plan_candidates(speakers, size, 0, SPLIT_CODES[split])
        records = read_manifest(out / split)
        for sample in list_samples(out / split, hp):
            i = int(sample.sample_id)
            made = [make_mixture(hp, speakers, 0, split, i, reverse=reverse),
                    make_mixture(hp, speakers, 0, split, i, reverse=reverse, mixer=mixer, plan=plan)]
            for mixture, _ in made:
                assert mixture.record(sample.sample_id) == records[sample.sample_id]
                assert sample.dvec_txt.read_text() == mixture.reference
                np.testing.assert_array_equal(sf.read(sample.target_wav, dtype="float32")[0], mixture.output_wav)
                np.testing.assert_array_equal(sf.read(sample.mixed_wav, dtype="float32")[0], mixture.mixed_wav)
                target_mag, mixed_mag = mixture.spectrograms(audio, float16)
                for path, mag in ((sample.target_mag, target_mag), (sample.mixed_mag, mixed_mag)):
                    saved = torch.load(path, weights_only=True)
                    assert saved.dtype == mag.dtype and torch.equal(saved, mag)


# ----------------------------------------------------------------------------- real LibriSpeech layouts


def libri_tree(root, libri, subsets, flac=True, norm=True):
    """A LibriSpeech root made of librispeech-mini's files ({new subset: mini subset}): per utterance a link
    to the FLAC and/or a '-norm.wav' link to it, as normalize-resample.sh leaves a folder (soundfile reads
    files by their content)."""
    for new, old in subsets.items():
        for path in sorted((libri / old).rglob("*.flac")):
            dest = root / new / path.relative_to(libri / old)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if flac:
                dest.symlink_to(path)
            if norm:
                dest.with_name(dest.stem + "-norm.wav").symlink_to(path)
    return root


def speakers_in(split_dir):
    records = read_manifest(split_dir).values()
    return {r["target_speaker"] for r in records} | {r["interference_speaker"] for r in records}


def test_only_dev_with_a_dev_clean_root_as_the_original(tmp_path, libri_mini, capsys, caplog):
    """The original's workflow: a root holding only dev-clean, `generator.py ... --only_dev True`."""
    root = libri_tree(tmp_path / "libri", libri_mini, {"dev-clean": "test-other"})
    code, _, err = cli(capsys, "-d", root, "-o", tmp_path / "o", "--only_dev", "True", "-p", "1",
                       "--train_size", "4", "--test_size", "2")
    assert code == 0, err
    dev = {p.name for p in (root / "dev-clean").iterdir()}
    assert speakers_in(tmp_path / "o" / "train") <= dev
    assert len(list_samples(tmp_path / "o" / "train", HParam(TINY))) == 4
    assert "train-clean-100, train-clean-360 not found" in caplog.text
    assert "--only_dev trains on the test speakers" in caplog.text


def test_only_dev_with_one_utterance_training_speakers(tmp_path, libri_mini, capsys, caplog):
    """train-clean-100 with one utterance per speaker: unusable, but with --only_dev the test speakers train."""
    root = libri_tree(tmp_path / "libri", libri_mini, {"train-clean-100": "train-clean-100",
                                                       "dev-clean": "test-other"})
    code, _, err = cli(capsys, "-d", root, "-o", tmp_path / "o", "--only_dev", "True", "-p", "1",
                       "--train_size", "4", "--test_size", "2", "--train_subsets", "train-clean-100")
    assert code == 0, err
    assert speakers_in(tmp_path / "o" / "train") <= {p.name for p in (root / "dev-clean").iterdir()}
    assert "251 speaker folders hold one '*-norm.wav' file each" in caplog.text


def test_no_speakers_message_says_what_the_folders_hold(tmp_path, libri_mini, capsys):
    """One usable utterance per speaker is not a missing normalization; FLAC only is."""
    normalized = libri_tree(tmp_path / "libri", libri_mini, {"train-clean-100": "train-clean-100",
                                                                  "dev-clean": "test-other"})
    code, _, err = cli(capsys, "-d", normalized, "-o", tmp_path / "o", "-p", "1",
                       "--train_subsets", "train-clean-100")
    assert code == 2
    assert "no training speaker with two or more '*-norm.wav' files" in err
    assert "251 speaker folders hold one '*-norm.wav' file each" in err and "--only_dev True" in err
    assert "normalize-resample" not in err and "reverse_voicefilter.prepare.normalize" not in err
    flac = libri_tree(tmp_path / "flac", libri_mini, {"train-clean-100": "test-other", "dev-clean": "test-other"},
                      norm=False)
    code, _, err = cli(capsys, "-d", flac, "-o", tmp_path / "o2", "-p", "1", "--train_subsets", "train-clean-100")
    assert code == 2
    assert "no '*-norm.wav' files at all (the folders hold *.flac files: run utils/normalize-resample.sh" in err
    assert "--input_glob '*.flac'" in err


# ----------------------------------------------------------------------------- interrupted runs, progress, summary


def test_rerun_removes_the_temporaries_a_kill_left_and_nothing_else(tmp_path, corpus, hp):
    out, _ = gen(tmp_path, corpus, hp, train_size=3, test_size=0)
    train = out / "train"
    reference_digest = digest(out)
    left = [  # what a SIGKILL mid-write leaves: core.atomic's temporaries, and the older NAME.tmp ones
        ".000001-mixed.wav.ab12cd34.tmp.wav", ".000002-target.pt.k2j_x9ab.tmp.pt",
        ".records/.000002.json.zz9_aaaa.tmp.json", ".manifest.jsonl.q1w2e3r4.tmp.jsonl",
        ".generation.json.a1b2c3d4.tmp.json", ".dvec-cache-0123abcd.pt.mmmmnnnn.tmp.pt", "000001-mixed.pt.tmp",
        "000001-dvec.txt.tmp",
        ".records/000001.json.tmp", "generation.json.tmp", "manifest.jsonl.tmp", "dvec-cache-0123abcd.pt.tmp"]
    kept = ["notes.tmp", "mine.txt", ".hidden", "keep.tmp.wav", "dvec-cache-0123abcd.pt", ".records/notes.tmp"]
    for name in left + kept:
        (train / name).write_bytes(b"half")
    _, summary = gen(tmp_path, corpus, hp, train_size=3, test_size=0)
    assert summary["train"]["made"] == 0
    assert [n for n in left if (train / n).exists()] == []
    assert [n for n in kept if (train / n).read_bytes() == b"half"] == kept
    for name in kept:
        (train / name).unlink()
    assert digest(out) == reference_digest


def test_first_time_estimate_leaves_out_the_pool_start_up(monkeypatch, capsys):
    """A worker pool that takes 10 minutes to start and then makes a sample a second: the progress bar never
    estimates more than the ~20 s left (it said 3 hours, counting the start-up as the first sample's time)."""
    clock = [1000.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])
    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)

    class SlowPool:
        _processes = 2

        def imap_unordered(self, func, jobs, chunksize=1):
            clock[0] += 600
            for i, job in enumerate(jobs):
                clock[0] += 0 if i == 0 else 1
                yield job[0], job[1], {"id": f"{job[1]:06d}"}, Counter()

    plan = np.zeros((20, MAX_ATTEMPTS, 3), dtype=np.int64)
    records, _ = generation._run_split("train", list(range(20)), plan, SlowPool(), True, 3.0)
    assert len(records) == 20
    shown = re.findall(r"<(\d+(?::\d+)+)", capsys.readouterr().err)
    seconds = [sum(int(x) * 60 ** k for k, x in enumerate(reversed(s.split(":")))) for s in shown]
    assert seconds and max(seconds) <= 20, shown


def test_closing_summary_is_written_once(tmp_path, corpus, capsys, caplog):
    caplog.set_level(logging.INFO)
    code, out, err = cli(capsys, "-d", corpus, "-o", tmp_path / "o", "-p", "1", "--train_size", "2", "--test_size",
                         "1", "--train_subsets", "train-clean-100")
    assert code == 0, err
    for split in ("train: 2 samples in", "test: 1 samples in"):
        assert (out + err + caplog.text).count(split) == 1, (out, err, caplog.text)


def test_a_second_generator_in_a_locked_out_dir_is_refused_until_the_holder_dies(tmp_path, corpus, capsys):
    """Two generators into one -o: the second would remove the first's temporaries as stale."""
    from test_runlock import lock_holder

    out = tmp_path / "o"
    args = ["-d", corpus, "-o", out, "-p", "1", "--train_subsets", "train-clean-100", "--train_size", "2",
            "--test_size", "0"]
    stale = out / "train" / ".000000-mixed.wav.ab12cd34.tmp.wav"  # to the first run, a file being written
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half")
    with lock_holder(out) as holder:
        code, _, err = cli(capsys, *args)
        assert code == 2 and [ln for ln in err.splitlines() if ln.startswith("error:")] == [
            f"error: {out} is in use by another run (process {holder.pid} on {socket.gethostname()}); wait for it "
            f"to end, or choose another -o"]
        assert stale.read_bytes() == b"half"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        code, _, err = cli(capsys, *args)
        assert code == 0, err
    assert not stale.exists() and len(read_manifest(out / "train")) == 2
    assert not (out / ".lock").exists()
