"""generator.py --tuples: Google's official test set from a triplet file over librispeech-mini's test-other."""
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import LIBRI_MINI, ROOT, SHARED, need

from reverse_voicefilter.commands import generator
from reverse_voicefilter.core.audio import Audio
from reverse_voicefilter.core.errors import UserError, run_cli
from reverse_voicefilter.core.hparams import HParam
from reverse_voicefilter.data.official import UtteranceFinder, generate_official, mix_official, read_triplets
from reverse_voicefilter.data.samples import list_samples, read_manifest

TINY = ROOT / "config" / "tiny.yaml"
HEADER = "clean_utterance,embedding_utterance,interference_utterance\n"
# interference longer than the clean utterance (cut), shorter (padded), and a clean utterance of 22.75 s
ROWS = [("1688-142285-0002", "1688-142285-0003", "1998-15444-0001"),
        ("1998-15444-0003", "1998-15444-0004", "2033-164914-0005"),
        ("3080-5032-0009", "3080-5032-0003", "2414-128291-0003")]


def write_tuples(path, rows=ROWS, tail=""):
    path.write_text(HEADER + "".join(",".join(r) + "\n" for r in rows) + tail)
    return path


def flac(root, utterance):
    return UtteranceFinder(root)(utterance)


def run(*args):
    """generator.main as the command line runs it: (exit code, stderr)."""
    try:
        run_cli(generator.main, ["-c", str(TINY), "--progress", "False", "-p", "1", *map(str, args)])
    except SystemExit as exit_:
        return exit_.code
    return 0


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    libri_mini = need(LIBRI_MINI)
    root = tmp_path_factory.mktemp("official")
    tuples = write_tuples(root / "tuples.csv")
    assert run("--tuples", tuples, "-d", libri_mini, "-o", root / "out") == 0
    return {"root": root, "tuples": tuples, "split": root / "out" / "test", "libri": libri_mini}


def test_mixture_is_clean_plus_interference_padded_or_cut(official):
    """mixed == clean + interference (gain 1) cut or zero-padded at its end to the clean length, whole
    utterances, no normalization; the -dvec.txt names the embedding utterance's .flac."""
    split, libri = official["split"], official["libri"]
    hp, lengths = HParam(TINY), set()
    audio = Audio(hp)
    padded = cut = 0
    for i, (clean_id, emb_id, itf_id) in enumerate(ROWS):
        clean, rate = sf.read(flac(libri, clean_id), dtype="float32")
        itf, _ = sf.read(flac(libri, itf_id), dtype="float32")
        mixed, rate_m = sf.read(split / f"{i:06d}-mixed.wav", dtype="float32")
        target, _ = sf.read(split / f"{i:06d}-target.wav", dtype="float32")
        assert rate == rate_m == 16000
        expected_itf = np.zeros_like(clean)
        expected_itf[:min(len(clean), len(itf))] = itf[:len(clean)]
        padded += len(itf) < len(clean)
        cut += len(itf) > len(clean)
        np.testing.assert_array_equal(target, clean)  # whole, unscaled
        np.testing.assert_array_equal(mixed, clean + expected_itf)
        lengths.add(len(mixed))
        assert (split / f"{i:06d}-dvec.txt").read_text() == flac(libri, emb_id)
        mag = torch.load(split / f"{i:06d}-mixed.pt", weights_only=True)
        np.testing.assert_array_equal(mag.numpy(), audio.wav2spec(mixed)[0])
    assert padded and cut and len(lengths) == 3  # both rules ran, any length kept
    assert max(lengths) > 20 * 16000
    assert len(list_samples(split, hp)) == 3  # the trainer's format
    manifest = read_manifest(split)
    assert [m["target"] for m in manifest.values()] == [flac(libri, r[0]) for r in ROWS]
    assert not any(m["reversed"] for m in manifest.values())
    assert json.loads((split / "generation.json").read_text())["input"] == "*.flac"


def test_mix_rule_on_arrays():
    clean = np.arange(1, 6, dtype=np.float32)
    _, itf, mixed = mix_official(clean, np.full(3, 10, np.float32))
    np.testing.assert_array_equal(mixed, [11, 12, 13, 4, 5])
    _, itf, mixed = mix_official(clean, np.arange(100, 108, dtype=np.float32))
    np.testing.assert_array_equal(itf, [100, 101, 102, 103, 104])


