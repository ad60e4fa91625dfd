"""EER scoring: the function against hand-worked cases, trial lists, folder trials, and the
evaluate_embedder.py command."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

from reverse_voicefilter.core.errors import UserError
from reverse_voicefilter.core.hparams import HParam
from reverse_voicefilter.embedding.eer import equal_error_rate, error_rates, folder_trials, read_trials
from reverse_voicefilter.model.embedder import SpeechEmbedder

SCRIPT_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# ---- the EER ---------------------------------------------------------------------------------------
def test_eer_hand_worked_with_interpolation():
    # same: 0.9, 0.4; different: 0.8, 0.1, 0.05. Accepting >= 0.8: FAR 1/3, FRR 1/2;
    # accepting >= 0.4: FAR 1/3, FRR 0. FRR - FAR goes 1/6 -> -1/3, crossing a third of the way:
    # EER = 1/3 (FAR is flat there; FRR 1/2 - 1/3 * 1/2 = 1/3), threshold 0.8 - 1/3 * 0.4 = 2/3.
    eer, threshold = equal_error_rate([0.9, 0.4, 0.8, 0.1, 0.05], [1, 1, 0, 0, 0])
    assert eer == pytest.approx(1 / 3)
    assert threshold == pytest.approx(2 / 3)


def test_eer_hand_worked_exact_crossing_and_extremes():
    # accepting >= 0.7: one of three different pairs accepted, one of three same pairs (0.3) rejected
    assert equal_error_rate([0.9, 0.8, 0.3, 0.7, 0.2, 0.1], [1, 1, 1, 0, 0, 0]) == pytest.approx((1 / 3, 0.7))
    assert equal_error_rate([3, 4, 1, 2], [1, 1, 0, 0])[0] == 0.0
    assert equal_error_rate([1, 2, 3, 4], [1, 1, 0, 0])[0] == 1.0
    assert equal_error_rate([0.5, 0.5], [1, 0])[0] == pytest.approx(0.5)  # ties move together


def test_eer_of_two_gaussians_is_the_theoretical_one():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(1, 1, 20000), rng.normal(0, 1, 20000)])
    labels = np.repeat([1, 0], 20000)
    assert equal_error_rate(scores, labels)[0] == pytest.approx(0.3085, abs=0.006)  # Phi(-1/2)


def test_error_rates_run_from_reject_all_to_accept_all():
    _, far, frr = error_rates([0.2, 0.6, 0.4], [1, 0, 1])
    assert (far[0], frr[0], far[-1], frr[-1]) == (0.0, 1.0, 1.0, 0.0)


def test_eer_needs_both_kinds_of_trials():
    with pytest.raises(UserError, match="same-speaker and different-speaker"):
        equal_error_rate([0.1, 0.2], [1, 1])


# ---- trials ----------------------------------------------------------------------------------------
def test_trial_list_is_read_relative_to_its_folder(tmp_path):
    (tmp_path / "trials.txt").write_text("# VoxCeleb1 style\n1 id1/a.wav id1/b.wav\n\n0 id1/a.wav id2/c.wav  # x\n")
    trials = read_trials(tmp_path / "trials.txt")
    assert trials == [(1, tmp_path / "id1/a.wav", tmp_path / "id1/b.wav"),
                      (0, tmp_path / "id1/a.wav", tmp_path / "id2/c.wav")]
    assert read_trials(tmp_path / "trials.txt", root="/data")[0][1].as_posix() == "/data/id1/a.wav"


@pytest.mark.parametrize("text, message", [
    ("1 a.wav b.wav\n1 a.wav\n", r"trials.txt:2: expected 'label path1 path2', got 2 field"),
    ("1 a.wav b.wav\nsame a.wav b.wav\n", r"trials.txt:2: the label must be 1 \(same speaker\) or 0"),
    ("# nothing\n\n", "holds no trials"),
])
def test_trial_list_errors_name_file_and_line(tmp_path, text, message):
    (tmp_path / "trials.txt").write_text(text)
    with pytest.raises(UserError, match=message):
        read_trials(tmp_path / "trials.txt")


def test_missing_trial_list(tmp_path):
    with pytest.raises(UserError, match="trial list not found"):
        read_trials(tmp_path / "none.txt")


def test_folder_trials_all_pairs_and_seeded_sample():
    speakers = {s: [f"{s}/{u}.wav" for u in range(3)] for s in "abc"}
    trials = folder_trials(speakers)
    assert sum(t[0] for t in trials) == 3 * 3 and len(trials) == 9 * 8 // 2  # 9 same pairs of 36
    assert all((t[1][0] == t[2][0]) == bool(t[0]) for t in trials)
    sample = folder_trials(speakers, sample=4, seed=7)
    assert sample == folder_trials(speakers, sample=4, seed=7) != folder_trials(speakers, sample=4, seed=8)
    assert sum(t[0] for t in sample) == 4 and len(sample) == 8


# ---- the command -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def speakers_dir(tmp_path_factory):
    from reverse_voicefilter.prepare.demo_corpus import make_corpus

    root = tmp_path_factory.mktemp("eer")
    make_corpus(root, {"dev-clean": (3, 3)}, duration=(1.5, 2.0), jobs=1, progress=False)
    return root


def run_script(*args):
    return subprocess.run([sys.executable, str(ROOT / "evaluate_embedder.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, env=SCRIPT_ENV)


def test_evaluate_embedder_on_a_folder_and_a_trial_list(speakers_dir, tmp_path):
    config = tmp_path / "small.yaml"
    config.write_text("embedder:\n  lstm_hidden: 16\n  lstm_layers: 1\n  emb_dim: 8\n")
    torch.manual_seed(0)
    torch.save(SpeechEmbedder(HParam(config)).state_dict(), tmp_path / "embedder.pt")
    proc = run_script("-e", tmp_path / "embedder.pt", "-c", config, "-d", speakers_dir / "dev-clean",
                      "--input_glob", "*-norm.wav", "-o", tmp_path / "folder")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "folder" / "report.json").read_text())
    assert (report["same_trials"], report["different_trials"], report["utterances"]) == (9, 27, 9)
    assert 0 <= report["eer"] <= 1 and (tmp_path / "folder" / "scores.png").stat().st_size > 0
    # the same pairs as a trial list give the same EER
    files = sorted((speakers_dir / "dev-clean").rglob("*-norm.wav"))
    lines = [f"{int(a.parts[-3] == b.parts[-3])} {a.relative_to(speakers_dir)} {b.relative_to(speakers_dir)}"
             for i, a in enumerate(files) for b in files[i + 1:]]
    (speakers_dir / "trials.txt").write_text("\n".join(lines) + "\n")
    proc = run_script("-e", tmp_path / "embedder.pt", "-c", config, "--trials", speakers_dir / "trials.txt",
                      "--plot", "det", "-o", tmp_path / "list")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "list" / "report.json").read_text())["eer"] == pytest.approx(report["eer"])
    assert (tmp_path / "list" / "det.png").is_file()


@pytest.mark.parametrize("case", ["missing folder", "bad trial list", "unwritable out"])
def test_evaluate_embedder_user_errors_are_one_line(speakers_dir, tmp_path, case):
    (tmp_path / "trials.txt").write_text("1 a.wav b.wav c.wav\n")
    (tmp_path / "file.txt").write_text("")
    args = {"missing folder": ["-d", tmp_path / "nope", "-o", tmp_path / "o"],
            "bad trial list": ["--trials", tmp_path / "trials.txt", "-o", tmp_path / "o"],
            "unwritable out": ["-d", speakers_dir / "dev-clean", "-o", tmp_path / "file.txt" / "o"]}[case]
    proc = run_script("-e", "resemblyzer", *args)
    expected = {"missing folder": "-d folder not found", "bad trial list": "trials.txt:1: expected",
                "unwritable out": "cannot write to -o folder"}[case]
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_resemblyzer_eer_on_librispeech_test_other(libri_mini, tmp_path):
    proc = run_script("-e", "resemblyzer", "-d", libri_mini / "test-other", "-o", tmp_path, "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["speakers"], report["utterances"], report["same_trials"]) == (10, 100, 450)
    assert report["eer"] < 0.03  # measured 0.33 %
