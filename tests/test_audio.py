import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import tone

from reverse_voicefilter.core.audio import Audio, AudioError, load_wav, save_wav
from reverse_voicefilter.core.hparams import HParam


@pytest.fixture(scope="module")
def audio():
    return Audio(HParam())


def snr_db(reference, estimate):
    n = min(len(reference), len(estimate))
    reference, estimate = reference[:n].astype(np.float64), estimate[:n].astype(np.float64)
    return 10 * np.log10(np.sum(reference ** 2) / np.sum((reference - estimate) ** 2))


def test_wav2spec_and_get_mel_match_the_original(parity_dir):
    hp = HParam(parity_dir / "config.yaml")
    audio = Audio(hp)
    mixed = load_wav(parity_dir / "mixed.wav")
    mag, phase = audio.wav2spec(mixed)
    assert mag.shape == (301, 601) and mag.dtype == np.float32
    assert np.abs(mag - np.load(parity_dir / "mixed_mag.npy")).max() < 1e-3
    # phase is only defined where there is energy; compare as unit phasors
    ref_phase = np.load(parity_dir / "mixed_phase.npy")
    assert np.median(np.abs(np.exp(1j * phase) - np.exp(1j * ref_phase))) < 1e-3
    mel = audio.get_mel(load_wav(parity_dir / "reference.wav"))
    ref_mel = np.load(parity_dir / "ref_mel.npy")
    assert mel.shape == ref_mel.shape and np.abs(mel - ref_mel).max() < 1e-3


def test_spec2wav_reproduces_the_original_results(parity_dir):
    audio = Audio(HParam(parity_dir / "config.yaml"))
    phase = np.load(parity_dir / "mixed_phase.npy")
    for mode in ("org", "inv_div", "inv_sub"):
        expected, rate = sf.read(parity_dir / f"result_{mode}.wav", dtype="float32")
        result = audio.spec2wav(np.load(parity_dir / f"est_mag_{mode}.npy"), phase)
        assert rate == 16000 and len(result) == len(expected)
        assert snr_db(expected, result) > 40


def test_three_seconds_give_301_frames_of_601_bins(audio):
    mag, phase = audio.wav2spec(tone(3.0))
    assert mag.shape == phase.shape == (301, 601)
    assert mag.min() >= 0 and mag.max() <= 1


def test_round_trip_quality(audio):
    # the original's normalization clips |STFT| above 10 (0 dB after ref_level_db 20): a quiet
    # tone, like normalized speech, stays below it
    wav = tone(2.0, amp=0.03)
    mag, phase = audio.wav2spec(wav)
    back = audio.spec2wav(mag, phase)
    assert len(back) == 160 * (mag.shape[0] - 1)
    assert snr_db(wav, back) > 35


def test_round_trip_quality_on_real_speech(parity_dir):
    audio = Audio(HParam())
    wav = load_wav(parity_dir / "mixed.wav")
    # At the generator's level (peak 0.91) the original's normalization clips the loudest ~1% of
    # bins; at peak 0.1 nothing clips and the round trip is near perfect.
    loud = audio.spec2wav(*audio.wav2spec(wav))
    quiet = 0.1 * wav / np.abs(wav).max()
    assert snr_db(quiet, audio.spec2wav(*audio.wav2spec(quiet))) > 30
    assert 5 < snr_db(wav, loud) < 30


@pytest.mark.parametrize("batch", [1, 3])
def test_torch_transforms_agree_with_numpy(audio, batch):
    wavs = np.stack([tone(1.0, freq=150 + 50 * i, seed=i) for i in range(batch)])
    mag_t, phase_t = audio.wav2spec_torch(torch.from_numpy(wavs))
    assert mag_t.shape == (batch, 101, 601)
    for i in range(batch):
        mag, phase = audio.wav2spec(wavs[i])
        assert np.abs(mag_t[i].numpy() - mag).max() < 1e-3
        wav_np = audio.spec2wav(mag, phase)
        wav_t = audio.spec2wav_torch(torch.from_numpy(mag)[None], torch.from_numpy(phase)[None])[0].numpy()
        assert snr_db(wav_np, wav_t) > 60
        mel_t = audio.get_mel_torch(torch.from_numpy(wavs[i])).numpy()
        assert np.abs(mel_t - audio.get_mel(wavs[i])).max() < 1e-3


def test_torch_spec2wav_honours_length(audio):
    wav = torch.from_numpy(tone(1.0))
    mag, phase = audio.wav2spec_torch(wav[None])
    assert audio.spec2wav_torch(mag, phase, length=16000).shape == (1, 16000)


def test_loader_resamples_and_downmixes(tmp_path):
    mono = tone(1.0, rate=44100)
    stereo = np.stack([mono, mono], axis=1)
    sf.write(tmp_path / "s.flac", stereo, 44100)
    sf.write(tmp_path / "s.ogg", stereo, 44100)
    for name in ("s.flac", "s.ogg"):
        wav = load_wav(tmp_path / name)
        assert wav.ndim == 1 and wav.dtype == np.float32
        assert abs(len(wav) - 16000) <= 1