def test_rerun_resumes_and_test_size_takes_the_first_rows(official, tmp_path):
    out = tmp_path / "out"
    assert run("--tuples", official["tuples"], "-d", official["libri"], "-o", out, "--test_size", 2) == 0
    split = out / "test"
    assert sorted(read_manifest(split)) == ["000000", "000001"]
    first = (split / "000000-mixed.wav").stat().st_mtime_ns
    # a killed run: sample 1 half written (its -dvec.txt never came), a temporary left behind
    (split / "000001-dvec.txt").unlink()
    (split / ".000001-mixed.wav.abcd1234.tmp.wav").write_bytes(b"partial")
    # all rows (extends the set), in two worker processes
    assert run("--tuples", official["tuples"], "-d", official["libri"], "-o", out, "-p", 2) == 0
    assert sorted(read_manifest(split)) == ["000000", "000001", "000002"]
    assert (split / "000000-mixed.wav").stat().st_mtime_ns == first  # kept, not remade
    assert not list(split.glob(".*.tmp*"))
    for i in range(3):
        name = f"{i:06d}-mixed.wav"
        assert (split / name).read_bytes() == (official["split"] / name).read_bytes()


def test_missing_utterance_is_an_error_naming_it_or_skipped(official, tmp_path, capsys):
    rows = ROWS[:1] + [("1688-142285-0003", "1688-142285-0004", "84-121123-0026")] + ROWS[1:2]
    tuples = write_tuples(tmp_path / "t.csv", rows)
    out = tmp_path / "out"
    assert run("--tuples", tuples, "-d", official["libri"], "-o", out) == 2
    err = capsys.readouterr().err
    assert "84-121123-0026" in err and "--skip_missing" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() or not list((out / "test").glob("*.wav"))  # nothing written before the check
    assert run("--tuples", tuples, "-d", official["libri"], "-o", out, "--skip_missing") == 0
    summary = generate_official(HParam(TINY), tuples, official["libri"], out, skip_missing=True, progress=False)
    assert (summary["skipped"], summary["size"], summary["reused"]) == (1, 2, 2)
    assert sorted(read_manifest(out / "test")) == ["000000", "000002"]  # ids are the rows


def test_bad_files_and_flags_are_one_line(official, tmp_path, capsys):
    cut_short = write_tuples(tmp_path / "cut.csv", tail="7777-126732")
    cases = [
        (["--tuples", tmp_path / "none.csv"], "not found"),
        (["--tuples", cut_short], "line 5"),
        (["--tuples", official["tuples"], "--test_size", 9], "holds only 3"),
        (["--tuples", official["tuples"], "--seed", 1], "--seed does not apply"),
        (["--tuples", official["tuples"], "--vad", "False"], "--vad does not apply"),
        (["--skip_missing"], "goes with --tuples"),
    ]
    for args, message in cases:
        assert run(*args, "-d", official["libri"], "-o", tmp_path / "o") == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
    # a folder made with other settings is refused, not mixed into
    assert run("--tuples", official["tuples"], "--float16", "True", "-d", official["libri"], "-o",
               official["root"] / "out") == 2
    assert "other settings (float16" in capsys.readouterr().err
    # a damaged tail does not stop a smaller set
    assert run("--tuples", cut_short, "--test_size", 1, "-d", official["libri"], "-o", tmp_path / "small") == 0


def test_reverse_data_makes_the_interference_the_target(official, tmp_path):
    out = tmp_path / "rev"
    assert run("--tuples", official["tuples"], "--test_size", 1, "--reverse_data", "True", "-d", official["libri"],
               "-o", out) == 0
    mixed, _ = sf.read(out / "test" / "000000-mixed.wav", dtype="float32")
    target, _ = sf.read(out / "test" / "000000-target.wav", dtype="float32")
    clean, _ = sf.read(official["split"] / "000000-target.wav", dtype="float32")
    np.testing.assert_array_equal(mixed, clean + target)
    assert read_manifest(out / "test")["000000"]["reversed"] is True


def test_read_triplets_skips_header_and_blank_lines(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(HEADER + "\n" + "1-2-3, 1-2-4 ,5-6-7\n")
    (t,) = read_triplets(path)
    assert (t.row, t.line, t.clean, t.embedding, t.interference) == (0, 3, "1-2-3", "1-2-4", "5-6-7")
    with pytest.raises(UserError, match="line 2"):
        path.write_text(HEADER + "1-2-3,oops,5-6-7\n")
        read_triplets(path)


def test_shared_official_file_parses(tmp_path):
    """The authors' file as shipped in ../shared: its first rows read, its speakers are dev speakers."""
    path = need(SHARED / "data" / "voicefilter-official" / "librispeech_dev_tuples.csv")
    rows = read_triplets(path, limit=100)
    assert len(rows) == 100 and all(r.clean.split("-")[0] == r.embedding.split("-")[0] for r in rows)
    assert os.path.basename(path) == "librispeech_dev_tuples.csv"
