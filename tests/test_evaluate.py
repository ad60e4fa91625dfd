"""evaluate.py and evaluation/evaluate.py: figures against an independent computation, reports, errors."""
import csv
import json
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import disk_full_at_flush
from mir_eval.separation import bss_eval_sources
from test_inference import (  # noqa: F401
    RATE,
    error_lines,
    make_tiny_setup,
    one_torch_thread,
    run_main,
    start_script,
    voice,
)

from reverse_voicefilter.core.audio import Audio
from reverse_voicefilter.core.errors import UserError
from reverse_voicefilter.model.embedder import SpeechEmbedder
from reverse_voicefilter.model.model import VoiceFilter
from reverse_voicefilter.separation.options import MASK_MODES

SECONDS = 2.0  # tiny.yaml's audio_len


def make_test_folder(root, count=3, reversed_data=False, manifest=True):
    """A test split in the generator's layout: -mixed.wav, -target.wav, -dvec.txt, manifest.jsonl."""
    split = root / "test"
    split.mkdir(parents=True)
    (root / "refs").mkdir()
    records = []
    for i in range(count):
        speaker1 = voice(SECONDS, 170 + 25 * i, i)
        speaker2 = voice(SECONDS, 320 - 20 * i, i + 20)
        scale = 1.0 / (1.1 * np.max(np.abs(speaker1 + speaker2)))
        speaker1, speaker2 = speaker1 * scale, speaker2 * scale
        reference = root / "refs" / f"ref{i}.wav"
        sf.write(reference, voice(SECONDS, 170 + 25 * i, i + 40), RATE, subtype="FLOAT")
        sample = f"{i:06d}"
        sf.write(split / f"{sample}-target.wav", speaker2 if reversed_data else speaker1, RATE, subtype="FLOAT")
        sf.write(split / f"{sample}-mixed.wav", speaker1 + speaker2, RATE, subtype="FLOAT")
        (split / f"{sample}-dvec.txt").write_text(f"{reference}\n")
        records.append({"id": sample, "reference": str(reference), "target": "t", "interference": "i",
                        "target_speaker": "a", "interference_speaker": "b", "reversed": reversed_data})
    if manifest:
        (split / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return split


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    hp, config, checkpoint, embedder = make_tiny_setup(root / "model")
    split = make_test_folder(root)
    return {"root": root, "hp": hp, "config": config, "checkpoint": checkpoint, "embedder": embedder,
            "split": split}


def eval_args(setup, out, *extra):
    return ["-c", setup["config"], "-e", setup["embedder"], "--checkpoint_path", setup["checkpoint"],
            "-d", setup["split"], "-o", out, *extra]


# ---- an independent computation: numpy STFT (the original's), the networks, mir_eval directly --------
def independent_scores(setup, samples, factor=0.7, eps=1e-3):
    """{(sample, mode): {metric: value}} computed without the package's separation, evaluation or metrics."""
    hp = setup["hp"]
    audio = Audio(hp)
    model = VoiceFilter(hp).eval()
    model.load_state_dict(torch.load(setup["checkpoint"], weights_only=True)["model"])
    embedder = SpeechEmbedder(hp).eval()
    embedder.load_state_dict(torch.load(setup["embedder"], weights_only=True))

    def dvec_of(wav):
        with torch.no_grad():
            return embedder(torch.from_numpy(audio.get_mel(wav)))

    def sdr(ref, est):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bss_eval_sources(ref[None].astype(np.float64), est[None].astype(np.float64),
                                    compute_permutation=False)[0][0]

    def si_sdr(ref, est):
        ref, est = ref.astype(np.float64) - ref.mean(), est.astype(np.float64) - est.mean()
        projection = np.dot(est, ref) / np.dot(ref, ref) * ref
        return 10 * np.log10(np.sum(projection ** 2) / np.sum((est - projection) ** 2))

    def cosine(a, b):
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

    split = setup["split"]
    scores = {}
    for sample in samples:
        mixed, _ = sf.read(split / f"{sample}-mixed.wav", dtype="float32")
        target, _ = sf.read(split / f"{sample}-target.wav", dtype="float32")
        reference, _ = sf.read((split / f"{sample}-dvec.txt").read_text().strip(), dtype="float32")
        ref_dvec = dvec_of(reference)
        mag, phase = audio.wav2spec(mixed)
        with torch.no_grad():
            mask = model(torch.from_numpy(mag)[None], ref_dvec[None])[0].numpy()
        mixed_similarity = cosine(dvec_of(mixed), ref_dvec)
        cleans = {"org": target, "inv": mixed - target}
        before = {k: (sdr(c, mixed), si_sdr(c, mixed)) for k, c in cleans.items()}
        for mode, est in {"org": mag * mask, "inv_div": factor * mag / np.maximum(mask, eps),
                          "inv_sub": mag * (1 - mask) / factor}.items():
            output = audio.spec2wav(est, phase)
            assert output.shape == mixed.shape
            kind = "org" if mode == "org" else "inv"
            scores[sample, mode] = {
                "sdr_before": before[kind][0], "sdr_after": sdr(cleans[kind], output),
                "si_sdr_before": before[kind][1], "si_sdr_after": si_sdr(cleans[kind], output),
                "similarity_before": mixed_similarity,
                "similarity_after": cosine(dvec_of(output), ref_dvec)}
    return scores


STALE = [".report.json.k2j_x9ab.tmp.json", ".per_sample.csv.tmp", ".sdr_before_after.png.abcd1234.tmp.png"]
KEPT = ["notes.txt", ".hidden.tmp"]


@pytest.fixture(scope="module")
def evaluated(setup):
    """One real evaluate.py run (mir_eval in a pool of 2), while this process computes the references."""
    out = setup["root"] / "out"
    out.mkdir()
    for name in STALE + KEPT:  # what a killed run left (this suite's naming, and an older one), and the user's
        (out / name).write_text("x")
    proc = start_script("evaluate.py", *eval_args(setup, out, "--mask", "all", "--jobs", "2", "--batch_size", "2",
                                                     "--channels_last", "--threads", "1", "-v"))
    expected = independent_scores(setup, ["000000", "000002"])
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    with open(out / "per_sample.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {"out": out, "stdout": stdout, "stderr": stderr, "rows": rows, "expected": expected,
            "report": json.loads((out / "report.json").read_text())}


def test_outputs_and_layout(evaluated):
    out, rows, report = evaluated["out"], evaluated["rows"], evaluated["report"]
    assert len(rows) == 3 * len(MASK_MODES)
    assert [(r["sample_id"], r["mode"]) for r in rows[:3]] == [("000000", m) for m in MASK_MODES]
    assert (out / "sdr_before_after.png").stat().st_size > 1000
    assert report["counts"] == {"samples_found": 3, "samples": 3, "failed": 0, "modes": 3, "rows": 9}
    assert report["reversed_data"] is False and report["reversed_source"] == "manifest"
    assert report["modes"]["org"]["reference"] == "target"
    assert report["modes"]["inv_sub"]["reference"] == "mixed_minus_target"
    assert "reference speaker" in report["modes"]["org"]["reference_is"]
    assert "minus" in report["modes"]["inv_div"]["reference_is"]
    assert report["checkpoint"].endswith("chkpt_0.pt") and report["factor"] == 0.7
    assert report["channels_last"] is True and report["precision"] == "fp32"
    assert "median" in evaluated["stdout"] and "inv_div" in evaluated["stdout"]


def test_figures_match_an_independent_computation(evaluated):
    rows = {(r["sample_id"], r["mode"]): r for r in evaluated["rows"]}
    for (sample, mode), expected in evaluated["expected"].items():
        row = rows[(sample, mode)]
        assert row["reference"] == ("target" if mode == "org" else "mixed_minus_target")
        for key, value in expected.items():
            tolerance = 1e-4 if key.endswith("before") and "similarity" not in key else 1e-3
            assert abs(float(row[key]) - value) < tolerance, (sample, mode, key, row[key], value)
        assert abs(float(row["sdr_gain"]) - (expected["sdr_after"] - expected["sdr_before"])) < 1e-3


def test_report_summarizes_the_rows(evaluated):
    report, rows = evaluated["report"], evaluated["rows"]
    for mode in MASK_MODES:
        mine = [r for r in rows if r["mode"] == mode]
        assert report["modes"][mode]["count"] == 3
        for metric in ("sdr_before", "sdr_after", "sdr_gain", "si_sdr_after", "similarity_before",
                       "similarity_after"):
            values = np.array([float(r[metric]) for r in mine])
            assert abs(report["modes"][mode][metric]["median"] - np.median(values)) < 1e-5
            assert abs(report["modes"][mode][metric]["mean"] - np.mean(values)) < 1e-5


def test_reversed_data_and_limit(setup, tmp_path):
    """In this process (jobs 1): the manifest's "reversed" is read, --limit is honoured, and the
    scores follow the -target.wav file, whatever speaker it holds."""
    from reverse_voicefilter.evaluation.evaluate import run_evaluation
    from reverse_voicefilter.separation.loading import load_separator

    split = make_test_folder(tmp_path / "rev", count=2, reversed_data=True)
    separator = load_separator(setup["hp"], setup["checkpoint"], setup["embedder"], torch.device("cpu"))
    report = run_evaluation(separator, split, tmp_path / "out", ["org", "inv_sub"], 0.7, limit=1, progress=False)
    assert report["reversed_data"] is True and report["counts"]["samples"] == 1
    assert "interfering speaker (reversed data)" in report["modes"]["org"]["reference_is"]
    assert "reference speaker (reversed data)" in report["modes"]["inv_sub"]["reference_is"]
    assert (tmp_path / "out" / "sdr_before_after.png").exists()
    rows = list(csv.DictReader(open(tmp_path / "out" / "per_sample.csv")))
    assert [r["mode"] for r in rows] == ["org", "inv_sub"]
    mixed, _ = sf.read(split / "000000-mixed.wav", dtype="float32")
    target, _ = sf.read(split / "000000-target.wav", dtype="float32")
    from reverse_voicefilter.evaluation.metrics import sdr

    assert abs(float(rows[0]["sdr_before"]) - sdr(target, mixed)) < 1e-4
    assert abs(float(rows[1]["sdr_before"]) - sdr(mixed - target, mixed)) < 1e-4


def test_reversed_flag_and_mixed_manifest(tmp_path):
    from reverse_voicefilter.core.hparams import HParam
    from reverse_voicefilter.data.samples import list_samples
    from reverse_voicefilter.evaluation.evaluate import decide_targets, split_reversed
    from reverse_voicefilter.evaluation.scoring import TARGET

    hp = HParam()
    split = make_test_folder(tmp_path / "a", count=2, manifest=False)
    samples = list_samples(split, hp, need_mags=False)
    assert split_reversed(split, samples) == (None, "unknown")
    assert decide_targets(samples, split).model_reversed is False  # nothing tells: a normal model
    flagged = decide_targets(samples, split, True)
    assert (flagged.model_reversed, flagged.because, flagged.org_kind) == (True, "flag", TARGET)
    (split / "manifest.jsonl").write_text('{"id": "000000", "reversed": true}\n{"id": "000001", "reversed": false}\n')
    with pytest.raises(UserError, match="mixes reversed"):
        split_reversed(split, samples)


@pytest.mark.parametrize("case", ["missing folder", "empty folder", "bogus mask", "negative limit", "zero jobs"])
def test_bad_input_is_one_error_line(setup, tmp_path, case, capsys):
    from reverse_voicefilter.commands import evaluate

    empty = tmp_path / "empty"
    empty.mkdir()
    argv = {
        "missing folder": eval_args(setup, tmp_path / "o") + ["-d", tmp_path / "nope"],
        "empty folder": eval_args(setup, tmp_path / "o") + ["-d", empty],
        "bogus mask": eval_args(setup, tmp_path / "o", "--mask", "bogus"),
        "negative limit": eval_args(setup, tmp_path / "o", "--limit", "-1"),
        "zero jobs": eval_args(setup, tmp_path / "o", "--jobs", "0"),
    }[case]
    code, _, err = run_main(evaluate.main, argv, capsys)
    assert code not in (0, None)
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
    assert not (tmp_path / "o" / "report.json").exists()


# ---- defects -------------------------------------------------------------------------------------------
def test_stale_temporaries_are_cleared_and_threads_logged(evaluated):
    names = sorted(p.name for p in evaluated["out"].iterdir())
    assert names == sorted(KEPT + ["per_sample.csv", "report.json", "sdr_before_after.png"])
    assert "using 1 CPU thread(s)" in evaluated["stderr"]
    assert "removed" in evaluated["stderr"] and ".per_sample.csv.tmp" in evaluated["stderr"]


def test_unwritable_out_dir_is_one_line_before_any_work(setup, tmp_path, capsys, monkeypatch):
    from reverse_voicefilter.commands import evaluate
    from reverse_voicefilter.evaluation import evaluate as evaluation
    from reverse_voicefilter.separation import loading as separation

    blocker = tmp_path / "somefile.txt"
    blocker.write_text("a file, not a folder")
    monkeypatch.setattr(separation, "load_separator", lambda *a, **k: pytest.fail("loaded the model first"))
    monkeypatch.setattr(evaluation, "run_evaluation", lambda *a, **k: pytest.fail("scored first"))
    code, _, err = run_main(evaluate.main, eval_args(setup, blocker / "out"), capsys)
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: cannot write to -o folder {blocker / 'out'}: Not a directory"]


def model_trained_on(setup, root, reverse):
    """The tiny checkpoint, with a config naming a training folder the generator made normal or reversed."""
    train = root / "train"
    train.mkdir(parents=True)
    (train / "generation.json").write_text(json.dumps({"split": "train", "reverse": reverse}))
    state = torch.load(setup["checkpoint"], weights_only=True)
    state["hp_str"] = state["hp_str"].replace("train_dir: ''", f"train_dir: {train}")
    assert str(train) in state["hp_str"]
    from reverse_voicefilter.core.checkpoint import save_checkpoint

    return save_checkpoint(state, root / "chkpt.pt")


@pytest.mark.parametrize("flag", [None, True])
def test_org_is_scored_against_the_speaker_the_model_keeps(setup, tmp_path, caplog, flag):
    """A normal model on a reversed folder: org keeps the reference speaker, so it is scored against
    -mixed.wav minus -target.wav, with a warning; --reversed True says otherwise."""
    from reverse_voicefilter.evaluation.evaluate import run_evaluation
    from reverse_voicefilter.evaluation.metrics import sdr
    from reverse_voicefilter.separation.loading import load_separator

    checkpoint = model_trained_on(setup, tmp_path / "model", reverse=False)
    split = make_test_folder(tmp_path / "rev", count=1, reversed_data=True)
    separator = load_separator(None, checkpoint, setup["embedder"], torch.device("cpu"))
    with caplog.at_level("WARNING"):
        report = run_evaluation(separator, split, tmp_path / "out", ["org", "inv_sub"], 0.7, reversed_flag=flag,
                                progress=False)
    mixed, _ = sf.read(split / "000000-mixed.wav", dtype="float32")
    target, _ = sf.read(split / "000000-target.wav", dtype="float32")
    rows = list(csv.DictReader(open(tmp_path / "out" / "per_sample.csv")))
    why = report["org_scored_against"]
    if flag is None:
        assert why["because"] == "model" and str(tmp_path / "model" / "train") in why["explanation"]
        assert why["org_reference_is"] == "-mixed.wav minus -target.wav: the reference speaker (reversed data)"
        assert report["modes"]["org"]["reference"] == rows[0]["reference"] == "mixed_minus_target"
        assert abs(float(rows[0]["sdr_before"]) - sdr(mixed - target, mixed)) < 1e-4
        assert abs(float(rows[1]["sdr_before"]) - sdr(target, mixed)) < 1e-4
        assert "holds reversed data" in caplog.text
    else:
        assert why["because"] == "flag" and why["model_reversed"] is True
        assert report["modes"]["org"]["reference"] == "target"
        assert abs(float(rows[0]["sdr_before"]) - sdr(target, mixed)) < 1e-4
        assert "holds" not in caplog.text
    assert why["folder_reversed"] is True and why["folder_reversed_source"] == "manifest"

    from reverse_voicefilter.evaluation.evaluate import format_table

    table = format_table(report["modes"], why)
    assert f"org: 1 samples, scored against {report['modes']['org']['reference_is']}" in table
    assert "why: the model keeps" in table and why["explanation"] in table


def test_config_comes_from_the_checkpoint_when_c_is_absent(setup, tmp_path, capsys):
    from reverse_voicefilter.commands import evaluate

    argv = ["-e", setup["embedder"], "--checkpoint_path", setup["checkpoint"], "-d", setup["split"], "-o",
            tmp_path / "out", "--mask", "org", "--limit", "1"]
    code, out, err = run_main(evaluate.main, argv, capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["config"] == "checkpoint" and report["counts"]["samples"] == 1


def test_samples_shorter_than_the_embedders_window_are_scored_without_similarity(setup, tmp_path, capsys):
    """0.5 s mixtures: too short for the original embedder's window (0.79 s here), but SDR needs no
    d-vector: they are scored, and their speaker similarity is left out (NaN), not the run stopped."""
    from reverse_voicefilter.commands import evaluate

    split = tmp_path / "short"
    split.mkdir()
    reference = tmp_path / "ref.wav"
    sf.write(reference, voice(SECONDS, 170, 40), RATE, subtype="FLOAT")
    for i in range(2):
        speaker1, speaker2 = voice(0.5, 170 + 25 * i, i) * 0.4, voice(0.5, 320, i + 20) * 0.4
        sf.write(split / f"{i:06d}-target.wav", speaker1, RATE, subtype="FLOAT")
        sf.write(split / f"{i:06d}-mixed.wav", speaker1 + speaker2, RATE, subtype="FLOAT")
        (split / f"{i:06d}-dvec.txt").write_text(f"{reference}\n")
    out = tmp_path / "o"
    code, _, err = run_main(evaluate.main, eval_args(setup, out) + ["-d", split, "--mask", "org"], capsys)
    assert code == 0, err
    with open(out / "per_sample.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    assert all(np.isfinite(float(r["sdr_after"])) for r in rows)
    assert all(r["similarity_before"] in ("", "nan") for r in rows), rows


def test_an_unreadable_sample_is_named_and_the_others_are_scored(setup, tmp_path, capsys):
    import shutil

    from reverse_voicefilter.commands import evaluate

    split = tmp_path / "some-bad"
    shutil.copytree(setup["split"], split)
    (split / "000001-mixed.wav").write_bytes(b"not a wav file at all")
    out = tmp_path / "o"
    code, _, err = run_main(evaluate.main, eval_args(setup, out) + ["-d", split, "--mask", "org"], capsys)
    assert code == 1, err
    assert "failed: sample 000001:" in err and "000001-mixed.wav" in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["samples"] == 2 and list(report["failed_samples"]) == ["000001"]
    with open(out / "per_sample.csv", newline="") as f:
        assert [r["sample_id"] for r in csv.DictReader(f)] == ["000000", "000002"]
    # nothing readable at all: one line, exit 2, no report
    for name in ("000000", "000002"):
        (split / f"{name}-mixed.wav").write_bytes(b"garbage")
    code, _, err = run_main(evaluate.main, eval_args(setup, tmp_path / "o2") + ["-d", split, "--mask", "org"], capsys)
    assert code == 2 and "none of the 3 samples" in err
    assert not (tmp_path / "o2" / "report.json").exists()


@pytest.mark.parametrize("missing", ["target", "mixed"])
def test_a_sample_without_its_wav_is_named_and_counted_as_failed(setup, tmp_path, capsys, caplog, missing):
    """A sample whose -dvec.txt is there but whose -target.wav (or -mixed.wav) is gone was left out
    unseen: exit 0, the sample in neither failed_samples nor the counts."""
    import shutil

    from reverse_voicefilter.commands import evaluate

    split = tmp_path / "one-gone"
    shutil.copytree(setup["split"], split)
    (split / f"000001-{missing}.wav").unlink()
    out = tmp_path / "o"
    with caplog.at_level("WARNING"):
        code, _, err = run_main(evaluate.main, eval_args(setup, out) + ["-d", split, "--mask", "org"], capsys)
    assert code == 1, err
    named = [r.getMessage() for r in caplog.records if "000001" in r.getMessage()]
    assert len(named) == 1 and f"000001-{missing}.wav" in named[0], named
    assert "failed: sample 000001:" in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    report = json.loads((out / "report.json").read_text())
    assert list(report["failed_samples"]) == ["000001"]
    assert f"000001-{missing}.wav" in report["failed_samples"]["000001"]
    assert (report["counts"]["samples_found"], report["counts"]["samples"], report["counts"]["failed"]) == (3, 2, 1)
    with open(out / "per_sample.csv", newline="") as f:
        assert [r["sample_id"] for r in csv.DictReader(f)] == ["000000", "000002"]


@pytest.mark.parametrize("reverse", [True, False])
def test_an_online_mixed_model_says_itself_what_org_keeps(tmp_path, reverse):
    """A model trained with data.mixing online has no training folder: its config's data.reverse_data
    decides what org keeps (before, evaluate.py fell back to the test folder and scored a reversed
    model's org against the wrong speaker)."""
    from reverse_voicefilter.evaluation.evaluate import model_reversed
    hp_str = (f"data:\n  mixing: online\n  reverse_data: {str(reverse).lower()}\n  libri_dir: {tmp_path}/gone\n")
    value, why = model_reversed(hp_str)
    assert value is reverse and "data.mixing online" in why


def test_a_second_evaluation_in_a_locked_out_dir_is_refused(setup, tmp_path, capsys):
    """Two evaluations into one -o: the second would remove the first's temporaries and both write
    report.json; it is refused while the first lives."""
    from test_runlock import lock_holder

    from reverse_voicefilter.commands import evaluate

    out = tmp_path / "o"
    with lock_holder(out) as holder:
        (out / ".report.json.k2j_x9ab.tmp.json").write_text("being written")
        code, _, err = run_main(evaluate.main, eval_args(setup, out, "--mask", "org"), capsys)
        assert code == 2 and len(error_lines(err)) == 1, err
        assert error_lines(err)[0].startswith(f"error: {out} is in use by another run (process {holder.pid} on ")
        assert sorted(p.name for p in out.iterdir()) == [".lock", ".report.json.k2j_x9ab.tmp.json"]


def test_a_full_disk_stops_with_one_line_and_leaves_no_temporary(setup, tmp_path, capsys, monkeypatch):
    """ENOSPC injected where the report is flushed to the disk: one line naming the folder, exit 1,
    no traceback, no temporary left in -o."""
    from reverse_voicefilter.commands import evaluate
    from reverse_voicefilter.core import atomic

    disk_full_at_flush(monkeypatch, ".report.json.")
    out = tmp_path / "o"
    code, _, err = run_main(evaluate.main, eval_args(setup, out) + ["--mask", "org"], capsys)
    assert code == 1 and "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: no space left on the device of {out}: free some space and run again (the files written before "
        f"are kept)"]
    assert not [p.name for p in out.iterdir() if atomic.is_temporary(p.name)]
    assert not (out / "report.json").exists()
