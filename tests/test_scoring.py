"""One scoring path: the trainer's validation gives the figures evaluate.py reports for the same checkpoint."""
import json

import numpy as np
import pytest
import torch
from conftest import LIBRI_MINI, need
from test_inference import make_tiny_setup
from test_official_set import ROWS, write_tuples
from test_trainer import make_dataset, make_embedder, train, write_config

from reverse_voicefilter.commands import evaluate, generator
from reverse_voicefilter.core.audio import Audio
from reverse_voicefilter.core.checkpoint import load_checkpoint
from reverse_voicefilter.core.errors import run_cli
from reverse_voicefilter.core.hparams import HParam
from reverse_voicefilter.data.dataloader import build_dataset, create_dataloader
from reverse_voicefilter.evaluation.scoring import nan_median, score_sample
from reverse_voicefilter.model.embedder import load_embedder
from reverse_voicefilter.model.model import VoiceFilter
from reverse_voicefilter.separation.separator import Separator
from reverse_voicefilter.training.steps import make_loss
from reverse_voicefilter.training.validation import Validator

CPU = torch.device("cpu")
# dB: what float rounding moves a median SDR by (evaluate.py folds the batch norms into the convolutions)
ROUNDING = 1e-5

def evaluate_org(config, embedder, checkpoint, test_dir, out):
    """evaluate.py --mask org as the command line runs it; its report.json."""
    argv = ["-c", str(config), "-e", str(embedder), "--checkpoint_path", str(checkpoint), "-d", str(test_dir),
            "-o", str(out), "--mask", "org", "--device", "cpu"]
    try:
        run_cli(evaluate.main, argv)
    except SystemExit as exit_:
        assert exit_.code == 0
    return json.loads((out / "report.json").read_text())["modes"]["org"]

def validate(hp, embedder, checkpoint, test_dir, batch_size):
    """The trainer's Validator on ``test_dir`` with the checkpoint's weights."""
    hp.train.batch_size = batch_size
    test_set = build_dataset(hp, test_dir, load_embedder(str(embedder), hp, CPU), with_wavs=True, progress=False)
    loader = create_dataloader(hp, test_set, False, CPU)
    model = VoiceFilter(hp)
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    return Validator(loader, Audio(hp), make_loss(hp), CPU, "fp32", progress=False)(model)

def test_best_checkpoint_is_chosen_by_the_median_sdr_evaluate_reports(tmp_path):
    """The score the trainer stores in best.pt is evaluate.py's org median SDR of best.pt on the test folder."""
    # 1 s samples: evaluate.py's speaker similarity needs more than the embedder's window (0.79 s)
    config = write_config(tmp_path / "tiny-test.yaml", {"data": {"audio_len": 1.0}})
    _, test_dir = make_dataset(tmp_path, config)
    embedder = make_embedder(tmp_path / "embedder.pt", config)
    assert train(tmp_path, "run", config) == 0
    best = tmp_path / "chkpt" / "run" / "best.pt"
    stored = load_checkpoint(best)["sdr"]
    org = evaluate_org(config, embedder, best, test_dir, tmp_path / "eval")
    assert org["count"] == 4
    assert stored == pytest.approx(org["sdr_after"]["median"], abs=ROUNDING)
    result = validate(HParam(config), embedder, best, test_dir, batch_size=4)
    assert result.sdr == pytest.approx(org["sdr_after"]["median"], abs=ROUNDING)
    assert result.sdr_mean == pytest.approx(org["sdr_after"]["mean"], abs=ROUNDING)
    assert result.input_sdr == pytest.approx(org["sdr_before"]["median"], abs=1e-6)

@pytest.fixture(scope="module")
def official_tiny(tmp_path_factory):
    """An official-format test folder (three lengths: 2.8, 7.3 and 22.8 s) and a tiny random model."""
    libri = need(LIBRI_MINI)
    root = tmp_path_factory.mktemp("scoring")
    hp, config, checkpoint, embedder = make_tiny_setup(root / "model")
    tuples = write_tuples(root / "tuples.csv", ROWS)
    try:
        run_cli(generator.main, ["-c", str(config), "--tuples", str(tuples), "-d", str(libri), "-o",
                                 str(root / "official"), "-p", "1", "--progress", "False"])
    except SystemExit as exit_:
        assert exit_.code == 0
    return {"root": root, "config": config, "checkpoint": checkpoint, "embedder": embedder,
            "test_dir": root / "official" / "test"}

def test_validation_of_utterances_of_any_length_equals_evaluate(official_tiny):
    """Samples of different lengths in one validation batch: the loader pads them, but each is scored at
    its own length, so the figures do not depend on the batch size and equal evaluate.py's."""
    s = official_tiny
    hp = HParam(s["config"])
    batched = validate(hp, s["embedder"], s["checkpoint"], s["test_dir"], batch_size=3)
    single = validate(hp, s["embedder"], s["checkpoint"], s["test_dir"], batch_size=1)
    org = evaluate_org(s["config"], s["embedder"], s["checkpoint"], s["test_dir"], s["root"] / "eval")
    assert batched.count == single.count == org["count"] == 3
    assert batched.sdr == pytest.approx(single.sdr, abs=ROUNDING)
    assert batched.test_loss == pytest.approx(single.test_loss, rel=1e-5)
    assert batched.sdr == pytest.approx(org["sdr_after"]["median"], abs=ROUNDING)
    assert batched.input_sdr == pytest.approx(org["sdr_before"]["median"], abs=1e-6)
    assert batched.example["mixed_wav"].size == batched.example["est_wav"].size  # first sample, unpadded
    assert batched.example["est_mask"].shape == batched.example["target_spec"].shape