def test_loader_keeps_16k_mono_unchanged(tmp_path):
    wav = tone(0.5)
    sf.write(tmp_path / "a.wav", wav, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(load_wav(tmp_path / "a.wav"), wav)


@pytest.mark.parametrize("kind, message", [
    ("missing", "not found"), ("garbage", "cannot read"), ("empty", "empty"), ("silent", "silent"),
    ("folder", "is a folder, not an audio file"),
])
def test_loader_errors_name_the_file(tmp_path, kind, message):
    path = tmp_path / f"{kind}.wav"
    if kind == "folder":
        path.mkdir()
    elif kind == "garbage":
        path.write_bytes(b"not audio at all" * 10)
    elif kind == "empty":
        sf.write(path, np.zeros(0, dtype=np.float32), 16000)
    elif kind == "silent":
        sf.write(path, np.zeros(16000, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match=message) as err:
        load_wav(path)
    assert path.name in str(err.value)


def truncate_wav(path, seconds, rate=16000):
    """Cut a written WAV's data after ``seconds``, its header left promising the whole (an interrupted copy)."""
    data = path.read_bytes()
    bytes_per_frame = sf.info(path).channels * 4 if sf.info(path).subtype == "FLOAT" else 2
    header = data.index(b"data") + 8
    path.write_bytes(data[:header + int(seconds * rate) * bytes_per_frame])


@pytest.mark.parametrize("subtype", ["FLOAT", "PCM_16"])
def test_a_truncated_wav_is_read_with_a_warning_giving_both_lengths(tmp_path, caplog, subtype):
    path = tmp_path / "cut.wav"
    sf.write(path, tone(3.0), 16000, subtype=subtype)
    truncate_wav(path, 1.0)
    with caplog.at_level("WARNING"):
        wav = load_wav(path)
    assert wav.size == 16000
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert str(path) in line and "truncated" in line and "3.00 s" in line and "1.00 s" in line


def test_whole_and_streamed_wavs_read_without_a_warning(tmp_path, caplog):
    whole, streamed = tmp_path / "whole.wav", tmp_path / "streamed.wav"
    sf.write(whole, tone(1.0), 16000, subtype="PCM_16")
    data = bytearray(whole.read_bytes())
    at = data.index(b"data") + 4
    data[at:at + 4] = (0xFFFFFFFF).to_bytes(4, "little")  # what a writer to a pipe puts there: length unknown
    streamed.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        assert load_wav(whole).size == load_wav(streamed).size == 16000
    assert not caplog.records


@pytest.mark.skipif(os.name != "posix", reason="names that are not valid UTF-8 exist on POSIX file systems")
def test_a_name_that_is_not_utf8_is_written_and_read(tmp_path):
    folder = Path(os.fsdecode(os.fsencode(tmp_path) + b"/out_\xffdir"))  # a Latin-1 byte: a surrogate in Python
    save_wav(folder / "r.wav", tone(0.5))
    np.testing.assert_array_equal(load_wav(folder / "r.wav"), tone(0.5))
    assert os.listdir(os.fsencode(folder)) == [b"r.wav"]


def test_save_wav_is_atomic_and_float(tmp_path):
    path = tmp_path / "out" / "r.wav"
    save_wav(path, tone(0.5))
    info = sf.info(path)
    assert info.subtype == "FLOAT" and info.samplerate == 16000
    assert [p.name for p in path.parent.iterdir()] == ["r.wav"]
    np.testing.assert_array_equal(sf.read(path, dtype="float32")[0], tone(0.5).astype(np.float32))


def test_float_wav_bytes_depend_only_on_the_audio(tmp_path):
    """No PEAK chunk with the time of writing: a rerun gives byte-identical files."""
    import time

    save_wav(tmp_path / "a.wav", tone(0.5))
    time.sleep(1.1)  # the chunk's timestamp counts seconds
    save_wav(tmp_path / "b.wav", tone(0.5))
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()
    assert b"PEAK" not in (tmp_path / "a.wav").read_bytes()


def test_written_files_get_the_usual_permissions(tmp_path):
    """Temporary files are private; the renamed result must be as readable as open() makes it."""
    import os
    import stat

    from reverse_voicefilter.core.plotting import save_before_after

    old = os.umask(0o022)
    try:
        save_wav(tmp_path / "r.wav", tone(0.5))
        save_before_after(tmp_path / "h.png", {"org": ("a", np.arange(10.0), np.arange(10.0) + 1)})
    finally:
        os.umask(old)
    for name in ("r.wav", "h.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.png", "r.wav"]


@pytest.mark.parametrize("rate,n_fft,n_mels", [(16000, 512, 40), (16000, 1200, 40), (16000, 400, 40), (8000, 256, 20)])
def test_mel_basis_equals_librosa(rate, n_fft, n_mels):
    import librosa

    from reverse_voicefilter.core.audio import mel_basis

    expected = librosa.filters.mel(sr=rate, n_fft=n_fft, n_mels=n_mels).astype(np.float32)
    got = mel_basis(rate, n_fft, n_mels)
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)


def test_torch_magnitude_alone_equals_the_pairs_magnitude(audio):
    wavs = torch.from_numpy(np.stack([tone(1.0, seed=1), tone(1.0, freq=330.0, seed=2)]))
    mag, _ = audio.wav2spec_torch(wavs)
    assert torch.equal(audio.wav2spec_torch(wavs, phase=False), mag)
