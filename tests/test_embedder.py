from collections import defaultdict

import numpy as np
import pytest
import torch
from conftest import tone

from reverse_voicefilter.core.audio import Audio, load_wav
from reverse_voicefilter.core.errors import UserError
from reverse_voicefilter.core.hparams import HParam
from reverse_voicefilter.model.embedder import SpeechEmbedder, load_embedder


def cosine(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_original_embedder_gives_the_original_dvec(parity_dir):
    hp = HParam(parity_dir / "config.yaml")
    embedder = load_embedder(parity_dir / "embedder.pt", hp)
    reference = load_wav(parity_dir / "reference.wav")
    expected = np.load(parity_dir / "dvec.npy")
    assert cosine(embedder.embed(reference).numpy(), expected) >= 0.9999
    # the module alone, on the original's numpy mel
    net = SpeechEmbedder(hp)
    net.load_state_dict(torch.load(parity_dir / "embedder.pt", weights_only=True))
    with torch.no_grad():
        dvec = net(torch.from_numpy(Audio(hp).get_mel(reference))).numpy()
    assert dvec.shape == (256,) and cosine(dvec, expected) >= 0.9999


def test_batched_dvecs_equal_single_ones(tmp_path):
    hp = HParam()
    hp.embedder.lstm_hidden = 32
    path = tmp_path / "emb.pt"
    torch.save(SpeechEmbedder(hp).state_dict(), path)
    embedder = load_embedder(path, hp)
    wavs = [tone(1.5, freq=120), tone(2.3, freq=200, seed=1), tone(1.0, freq=90, seed=2)]
    batch = embedder.embed_many(wavs)
    for i, wav in enumerate(wavs):
        torch.testing.assert_close(batch[i], embedder.embed(wav), atol=1e-5, rtol=1e-5)


def test_resemblyzer_dvecs_separate_real_speakers(libri_mini):
    embedder = load_embedder("resemblyzer", HParam())
    by_speaker = defaultdict(list)
    for path in sorted((libri_mini / "test-other").glob("*/*/*.flac")):
        by_speaker[path.parts[-3]].append(path)
    assert len(by_speaker) == 10
    speakers, wavs = [], []
    for speaker, paths in sorted(by_speaker.items()):
        for path in paths[:4]:
            speakers.append(speaker)
            wavs.append(load_wav(path))
    dvecs = embedder.embed_many(wavs).numpy()
    assert dvecs.shape == (len(wavs), 256)
    sims = dvecs @ dvecs.T
    labels = np.array(speakers)
    for speaker in by_speaker:
        own = labels == speaker
        same = sims[np.ix_(own, own)][~np.eye(own.sum(), dtype=bool)].mean()
        different = sims[np.ix_(own, ~own)].mean()
        assert same > different, speaker


def test_resemblyzer_needs_256_dims():
    hp = HParam()
    hp.embedder.emb_dim = 128
    with pytest.raises(UserError, match="256"):
        load_embedder("resemblyzer", hp)


def test_bad_embedder_files_are_clear_errors(tmp_path):
    hp = HParam()
    with pytest.raises(UserError, match="not found"):
        load_embedder(tmp_path / "nope.pt", hp)
    torch.save({"model": {"a": torch.zeros(1)}, "step": 3}, tmp_path / "dict.pt")
    with pytest.raises(UserError, match="not an embedder state_dict"):
        load_embedder(tmp_path / "dict.pt", hp)
    small = HParam()
    small.embedder.lstm_hidden = 16
    torch.save(SpeechEmbedder(small).state_dict(), tmp_path / "small.pt")
    with pytest.raises(UserError, match="lstm.weight_ih_l0 has shape"):
        load_embedder(tmp_path / "small.pt", hp)
    torch.save({"other.weight": torch.zeros(2)}, tmp_path / "keys.pt")
    with pytest.raises(UserError, match="original embedder's keys"):
        load_embedder(tmp_path / "keys.pt", hp)
    (tmp_path / "junk.pt").write_bytes(b"junk" * 100)
    with pytest.raises(UserError, match="cannot load embedder"):
        load_embedder(tmp_path / "junk.pt", hp)


def test_too_short_reference_is_a_clear_error(parity_dir):
    hp = HParam(parity_dir / "config.yaml")
    embedder = load_embedder(parity_dir / "embedder.pt", hp)
    with pytest.raises(UserError, match="too short"):
        embedder.embed(tone(0.3))
