"""inference.py's start-up: what a run imports and loads, without timing anything."""
import gc
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import ROOT, tone

from reverse_voicefilter.core.checkpoint import load_checkpoint, save_checkpoint
from reverse_voicefilter.core.hparams import HParam
from reverse_voicefilter.model.embedder import SpeechEmbedder
from reverse_voicefilter.model.model import VoiceFilter
from reverse_voicefilter.separation.loading import load_model

# Each costs 0.1-0.4 s of CPU to import and none is needed to separate a file.
NOT_NEEDED = ("numba", "llvmlite", "matplotlib", "tensorboardX", "mir_eval", "scipy.signal", "scipy.stats")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("startup")
    config = root / "tiny.yaml"
    config.write_text((ROOT / "config" / "tiny.yaml").read_text() + "---\nembedder:\n  lstm_hidden: 32\n")
    hp = HParam(config)
    torch.manual_seed(0)
    model = VoiceFilter(hp)
    adam = torch.optim.Adam(model.parameters())
    model(torch.rand(1, 20, 257), torch.randn(1, 256)).mean().backward()
    adam.step()  # a trainer's checkpoint: the optimizer's state is twice the model
    checkpoint = save_checkpoint({"model": model.state_dict(), "optimizer": adam.state_dict(), "step": 1,
                                  "hp_str": hp.hp_str}, root / "chkpt_1.pt")
    embedder = root / "embedder.pt"
    torch.save(SpeechEmbedder(hp).state_dict(), embedder)
    sf.write(root / "mix.wav", tone(1.5, 44100, 200.0, seed=1) + tone(1.5, 44100, 310.0, seed=2), 44100)
    sf.write(root / "ref.wav", tone(2.0, 16000, 200.0, seed=3), 16000)
    return {"root": root, "config": config, "hp": hp, "model": model, "checkpoint": checkpoint,
            "embedder": embedder}


def test_a_whole_run_imports_nothing_it_does_not_use(tiny_run):
    # -X importtime lists every module the run imported, up to its exit; the 44.1 kHz mixture
    # goes through the resampler, the embedder through the mel filterbank
    r = tiny_run
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "inference.py"), "-e", r["embedder"], "--checkpoint_path",
         r["checkpoint"], "-m", r["root"] / "mix.wav", "-r", r["root"] / "ref.wav", "-o", r["root"] / "out"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (r["root"] / "out" / "result.wav").is_file()
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "torch" in imported  # the listing is real
    assert not [m for m in imported if m.startswith(NOT_NEEDED)]


def test_the_loaded_model_holds_the_checkpoints_weights(tiny_run):
    # built on the meta device (no random initialisation) and given the mapped file's tensors
    loaded = load_model(tiny_run["hp"], tiny_run["checkpoint"], torch.device("cpu"))
    reference = VoiceFilter(tiny_run["hp"])
    reference.load_state_dict(tiny_run["model"].state_dict())
    reference.for_inference()
    assert all(not p.is_meta for p in loaded.parameters())
    x, d = torch.rand(2, 30, 257), torch.randn(2, 256)
    with torch.no_grad():
        assert torch.equal(loaded(x, d), reference(x, d))


def test_a_checkpoint_of_half_precision_weights_gives_an_fp32_model(tiny_run, tmp_path):
    state = load_checkpoint(tiny_run["checkpoint"])
    state["model"] = {k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()}
    half = save_checkpoint(state, tmp_path / "half.pt")
    loaded = load_model(tiny_run["hp"], half, torch.device("cpu"))
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    with torch.no_grad():
        assert torch.isfinite(loaded(torch.rand(1, 20, 257), torch.randn(1, 256))).all()


def test_mapped_and_legacy_checkpoints_load_alike(tiny_run, tmp_path):
    state = load_checkpoint(tiny_run["checkpoint"], mmap=True)
    legacy = tmp_path / "legacy.pt"  # the pre-zip format cannot be mapped: it is read
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    again = load_checkpoint(legacy, mmap=True)
    assert state["step"] == again["step"] == 1
    for key, value in tiny_run["model"].state_dict().items():
        assert torch.equal(state["model"][key], value) and torch.equal(again["model"][key], value)


@pytest.mark.parametrize("length, rate", [(44100, 44100), (12345, 22050), (8000, 8000), (48001, 48000), (3, 44100)])
def test_resample_equals_librosa(length, rate):
    import librosa

    from reverse_voicefilter.core.audio import resample

    wav = np.random.default_rng(length).standard_normal(length).astype(np.float32)
    expected = librosa.resample(wav, orig_sr=rate, target_sr=16000)
    got = resample(wav, rate, 16000)
    assert got.dtype == expected.dtype and np.array_equal(got, expected)


def test_bulk_imports_freezes_a_fresh_process_only():
    from reverse_voicefilter.core.startup import bulk_imports

    frozen = gc.get_freeze_count()
    with bulk_imports():  # torch is imported here already: nothing changes
        assert gc.isenabled()
    assert gc.get_freeze_count() == frozen
    code = ("import gc; from reverse_voicefilter.core.startup import bulk_imports\n"
            "with bulk_imports():\n    assert not gc.isenabled()\n    import torch\n"
            "assert gc.isenabled() and gc.get_freeze_count() > 100000")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
