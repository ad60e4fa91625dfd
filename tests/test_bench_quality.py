"""bench/quality.py: its data (pieces cut at pauses, test triplets) and its figures."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from reverse_voicefilter.bench import quality, quality_data
from reverse_voicefilter.core.errors import UserError

ROOT = Path(__file__).resolve().parent.parent

RATE = 16000


def speech_like(seconds_on, pause, seed):
    """Noise bursts of the given lengths separated by ``pause`` seconds of near-silence."""
    rng = np.random.default_rng(seed)
    parts = []
    for on in seconds_on:
        parts += [0.3 * rng.standard_normal(int(on * RATE)), 1e-5 * rng.standard_normal(int(pause * RATE))]
    return np.concatenate(parts[:-1]).astype(np.float32)


def test_cuts_fall_in_the_pauses_and_pieces_are_long_enough():
    wav = speech_like([2.0, 2.0, 1.0, 3.0, 0.5], pause=0.3, seed=0)
    pieces = quality_data.cut_at_pauses(wav, RATE, min_piece_s=3.2)
    assert pieces[0][0] == 0 and pieces[-1][1] == len(wav)
    assert all(a[1] == b[0] for a, b in zip(pieces[:-1], pieces[1:], strict=True))  # contiguous, no overlap
    assert all(b - a >= 3.2 * RATE for a, b in pieces)
    assert len(pieces) == 2
    cut = pieces[0][1]
    assert np.abs(wav[cut - 800:cut + 800]).max() < 1e-3  # in the middle of a pause
    # no pause at all, or too short for two pieces: one piece
    assert quality_data.cut_at_pauses(speech_like([10.0], 0.3, 1), RATE) == [(0, 10 * RATE)]
    assert len(quality_data.cut_at_pauses(speech_like([2.0, 2.0], 0.3, 2), RATE)) == 1


def fake_mini(root, train_speakers=("11", "12", "13"), test_speakers=("21", "22", "23")):
    for i, spk in enumerate(train_speakers):
        path = root / "train-clean-100" / spk / "100" / f"{spk}-100-0000.flac"
        path.parent.mkdir(parents=True)
        sf.write(path, speech_like([2.0, 2.5, 2.0, 3.0], 0.3, i), RATE)
    for i, spk in enumerate(test_speakers):
        for k in range(3):
            path = root / "test-other" / spk / "200" / f"{spk}-200-{k:04d}.flac"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, speech_like([1.5], 0.1, 100 + 10 * i + k), RATE)
    return root


def test_training_pieces_are_deterministic_and_hold_no_test_speaker(tmp_path):
    mini = fake_mini(tmp_path / "mini")
    one = quality_data.write_training_pieces(mini, tmp_path / "a")
    two = quality_data.write_training_pieces(mini, tmp_path / "b")
    assert one == two and one["speakers"] == 3 and one["pieces"] == 6
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.wav"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.wav"))
    assert files_a == files_b and len(files_a) == 6
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)
    assert {f.parts[1] for f in files_a} == {"11", "12", "13"}  # train speakers only
    assert {f.parts[0] for f in files_a} == {"train-clean-100"}
    # the pieces together are the recording
    wav = sf.read(mini / "train-clean-100" / "11" / "100" / "11-100-0000.flac", dtype="float32")[0]
    joined = np.concatenate([sf.read(tmp_path / "a" / f, dtype="float32")[0] for f in files_a if f.parts[1] == "11"])
    assert np.allclose(joined, wav, atol=1e-4)


def test_a_speaker_in_both_subsets_is_refused(tmp_path):
    mini = fake_mini(tmp_path / "mini", train_speakers=("11", "21"))
    with pytest.raises(UserError, match="21 are in both train-clean-100 and test-other"):
        quality_data.write_training_pieces(mini, tmp_path / "out")


def test_triplets_follow_the_seed_and_the_rules(tmp_path):
    mini = fake_mini(tmp_path / "mini")
    rows = quality_data.draw_triplets(mini, seed=0)
    assert rows == quality_data.draw_triplets(mini, seed=0)
    assert rows != quality_data.draw_triplets(mini, seed=1)
    assert len(rows) == 9 and [r[0] for r in rows] == sorted(r[0] for r in rows)  # each utterance clean once
    test_ids = {p.stem for p in (mini / "test-other").rglob("*.flac")}
    for clean, reference, interference in rows:
        assert {clean, reference, interference} <= test_ids
        assert clean.split("-")[0] == reference.split("-")[0] and clean != reference
        assert interference.split("-")[0] != clean.split("-")[0]
    path = quality_data.write_triplets(rows, tmp_path / "t.csv")
    from reverse_voicefilter.data.official import read_triplets
    assert [(t.clean, t.embedding, t.interference) for t in read_triplets(path)] == rows


@pytest.mark.slow
def test_quick_run_end_to_end_agrees_with_evaluate(libri_mini, tmp_path):
    out = tmp_path / "quality"
    run = subprocess.run([sys.executable, "-m", "reverse_voicefilter.bench.quality", "--quick", "--data",
                          str(libri_mini), "-o", str(out), "--json", str(tmp_path / "q.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "cut at pauses" in run.stdout and "never seen in training" in run.stdout
    result = json.loads((tmp_path / "q.json").read_text())
    assert (out / "quality_curve.png").stat().st_size > 10_000
    (entry,) = result["runs"]
    assert [p["step"] for p in entry["curve"]] == [3, 6] and entry["steps"] == 6
    final = entry["final"]
    assert final["samples"] == 12 and final["org_keeps"] == "the reference speaker"
    # the same checkpoint and folder through evaluate.py give the same figures
    test_dir = result["data"]["test_dir"]
    ev = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--checkpoint_path", final["checkpoint"],
                         "-d", test_dir, "-o", str(tmp_path / "ev"), "--mask", "all",
                         "--limit", "12"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr[-2000:]
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    for mode, mine in final["modes"].items():
        for metric in ("sdr_gain", "si_sdr_gain", "similarity_after"):
            assert mine[metric]["median"] == pytest.approx(report["modes"][mode][metric]["median"], abs=2e-3), \
                (mode, metric)
    # gathering finished runs trains nothing: seed 2 never ran, so it is left out
    again = subprocess.run([sys.executable, "-m", "reverse_voicefilter.bench.quality", "--quick", "--score_only",
                            "--seeds", "1", "2", "--data", str(libri_mini), "-o", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "seed2: not trained, left out" in again.stdout
    assert not (out / "runs" / entry["name"].replace("seed1", "seed2")).exists()
    assert [r["seed"] for r in json.loads((out / "quality.json").read_text())["runs"]] == [1]
    # a run of 3 steps continued by --resume to the 6 of --quick: the same network as 6 steps at once
    out2 = tmp_path / "quality2"
    shutil.copytree(out / "data", out2 / "data")  # made once, reused: only the training is new
    for extra in (["--steps", "3"], ["--resume"]):
        step = subprocess.run([sys.executable, "-m", "reverse_voicefilter.bench.quality", "--quick",
                               "--eval_every", "3", *extra, "--data", str(libri_mini), "-o", str(out2)],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert step.returncode == 0, step.stderr[-2000:]
    assert f"{entry['name']}: resuming from chkpt_3.pt (6 steps)" in step.stdout
    (resumed,) = json.loads((out2 / "quality.json").read_text())["runs"]
    assert [p["step"] for p in resumed["curve"]] == [3, 6] and resumed["steps"] == 6
    spans = json.loads((out2 / "runs" / entry["name"] / "segments.json").read_text())
    assert len(spans) == 2 and all(end > start for start, end in spans)
    import torch

    from reverse_voicefilter.core.checkpoint import load_checkpoint
    weights = [load_checkpoint(folder / "runs" / entry["name"] / "chkpt" / "model" / "chkpt_6.pt")["model"]
               for folder in (out, out2)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # the training data held no test speaker
    train_speakers = {p.name for p in (out / "data" / "libri" / "train-clean-100").iterdir()}
    test_speakers = {p.name for p in (libri_mini / "test-other").iterdir() if p.is_dir()}
    assert train_speakers and not train_speakers & test_speakers


@pytest.mark.slow
def test_a_minutes_budget_stops_the_trainer_with_a_checkpoint(libri_mini, tmp_path):
    out = tmp_path / "quality"
    run = subprocess.run([sys.executable, "-m", "reverse_voicefilter.bench.quality", "--quick", "--minutes", "0.5",
                          "--eval_every", "1000", "--data", str(libri_mini), "-o", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    (entry,) = json.loads((out / "quality.json").read_text())["runs"]
    record = json.loads((out / "runs" / entry["name"] / "run.json").read_text())
    assert record["exit"] == 143  # stopped by the budget, after writing the step it was at
    assert 0 < entry["steps"] < 1000 and [p["step"] for p in entry["curve"]] == [entry["steps"]]
    assert 0.5 <= entry["train_minutes"] < 1.5


@pytest.mark.parametrize("recipe", sorted(quality.RECIPES))
def test_every_recipe_makes_a_config_the_trainer_accepts(recipe, tmp_path):
    import yaml

    from reverse_voicefilter.core.config_checks import check_config

    args = quality.parse_args(["--steps", "3000", "--recipe", recipe, "--workers", "0"])
    text = quality.run_config(args, tmp_path / "libri", tmp_path / "test", 1, False, recipe)
    sections = {k: v for doc in yaml.safe_load_all(text) if doc for k, v in doc.items()}
    check_config(sections, recipe)
    if recipe.startswith("warm-start"):  # from the demo's network, which must exist
        flags = quality.RECIPE_FLAGS[recipe]
        assert flags[0] == "--init_from" and Path(flags[1]).is_file()
    if recipe in ("warmup-cosine", "warm-start-decay"):
        assert sections["train"]["lr_schedule"] == "warmup_cosine" and sections["train"]["warmup_steps"] == 300


def test_resume_continues_only_the_same_recipe(tmp_path):
    def config(steps, recipe="original"):
        args = quality.parse_args(["--steps", str(steps), "--eval_every", "500", "--resume", "--workers", "0"])
        return args, quality.run_config(args, tmp_path / "libri", tmp_path / "test", 1, False, recipe)

    args, text = config(3000)
    run_dir = tmp_path / "run"
    (run_dir / "chkpt" / "model").mkdir(parents=True)
    assert quality.resume_point(args, run_dir, text) is None  # nothing trained yet
    (run_dir / "config.yaml").write_text(config(2000)[1])
    (run_dir / "chkpt" / "model" / "chkpt_1500.pt").write_bytes(b"")
    # a larger --steps with a constant rate continues from the latest checkpoint
    assert quality.resume_point(args, run_dir, text) == (run_dir / "chkpt" / "model" / "chkpt_1500.pt", [])
    # so does a run made in the NCHW memory format (the same model)
    (run_dir / "config.yaml").write_text(config(2000)[1].replace("channels_last: true", "channels_last: false"))
    assert "channels_last: false" in (run_dir / "config.yaml").read_text()
    assert quality.resume_point(args, run_dir, text) == (run_dir / "chkpt" / "model" / "chkpt_1500.pt", [])
    # another recipe, or a decaying rate whose end moves with --steps, is refused
    for recipe in ("film", "warmup-cosine"):
        other = config(3000, recipe)[1]
        with pytest.raises(SystemExit, match="--resume: run was trained with another config"):
            quality.resume_point(args, run_dir, other)
    # a run at its --steps already has nothing to continue
    assert quality.resume_point(config(1500)[0], run_dir, config(1500)[1]) is None


def test_training_minutes_leave_out_the_pauses():
    from reverse_voicefilter.bench.quality_report import training_minutes
    spans = [[0, 600], [4200, 4800], [6000, None]]
    assert training_minutes(spans, until=300) == 5
    assert training_minutes(spans, until=4500) == 15  # 10 min, an hour's pause, 5 min
    assert training_minutes(spans, until=6060) == 21
    assert training_minutes(spans[:2]) == 20


def test_scoring_leaves_its_own_trainers_cores():
    # chosen at start (2 cores, idle): 2 threads, but while the trainer (started later) runs with
    # --threads 1 the scoring takes 1, and with torch's default (all cores) still 1, never 0
    assert quality.scoring_threads(2, cores=2, trainer_threads=1, training=True) == 1
    assert quality.scoring_threads(2, cores=2, trainer_threads=0, training=True) == 1
    assert quality.scoring_threads(16, cores=16, trainer_threads=4, training=True) == 12
    assert quality.scoring_threads(2, cores=2, trainer_threads=1, training=False) == 2