def test_trainer_validates_on_the_official_folder(official_tiny, tmp_path):
    """trainer.py with --test_dir on utterances of 2.8 to 22.8 s: validation runs and keeps best.pt by its median."""
    config = write_config(tmp_path / "tiny-test.yaml")
    make_dataset(tmp_path, config, n_test=1)
    make_embedder(tmp_path / "embedder.pt", config)
    assert train(tmp_path, "official", config, "--test_dir", str(official_tiny["test_dir"])) == 0
    (log,) = (tmp_path / "logs" / "official").glob("*.log")
    assert "over 3 samples" in log.read_text()
    assert np.isfinite(load_checkpoint(tmp_path / "chkpt" / "official" / "best.pt")["sdr"])


def test_validation_of_samples_longer_than_a_chunk_equals_evaluate(tmp_path):
    """37 s samples go through the network in chunks (longer than CHUNK_SECONDS + 2 x OVERLAP_SECONDS = 36 s)
    in both, with the same figures."""
    config = write_config(tmp_path / "long.yaml", {"data": {"audio_len": 37.0}})
    make_dataset(tmp_path, config, n_train=0, n_test=2)
    hp, _, checkpoint, _ = make_tiny_setup(tmp_path / "model")
    embedder = make_embedder(tmp_path / "embedder.pt", config)
    hp = HParam(config)
    assert Separator(hp, None, None, CPU).is_long(int(37.0 * hp.audio.sample_rate))
    result = validate(hp, embedder, checkpoint, tmp_path / "test", batch_size=2)
    org = evaluate_org(config, embedder, checkpoint, tmp_path / "test", tmp_path / "eval")
    assert result.count == org["count"] == 2
    assert result.sdr == pytest.approx(org["sdr_after"]["median"], abs=ROUNDING)
    assert np.isfinite(result.test_loss)


def test_validation_does_not_read_the_mixed_spectrograms(tmp_path):
    """The mixed magnitude comes from the mixed wav: test samples whose -mixed.pt is unreadable validate
    to the same figures (and the file is never opened, so it costs no I/O)."""
    config = write_config(tmp_path / "tiny-test.yaml")
    make_dataset(tmp_path, config, n_train=0, n_test=3)
    hp, _, checkpoint, _ = make_tiny_setup(tmp_path / "model")
    embedder = make_embedder(tmp_path / "embedder.pt", config)
    before = validate(HParam(config), embedder, checkpoint, tmp_path / "test", batch_size=2)
    mixed = sorted((tmp_path / "test").glob("*-mixed.pt"))
    assert len(mixed) == 3
    for path in mixed:
        path.write_bytes(b"not a tensor")
    after = validate(HParam(config), embedder, checkpoint, tmp_path / "test", batch_size=2)
    assert after.count == before.count == 3
    assert after.sdr == before.sdr and after.test_loss == before.test_loss

def test_long_input_keeps_the_whole_mask(official_tiny):
    """A chunked input's mask and magnitude cover the whole input, and the magnitude is the whole-file one."""
    hp = HParam(official_tiny["config"])
    model = VoiceFilter(hp).eval()
    separator = Separator(hp, model, None, CPU, chunk_seconds=1.0, overlap_seconds=0.2)
    rng = np.random.default_rng(0)
    wav = (0.1 * rng.standard_normal(16000 * 3 + 77)).astype(np.float32)
    ((_, result),) = separator.separate_stream([(0, wav, torch.zeros(hp.embedder.emb_dim))], ["org"],
                                               keep_mask=True)
    whole, _ = Audio(hp).wav2spec_torch(torch.from_numpy(wav)[None])
    assert result.mag.shape == result.mask.shape == tuple(whole.shape[1:])
    np.testing.assert_allclose(result.mag, whole[0].numpy(), atol=1e-5)
    assert separator.is_long(wav.size)

def test_score_sample_without_before_skips_the_mixture():
    rng = np.random.default_rng(1)
    target = rng.standard_normal(8000)
    mixed = target + 0.5 * rng.standard_normal(8000)
    full = score_sample((mixed, target, {"org": target + 0.1 * rng.standard_normal(8000)}, "target"))["org"]
    quick = score_sample((mixed, target, {"org": target + 0.1 * rng.standard_normal(8000)}, "target"),
                         before=False)["org"]
    assert np.isfinite(full["sdr_before"]) and np.isnan(quick["sdr_before"]) and np.isfinite(quick["sdr_after"])
    assert nan_median([1.0, float("nan"), 3.0]) == 2.0

