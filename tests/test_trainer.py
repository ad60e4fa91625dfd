"""trainer.py end to end on a tiny synthetic dataset, on the CPU.

The dataset is written here directly in the generator's layout (harmonic
"speakers", their spectrograms, -dvec.txt pointing at a reference wav), so
these tests do not depend on generator.py. The speaker embedder is a tiny
original-format ``embedder.pt`` with random weights (lstm_hidden 16).
"""
import logging
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import PARITY, ROOT, disk_full_at_flush, need

from reverse_voicefilter.commands.trainer import main as trainer_main
from reverse_voicefilter.core.audio import Audio, save_wav
from reverse_voicefilter.core.checkpoint import compact_checkpoint, load_checkpoint, save_checkpoint
from reverse_voicefilter.core.errors import TrainingDiverged, UserError, run_cli
from reverse_voicefilter.core.hparams import HParam
from reverse_voicefilter.core.signals import StopSignals
from reverse_voicefilter.data.dataloader import ResumableSampler, build_dataset
from reverse_voicefilter.data.dvec_cache import cache_path
from reverse_voicefilter.model.embedder import SpeechEmbedder, load_embedder
from reverse_voicefilter.training.steps import make_loss
from reverse_voicefilter.training.train import run_training

RATE = 16000
N_TRAIN, N_TEST = 16, 4
SPEAKER_F0 = [95.0, 130.0, 175.0, 230.0, 290.0]

# tiny.yaml, smaller still: 0.5 s clips, batches of 4, a 16-unit embedder, every step summarized
TEST_OVERRIDES = {
    "data": {"audio_len": 0.5},
    "train": {"batch_size": 4, "summary_interval": 1, "checkpoint_interval": 1000, "max_steps": 6},
    "embedder": {"lstm_hidden": 16},
}


def _merge(base, over):
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def write_config(path, overrides=None, base=ROOT / "config" / "tiny.yaml"):
    """tiny.yaml (or ``base``) + TEST_OVERRIDES + ``overrides``, as one YAML file."""
    cfg = {}
    for doc in yaml.safe_load_all(Path(base).read_text()):
        cfg.update(doc or {})
    if Path(base).name == "tiny.yaml":
        cfg = _merge(cfg, TEST_OVERRIDES)
    cfg = _merge(cfg, overrides or {})
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return Path(path)


def speaker_wav(speaker, seconds, seed):
    """A voice-like harmonic signal: the speaker's pitch with vibrato, syllable-rate bursts."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    f0 = SPEAKER_F0[speaker] * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(3, 6) * t + rng.uniform(0, 6)))
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    tilt = 0.6 + 0.1 * speaker
    wav = sum(np.sin(k * phase) / k ** tilt for k in range(1, 12) if k * SPEAKER_F0[speaker] < RATE / 2.5)
    envelope = np.clip(np.sin(2 * np.pi * rng.uniform(2.5, 4.5) * t + rng.uniform(0, 6)), 0.05, None)
    wav = wav * envelope + 0.005 * rng.standard_normal(n)
    return (0.3 * wav / np.max(np.abs(wav))).astype(np.float32)


def write_split(split_dir, count, hp, references, seed, float16=False):
    """``count`` samples in the generator's layout (target = speaker 1, its reference in dvec.txt)."""
    audio = Audio(hp)
    split_dir.mkdir(parents=True, exist_ok=True)
    n_speakers = len(references)
    for i in range(count):
        s1 = i % n_speakers
        s2 = (s1 + 1 + i // n_speakers) % n_speakers
        if s2 == s1:
            s2 = (s1 + 1) % n_speakers
        target = speaker_wav(s1, hp.data.audio_len, seed + 2 * i)
        interference = speaker_wav(s2, hp.data.audio_len, seed + 2 * i + 1)
        mixed = target + interference
        scale = 1.0 / (1.1 * np.max(np.abs(mixed)))
        target, mixed = target * scale, mixed * scale
        sid = f"{i:06d}"
        save_wav(split_dir / f"{sid}-target.wav", target, RATE)
        save_wav(split_dir / f"{sid}-mixed.wav", mixed, RATE)
        dtype = torch.float16 if float16 and i % 2 else torch.float32
        torch.save(torch.from_numpy(audio.wav2spec(target)[0]).to(dtype), split_dir / f"{sid}-target.pt")
        torch.save(torch.from_numpy(audio.wav2spec(mixed)[0]).to(dtype), split_dir / f"{sid}-mixed.pt")
        (split_dir / f"{sid}-dvec.txt").write_text(str(references[s1]) + "\n")


def make_dataset(root, config, n_train=N_TRAIN, n_test=N_TEST):
    """``root/refs/*.wav``, ``root/train``, ``root/test`` for the given config file."""
    hp = HParam(config)
    refs = []
    for spk in range(len(SPEAKER_F0)):
        path = root / "refs" / f"speaker{spk}.wav"
        save_wav(path, speaker_wav(spk, 1.5, 1000 + spk), RATE)
        refs.append(path.resolve())
    write_split(root / "train", n_train, hp, refs, seed=0, float16=True)
    write_split(root / "test", n_test, hp, refs, seed=500)
    return root / "train", root / "test"


def make_embedder(path, config):
    """An original-format embedder.pt (bare state_dict) with random weights."""
    torch.manual_seed(0)
    torch.save(SpeechEmbedder(HParam(config)).state_dict(), path)
    return path


def train(root, name, config, *extra, embedder=None):
    """trainer.py's main in this process; returns its exit code."""
    argv = ["-c", str(config), "-e", str(embedder or root / "embedder.pt"), "-m", name, "-b", str(root),
            "--train_dir", str(root / "train"), "--test_dir", str(root / "test"), "--device", "cpu", *extra]
    return trainer_main(argv)


def read_events(logdir):
    """``{tag: [(step, value or None)]}`` from the TFRecord event files of a TensorBoard log folder."""
    from tensorboardX.proto import event_pb2
    tags = {}
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12:pos + 12 + length])  # skip length + its crc
            pos += 12 + length + 4  # record + its crc
            for value in event.summary.value:
                scalar = value.simple_value if value.WhichOneof("value") == "simple_value" else None
                tags.setdefault(value.tag, []).append((event.step, scalar))
    return tags


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    config = write_config(root / "tiny-test.yaml")
    make_dataset(root, config)
    make_embedder(root / "embedder.pt", config)
    return root


@pytest.fixture(scope="module")
def learning_run(data):
    """40 steps on 16 samples (10 epochs), validated at 20 and 40."""
    config = write_config(data / "learn.yaml", {"train": {"max_steps": 40, "checkpoint_interval": 20}})
    assert train(data, "learn", config) == 0
    return data


def _weights(path):
    return load_checkpoint(path)["model"]


# ---- the training run ---------------------------------------------------------------------------
def test_loss_falls(learning_run):
    losses = [v for _, v in sorted(read_events(learning_run / "logs" / "learn")["train_loss"])]
    assert len(losses) == 40
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    assert last < 0.7 * first, (first, last)


def test_run_outputs(learning_run):
    chkpt = learning_run / "chkpt" / "learn"
    assert {p.name for p in chkpt.iterdir()} == {"chkpt_20.pt", "chkpt_40.pt", "best.pt", "config.yaml"}
    state = load_checkpoint(chkpt / "chkpt_40.pt")
    assert state["step"] == 40 and state["epoch"] == 10 and state["batch_in_epoch"] == 0
    assert {"model", "optimizer", "hp_str", "rng", "scaler", "best_sdr", "embedder"} <= set(state)
    assert HParam.from_string((chkpt / "config.yaml").read_text()).train.max_steps == 40
    best = load_checkpoint(chkpt / "best.pt")
    assert best["sdr"] == state["best_sdr"] and best["step"] in (20, 40)
    logs = list((learning_run / "logs" / "learn").glob("learn-*.log"))
    assert len(logs) == 1 and "validation at step 40" in logs[0].read_text()
    # the d-vectors were cached per split, keyed by the embedder
    cached = sorted(p.name for p in (learning_run / "train").glob("dvec-cache-*.pt"))
    assert len(cached) == 1 and cached[0].startswith("dvec-cache-ge2e-")


def test_tensorboard_tags(learning_run):
    tags = read_events(learning_run / "logs" / "learn")
    expected = {"train_loss", "test_loss", "SDR", "step_time", "learning_rate", "mixed_wav", "target_wav",
                "estimated_wav", "data/mixed_spectrogram", "data/target_spectrogram",
                "result/estimated_spectrogram", "result/estimated_mask", "result/estimation_error_sq"}
    assert expected <= set(tags)
    assert [s for s, _ in tags["SDR"]] == [20, 40]
    assert all(np.isfinite(v) for _, v in tags["SDR"] + tags["test_loss"])


def test_resume_is_exact(data):
    config = write_config(data / "resume.yaml", {"train": {"max_steps": 6, "checkpoint_interval": 3}})
    assert train(data, "straight", config) == 0
    chkpt = data / "chkpt"
    assert train(data, "resumed", config, "--checkpoint_path", str(chkpt / "straight" / "chkpt_3.pt")) == 0
    straight, resumed = load_checkpoint(chkpt / "straight" / "chkpt_6.pt"), load_checkpoint(
        chkpt / "resumed" / "chkpt_6.pt")
    assert not (chkpt / "resumed" / "chkpt_3.pt").exists()
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # step 3 is mid-epoch (4 batches per epoch): the position was restored, not guessed
    assert load_checkpoint(chkpt / "straight" / "chkpt_3.pt")["batch_in_epoch"] == 3


def test_compact_checkpoint_halves_the_file_and_resumes_close(data):
    config = write_config(data / "compact.yaml", {"train": {"max_steps": 6, "checkpoint_interval": 3}})
    assert train(data, "full", config) == 0
    full = data / "chkpt" / "full" / "chkpt_3.pt"
    small = compact_checkpoint(full, data / "compact-3.pt")
    assert small.stat().st_size < 0.6 * full.stat().st_size
    before, after = load_checkpoint(full), load_checkpoint(small)
    assert after["model"]["fc2.weight"].dtype == torch.float16
    assert after["model"]["conv.2.num_batches_tracked"].dtype == torch.int64
    moments = next(iter(after["optimizer"]["state"].values()))
    assert moments["exp_avg_sq"].dtype == torch.bfloat16
    assert torch.equal(moments["step"], next(iter(before["optimizer"]["state"].values()))["step"])
    assert after["step"] == 3 and after["batch_in_epoch"] == before["batch_in_epoch"]
    assert torch.equal(after["rng"]["torch"], before["rng"]["torch"])
    for key, value in before["model"].items():  # float16 rounding: a relative 5e-4 at most
        assert torch.allclose(after["model"][key].float(), value.float(), rtol=1e-3, atol=1e-6), key
    # resuming from the compact file continues the run, close to resuming from the full one
    assert train(data, "from-small", config, "--checkpoint_path", str(small)) == 0
    ref, got = _weights(data / "chkpt" / "full" / "chkpt_6.pt"), _weights(data / "chkpt" / "from-small" / "chkpt_6.pt")
    assert got["fc2.weight"].dtype == torch.float32
    for key, value in ref.items():
        if value.is_floating_point():
            assert (got[key] - value).abs().max() < 0.01, key


def test_bf16_training_on_a_cpu_that_cannot_run_it_is_fp32(data, monkeypatch, caplog):
    from reverse_voicefilter.core.precision import BF16_ENV

    monkeypatch.setenv(BF16_ENV, "none")
    config = write_config(data / "bf16-none.yaml", {"train": {"max_steps": 1, "precision": "bf16"}})
    caplog.set_level(logging.INFO)
    assert train(data, "bf16-none", config) == 0
    assert "train.precision bf16: this CPU cannot run bfloat16 convolutions" in caplog.text
    assert "precision fp32" in caplog.text


def test_bf16_on_cpu(data):
    config = write_config(data / "bf16.yaml", {"train": {"max_steps": 1, "precision": "bf16"}})
    assert train(data, "bf16", config) == 0
    weights = _weights(data / "chkpt" / "bf16" / "chkpt_1.pt")
    assert all(v.dtype in (torch.float32, torch.int64) for v in weights.values())  # weights stay fp32
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_keep_freed_memory_is_asked_for_only_by_the_config(data, monkeypatch, caplog):
    import reverse_voicefilter.core.allocator

    calls = []  # the real switch would change this test process's allocator for the rest of the suite
    monkeypatch.setattr(reverse_voicefilter.core.allocator, "reuse_freed_memory", lambda: calls.append(1) or True)
    assert train(data, "glibc", write_config(data / "glibc.yaml", {"train": {"max_steps": 1}})) == 0
    assert calls == []  # the default: glibc's own allocation, half the peak memory at batch 8
    caplog.set_level(logging.INFO)
    config = write_config(data / "keep.yaml", {"train": {"max_steps": 1, "keep_freed_memory": True}})
    assert train(data, "keep", config) == 0
    assert calls == [1] and "freed memory kept for reuse (train.keep_freed_memory): True" in caplog.text


def test_power_law_loss_and_adabound(data):
    config = write_config(data / "pl.yaml", {"train": {"max_steps": 2, "loss": "power_law",
                                                        "optimizer": "adabound"}})
    assert train(data, "powerlaw", config) == 0
    hp = HParam(config)
    loss = make_loss(hp)
    est = torch.zeros(2, 3, requires_grad=True)
    loss(est, torch.rand(2, 3)).mean().backward()
    assert torch.isfinite(est.grad).all()  # 0^p has no finite slope: the clamp keeps it finite


def test_config_change_warns_and_wrong_shape_fails(data, caplog):
    base = write_config(data / "cc.yaml", {"train": {"max_steps": 1}})
    assert train(data, "cc", base) == 0
    ckpt = str(data / "chkpt" / "cc" / "chkpt_1.pt")
    changed = write_config(data / "cc2.yaml", {"train": {"max_steps": 2, "adam": 0.0005}})
    with caplog.at_level("WARNING"):
        assert train(data, "cc2", changed, "--checkpoint_path", ckpt) == 0
    assert "train.adam: 0.001 -> 0.0005" in caplog.text
    caplog.clear()
    moved = data / "moved"
    if not moved.exists():
        shutil.copytree(data / "train", moved)
    with caplog.at_level("WARNING"):  # another data folder and a longer run: nothing to warn about
        assert train(data, "cc4", base, "--checkpoint_path", ckpt, "--train_dir", str(moved), "--max_steps", "2") == 0
    assert "different from checkpoint" not in caplog.text
    wrong = write_config(data / "cc3.yaml", {"model": {"lstm_dim": 32}, "train": {"max_steps": 2}})
    with pytest.raises(UserError, match="does not fit the config"):
        train(data, "cc3", wrong, "--checkpoint_path", ckpt)


# ---- data pieces ----------------------------------------------------------------------------------
def test_dvec_cache_computed_once(data, monkeypatch):
    hp = HParam(write_config(data / "cache.yaml"))
    embedder = load_embedder(data / "embedder.pt", hp)
    split = data / "cache-split"
    write_split(split, 3, hp, sorted((data / "refs").glob("*.wav")), seed=7)
    calls = []
    original = embedder.embed_many
    monkeypatch.setattr(embedder, "embed_many", lambda wavs: calls.append(len(wavs)) or original(wavs))
    first = build_dataset(hp, split, embedder)
    assert calls == [3] and cache_path(split, embedder.name).is_file()
    second = build_dataset(hp, split, embedder)
    assert calls == [3] and torch.equal(first.dvecs, second.dvecs)  # read back, not recomputed
    write_split(split, 5, hp, sorted((data / "refs").glob("*.wav")), seed=7)  # two more references
    build_dataset(hp, split, embedder)
    assert calls == [3, 2]
    dvec, target_mag, mixed_mag = first[1]
    assert dvec.shape == (256,) and target_mag.dtype == mixed_mag.dtype == torch.float32


def test_sampler_order_depends_on_seed_and_epoch_only():
    data = list(range(10))
    sampler = ResumableSampler(data, batch_size=3, seed=5)
    sampler.set_position(2)
    full = list(sampler)
    sampler.set_position(2, start_batch=1)
    assert list(sampler) == full[3:] and len(sampler) == 7
    assert sampler.batches_per_epoch == 3
    other = ResumableSampler(data, batch_size=3, seed=5)
    other.set_position(3)
    assert list(other) != full


# ---- failures -------------------------------------------------------------------------------------
def test_missing_or_empty_dirs_fail_clearly(data, tmp_path):
    config = write_config(tmp_path / "c.yaml")
    with pytest.raises(UserError, match="folder not found"):
        trainer_main(["-c", str(config), "-e", str(data / "embedder.pt"), "-m", "x", "-b", str(tmp_path),
                      "--train_dir", str(tmp_path / "nope"), "--test_dir", str(data / "test"), "--device", "cpu"])
    with pytest.raises(UserError, match="data.train_dir is empty"):
        trainer_main(["-c", str(config), "-e", str(data / "embedder.pt"), "-m", "x", "-b", str(tmp_path),
                      "--device", "cpu"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no samples found"):
        trainer_main(["-c", str(config), "-e", str(data / "embedder.pt"), "-m", "x", "-b", str(tmp_path),
                      "--train_dir", str(tmp_path / "empty"), "--test_dir", str(data / "test"), "--device", "cpu"])


def test_missing_embedder_checkpoint_and_fp16_on_cpu_fail_clearly(data):
    config = write_config(data / "fail.yaml")
    with pytest.raises(UserError, match="embedder file not found"):
        train(data, "fail", config, embedder=data / "missing.pt")
    with pytest.raises(UserError, match="checkpoint not found"):
        train(data, "fail", config, "--checkpoint_path", str(data / "chkpt_missing.pt"))
    fp16 = write_config(data / "fp16.yaml", {"train": {"precision": "fp16"}})
    with pytest.raises(UserError, match="fp16 needs a CUDA"):
        train(data, "fail", fp16)


def test_nan_loss_stops_with_exit_1(data, tmp_path, capsys):
    bad = tmp_path / "bad"
    for split in ("train", "test"):
        (bad / split).mkdir(parents=True)
        for f in (data / split).iterdir():
            if not f.name.startswith("dvec-cache"):
                (bad / split / f.name).symlink_to(f)
    for f in (bad / "train").glob("*-mixed.pt"):
        f.unlink()
        torch.save(torch.full((51, 257), float("nan")), f)
    (bad / "embedder.pt").symlink_to(data / "embedder.pt")
    with pytest.raises(SystemExit) as exit_status:  # as trainer.py runs main: run_cli reports the error
        run_cli(lambda argv: train(bad, "nan", write_config(tmp_path / "c.yaml")))
    assert exit_status.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: loss exploded to nan at step 1")
    assert not (bad / "chkpt" / "nan" / "chkpt_1.pt").exists()
    with pytest.raises(TrainingDiverged):
        run_training(HParam(write_config(tmp_path / "c2.yaml", {"data": {"train_dir": str(bad / "train"),
                                                                         "test_dir": str(bad / "test")}})),
                     "nan2", base_dir=tmp_path, embedder=str(data / "embedder.pt"), device="cpu", progress=False)


def test_stop_signals():
    """SIGTERM/SIGINT set a flag (the loop checkpoints and exits); a second Ctrl-C aborts."""
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # repeated (torchrun forwarding): ignored
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


def test_cli_user_error_is_one_line(data):
    config = write_config(data / "cli.yaml")
    proc = subprocess.run([sys.executable, str(ROOT / "trainer.py"), "-c", str(config), "-m", "x",
                           "-e", str(data / "nope.pt"), "-b", str(data / "cli"), "--train_dir", str(data / "train"),
                           "--test_dir", str(data / "test"), "--device", "cpu"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: embedder file not found")
    assert "Traceback" not in proc.stderr


# ---- signals, originals, DDP ---------------------------------------------------------------------
@pytest.mark.slow
def test_sigint_writes_checkpoint(data):
    config = write_config(data / "sig.yaml", {"train": {"max_steps": 0}})
    cmd = [sys.executable, str(ROOT / "trainer.py"), "-c", str(config), "-e", str(data / "embedder.pt"),
           "-m", "sig", "-b", str(data), "--train_dir", str(data / "train"), "--test_dir", str(data / "test"),
           "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log_dir = data / "logs" / "sig"
    deadline = time.time() + 90
    while time.time() < deadline:
        logs = list(log_dir.glob("sig-*.log"))
        if logs and "step 3:" in logs[0].read_text():
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("training did not reach step 3")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    saved = sorted((data / "chkpt" / "sig").glob("chkpt_*.pt"))
    assert len(saved) == 1 and "checkpoint saved to" in err and str(saved[0]) in err
    state = load_checkpoint(saved[0])
    assert state["step"] >= 3 and state["rng"]


@pytest.mark.slow
def test_original_checkpoint_resumes(tmp_path, caplog):
    parity = need(PARITY)
    config = write_config(tmp_path / "orig.yaml", {"data": {"audio_len": 0.5},
                                                   "train": {"batch_size": 2, "max_steps": 4}},
                          base=parity / "config.yaml")
    make_dataset(tmp_path, config, n_train=2, n_test=1)
    with caplog.at_level("WARNING"):
        code = train(tmp_path, "orig", config, "--checkpoint_path", str(parity / "chkpt.pt"),
                     embedder=parity / "embedder.pt")
    assert code == 0
    assert "not exactly as an uninterrupted run" in caplog.text
    state = load_checkpoint(tmp_path / "chkpt" / "orig" / "chkpt_4.pt")
    assert state["step"] == 4
    original = torch.load(parity / "chkpt.pt", weights_only=True)["model"]
    assert not torch.equal(state["model"]["fc2.weight"], original["fc2.weight"])  # it trained on


@pytest.mark.slow
def test_ddp_two_processes_gloo(data, tmp_path):
    config = write_config(tmp_path / "ddp.yaml", {"train": {"max_steps": 3, "batch_size": 4}})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "trainer.py"), "-c", str(config), "-e", str(data / "embedder.pt"), "-m", "ddp",
           "-b", str(tmp_path), "--train_dir", str(data / "train"), "--test_dir", str(data / "test"),
           "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_checkpoint(tmp_path / "chkpt" / "ddp" / "chkpt_3.pt")
    assert state["step"] == 3 and state["world_size"] == 2
    assert not any(k.startswith("module.") for k in state["model"])
    assert "SDR" in read_events(tmp_path / "logs" / "ddp")


def test_checkpoint_state_loads_weights_only(tmp_path):
    """The RNG states stored for exact resume survive ``torch.load(weights_only=True)``."""
    from reverse_voicefilter.training.state import rng_state, set_rng_state
    save_checkpoint({"model": {}, "rng": rng_state()}, tmp_path / "c.pt")
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    expected = (random.random(), np.random.random(), torch.rand(3))
    set_rng_state(state["rng"])
    again = (random.random(), np.random.random(), torch.rand(3))
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])


def test_bf16_and_channels_last_steps_stay_close_to_fp32():
    """The fast paths change results only within a stated tolerance: from the same weights and
    batch, a bf16 or channels_last training step gives the fp32 loss within 2 % and masks
    within 0.02 after the step."""
    import copy

    from reverse_voicefilter.core.hparams import HParam
    from reverse_voicefilter.model.model import VoiceFilter
    from reverse_voicefilter.training.steps import make_loss, train_step

    hp = HParam(str(ROOT / "config" / "tiny.yaml"))
    torch.manual_seed(0)
    base = VoiceFilter(hp)
    gen = torch.Generator().manual_seed(1)
    batch = (torch.nn.functional.normalize(torch.randn(2, 256, generator=gen), dim=1),
             torch.rand(2, 40, hp.audio.num_freq, generator=gen), torch.rand(2, 40, hp.audio.num_freq, generator=gen))
    results = {}
    for name, precision, channels_last in (("fp32", "fp32", False), ("bf16", "bf16", False),
                                           ("channels_last", "fp32", True), ("bf16-cl", "bf16", True)):
        model = copy.deepcopy(base)
        if channels_last:  # as VoiceFilter does for train.channels_last: the weights decide the layout
            model.channels_last = True
            model.conv.to(memory_format=torch.channels_last)
            assert model.conv[5].weight.is_contiguous(memory_format=torch.channels_last)  # cnn2, 8 inputs
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        loss = train_step(model, batch, optimizer, scaler, make_loss(hp), torch.device("cpu"), precision).item()
        model.eval()
        with torch.no_grad():
            results[name] = (loss, model(batch[2], batch[0]))
    loss32, mask32 = results["fp32"]
    for name in ("bf16", "channels_last", "bf16-cl"):
        loss, mask = results[name]
        assert abs(loss - loss32) <= 0.02 * loss32, name
        assert (mask - mask32).abs().max() < 0.02, name


# ---- starting a run: folders, earlier runs, fine-tuning, threads ----------------------------------
CHECKPOINT_KEYS = {"model", "optimizer", "step", "hp_str",  # the original's
                   "epoch", "batch_in_epoch", "world_size", "rng", "scaler", "best_sdr", "embedder"}


def cli(*argv):
    """trainer.py's main as the script runs it (through run_cli); returns the exit status."""
    with pytest.raises(SystemExit) as exit_status:
        run_cli(lambda _: trainer_main([str(a) for a in argv]))
    return exit_status.value.code


def tensorboard_steps(logdir, tag):
    """The steps TensorBoard shows for ``tag`` (it hides what a later run's purge_step covers)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    return [event.step for event in EventAccumulator(str(logdir)).Reload().Scalars(tag)]


def _parameters_only(weights):
    return {k: v for k, v in weights.items() if "running_" not in k and "num_batches" not in k}


def test_checkpoint_keys_stay_those_of_earlier_versions(learning_run):
    """Checkpoints of earlier versions resume because the file keeps exactly these keys."""
    assert set(load_checkpoint(learning_run / "chkpt" / "learn" / "chkpt_40.pt")) == CHECKPOINT_KEYS


def test_unwritable_base_dir_is_one_line_before_any_compute(data, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    config = write_config(tmp_path / "c.yaml")
    proc = subprocess.run([sys.executable, str(ROOT / "trainer.py"), "-c", str(config), "-m", "x",
                           "-e", str(data / "embedder.pt"), "-b", str(blocker / "out"), "--train_dir",
                           str(data / "train"), "--test_dir", str(data / "test"), "--device", "cpu"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write to -b folder"), lines
    assert str(blocker) in lines[0]


def test_new_run_over_an_earlier_one_is_refused_and_overwrite_starts_over(data, capsys):
    config = write_config(data / "again.yaml", {"train": {"max_steps": 4, "checkpoint_interval": 2}})
    assert train(data, "again", config) == 0
    folder = data / "chkpt" / "again"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    capsys.readouterr()
    assert cli("-c", config, "-e", data / "embedder.pt", "-m", "again", "-b", data, "--train_dir", data / "train",
               "--test_dir", data / "test", "--device", "cpu") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert f"--checkpoint_path {folder / 'chkpt_4.pt'}" in err[0] and "--overwrite" in err[0]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # best.pt, config.yaml untouched
    # --overwrite: a new run, alone in the folder and in TensorBoard
    shorter = write_config(data / "again2.yaml", {"train": {"max_steps": 2, "checkpoint_interval": 2}})
    assert train(data, "again", shorter, "--overwrite") == 0
    assert {p.name for p in folder.iterdir()} == {"chkpt_2.pt", "best.pt", "config.yaml"}
    assert HParam.from_string((folder / "config.yaml").read_text()).train.max_steps == 2
    assert tensorboard_steps(data / "logs" / "again", "train_loss") == [1, 2]
    assert tensorboard_steps(data / "logs" / "again", "SDR") == [2]
    # starting over from a checkpoint of the folder itself: that file is kept
    one = write_config(data / "again3.yaml", {"train": {"max_steps": 1}})
    assert train(data, "again", one, "--overwrite", "--init_from", str(folder / "chkpt_2.pt")) == 0
    assert {p.name for p in folder.iterdir()} == {"chkpt_1.pt", "chkpt_2.pt", "best.pt", "config.yaml"}
    assert load_checkpoint(folder / "best.pt")["step"] == 1


def test_resume_from_an_earlier_checkpoint_shows_each_step_once_in_tensorboard(data):
    config = write_config(data / "tb.yaml", {"train": {"max_steps": 4, "checkpoint_interval": 2}})
    assert train(data, "tb", config) == 0
    assert train(data, "tb", config, "--checkpoint_path", str(data / "chkpt" / "tb" / "chkpt_2.pt")) == 0
    assert tensorboard_steps(data / "logs" / "tb", "train_loss") == [1, 2, 3, 4]
    assert tensorboard_steps(data / "logs" / "tb", "SDR") == [2, 4]
    assert len(read_events(data / "logs" / "tb")["train_loss"]) == 6  # both runs' events are in the files


def test_stale_temporaries_are_removed_at_start(data):
    config = write_config(data / "stale.yaml", {"train": {"max_steps": 2, "checkpoint_interval": 2}})
    assert train(data, "stale", config) == 0
    folder = data / "chkpt" / "stale"
    left = [".chkpt_3.pt.k2j_x9ab.tmp.pt", "chkpt_3.pt.tmp", "config.yaml.tmp", ".best.pt.ab12cd34.tmp.pt"]
    for name in left:
        (folder / name).write_bytes(b"half a checkpoint")
    (folder / "notes.txt").write_text("mine")
    longer = write_config(data / "stale2.yaml", {"train": {"max_steps": 3, "checkpoint_interval": 2}})
    assert train(data, "stale", longer, "--checkpoint_path", str(folder / "chkpt_2.pt")) == 0
    assert not any((folder / name).exists() for name in left)
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "chkpt_3.pt").is_file()


def test_init_from_takes_the_weights_only(learning_run, caplog):
    source = learning_run / "chkpt" / "learn" / "chkpt_40.pt"
    # a learning rate of 1e-12: after one step the weights are still those of the source
    config = write_config(learning_run / "ft.yaml", {"train": {"max_steps": 1, "adam": 1e-12}})
    with caplog.at_level("INFO"):
        assert train(learning_run, "ft", config, "--init_from", str(source)) == 0
    assert "Fine-tuning from the weights of" in caplog.text
    folder = learning_run / "chkpt" / "ft"
    state, origin = load_checkpoint(folder / "chkpt_1.pt"), load_checkpoint(source)
    assert state["step"] == 1 and state["epoch"] == 0 and state["batch_in_epoch"] == 1
    for key, value in _parameters_only(origin["model"]).items():
        assert torch.allclose(state["model"][key], value, atol=1e-8), key
    moments = next(iter(state["optimizer"]["state"].values()))
    assert int(moments["step"]) == 1  # a new optimizer, not the source's 40 steps
    best = load_checkpoint(folder / "best.pt")  # the first validation of a new run is its best
    assert best["step"] == 1 and state["best_sdr"] == best["sdr"]


def test_init_from_and_checkpoint_path_together_fail(learning_run, capsys):
    source = str(learning_run / "chkpt" / "learn" / "chkpt_40.pt")
    config = write_config(learning_run / "both.yaml")
    with pytest.raises(SystemExit) as exit_status:
        train(learning_run, "both", config, "--init_from", source, "--checkpoint_path", source)
    assert exit_status.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(UserError, match="pass one of them"):
        run_training(HParam(config), "both", base_dir=learning_run, checkpoint_path=source, init_from=source)
    with pytest.raises(UserError, match="checkpoint not found"):
        train(learning_run, "both", config, "--init_from", str(learning_run / "absent.pt"))


def test_resume_on_another_test_set_resets_the_best_score(learning_run, caplog):
    source = learning_run / "chkpt" / "learn" / "chkpt_40.pt"
    state = load_checkpoint(source)
    state["best_sdr"] = 1e9  # a score no validation beats
    unbeatable = save_checkpoint(state, learning_run / "unbeatable-40.pt")
    config = write_config(learning_run / "bt.yaml", {"train": {"max_steps": 41}})
    other_test = learning_run / "test-other"
    if not other_test.exists():
        shutil.copytree(learning_run / "test", other_test, ignore=shutil.ignore_patterns("dvec-cache-*"))
    # the same test set, in a folder whose best.pt holds that score: the best score stays, nothing beats it
    same = learning_run / "chkpt" / "same-test"
    same.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"model": state["model"], "step": 40, "sdr": 1e9}, same / "best.pt")
    assert train(learning_run, "same-test", config, "--checkpoint_path", str(unbeatable)) == 0
    assert load_checkpoint(same / "best.pt")["step"] == 40
    # the same test set, in a new run folder: its first validation writes its best.pt
    with caplog.at_level("INFO"):
        assert train(learning_run, "new-folder", config, "--checkpoint_path", str(unbeatable)) == 0
    assert "holds no best.pt yet: the best score starts afresh" in caplog.text
    assert load_checkpoint(learning_run / "chkpt" / "new-folder" / "best.pt")["step"] == 41
    caplog.clear()
    with caplog.at_level("INFO"):
        assert train(learning_run, "other-test", config, "--checkpoint_path", str(unbeatable),
                     "--test_dir", str(other_test)) == 0
    assert "the best score starts afresh" in caplog.text
    best = load_checkpoint(learning_run / "chkpt" / "other-test" / "best.pt")
    assert best["step"] == 41 and best["sdr"] < 1e9


def test_threads_flag_sets_and_logs_the_thread_count(data, caplog):
    before = torch.get_num_threads()
    config = write_config(data / "threads.yaml", {"train": {"max_steps": 1}})
    try:
        with caplog.at_level("INFO"):
            assert train(data, "threads", config, "--threads", "1") == 0
        assert torch.get_num_threads() == 1
        assert "using 1 CPU thread(s)" in caplog.text
        logs = list((data / "logs" / "threads").glob("threads-*.log"))
        assert "using 1 CPU thread(s)" in logs[0].read_text()  # in the run's log file too
        with pytest.raises(UserError, match="--threads must be at least 1"):
            train(data, "threads0", config, "--threads", "0")
    finally:
        torch.set_num_threads(before)


def test_training_state_round_trip():
    """state_dict -> load_state_dict restores the position, best score, optimizer and random state."""
    from reverse_voicefilter.model.model import VoiceFilter
    from reverse_voicefilter.training.state import TrainingState

    hp = HParam(str(ROOT / "config" / "tiny.yaml"))

    def new_state():
        torch.manual_seed(1)
        model = VoiceFilter(hp)
        return TrainingState(model, torch.optim.Adam(model.parameters()), torch.amp.GradScaler("cpu", enabled=False),
                             hp_str=hp.hp_str, embedder="ge2e-test", batches_per_epoch=3)

    state = new_state()
    for _ in range(4):
        state.advance()
    assert (state.step, state.epoch, state.batch) == (4, 1, 1)
    assert state.improves(2.5) and not state.improves(float("nan")) and not state.improves(1.0)
    saved = state.state_dict()
    assert set(saved) == CHECKPOINT_KEYS
    expected = torch.rand(3)
    restored = new_state()
    restored.load_state_dict(saved)
    assert (restored.step, restored.epoch, restored.batch, restored.best_sdr) == (4, 1, 1, 2.5)
    assert torch.equal(torch.rand(3), expected)


# ---- one run per folder, run names, the best checkpoint after a kill ------------------------------
def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_second_run_in_a_locked_run_folder_is_refused_until_the_holder_dies(data, capsys):
    from test_runlock import lock_holder

    config = write_config(data / "locked.yaml", {"train": {"max_steps": 1}})
    args = ("-c", config, "-e", data / "embedder.pt", "-m", "locked", "-b", data, "--train_dir", data / "train",
            "--test_dir", data / "test", "--device", "cpu")
    folder = data / "chkpt" / "locked"
    with lock_holder(folder) as holder:
        capsys.readouterr()
        assert cli(*args) == 2
        line = _one_error_line(capsys)
        assert line.startswith(f"error: {folder} is in use by another run (process {holder.pid} on ")
        assert line.endswith("choose another -m")
        os.kill(holder.pid, signal.SIGSTOP)  # stopped, not dead: it would go on writing once continued
        assert cli(*args) == 2 and _one_error_line(capsys) == line
        proc = subprocess.run([sys.executable, str(ROOT / "trainer.py"), *map(str, args)], capture_output=True,
                              text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [line], proc.stderr[-2000:]
        assert not (data / "logs" / "locked").exists()  # a refused run writes no log
        os.kill(holder.pid, signal.SIGKILL)  # the kernel drops a dead process's lock
        holder.wait(timeout=30)
        assert cli(*args) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "chkpt_1.pt", "config.yaml"]


@pytest.mark.parametrize("name", ["../../victim", "", "a/b", "..", ".", " "])
def test_run_name_must_be_one_plain_folder_name(data, tmp_path, capsys, name):
    config = write_config(tmp_path / "c.yaml")
    base = tmp_path / "one" / "two"
    base.mkdir(parents=True)
    assert cli("-c", config, "-e", data / "embedder.pt", "-m", name, "-b", base, "--train_dir", data / "train",
               "--test_dir", data / "test", "--device", "cpu", "--overwrite") == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: -m {name!r} is not a run name: give one plain folder name")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["c.yaml", "one", "two"]  # nothing made, in or out


def test_a_folder_given_as_a_checkpoint_says_so(learning_run, capsys):
    config = write_config(learning_run / "folder.yaml")
    folder = learning_run / "chkpt" / "learn"
    for flag in ("--checkpoint_path", "--init_from"):
        assert cli("-c", config, "-e", learning_run / "embedder.pt", "-m", "from-folder", "-b", learning_run,
                   "--train_dir", learning_run / "train", "--test_dir", learning_run / "test", "--device", "cpu",
                   flag, folder) == 2
        assert _one_error_line(capsys) == (f"error: {flag} {folder} is a folder, not a checkpoint: give a checkpoint "
                                           f"file (chkpt_STEP.pt), e.g. {folder / 'chkpt_40.pt'}")
    assert not (learning_run / "chkpt" / "from-folder").exists()


def test_a_run_refused_at_its_start_creates_nothing(data, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml")
    base = tmp_path / "base"
    common = ("-c", config, "-e", data / "embedder.pt", "-m", "refused", "-b", base, "--device", "cpu")
    assert cli(*common, "--train_dir", data / "train", "--test_dir", tmp_path / "nope") == 2
    assert "data.test_dir folder not found" in _one_error_line(capsys)
    assert cli(*common, "--train_dir", data / "train", "--test_dir", data / "test",
               "--checkpoint_path", tmp_path / "absent.pt") == 2
    assert "checkpoint not found" in _one_error_line(capsys)
    assert not base.exists()
    # a failure after the start (an embedder that cannot be read) keeps the log that tells of it
    assert cli(*common, "--train_dir", data / "train", "--test_dir", data / "test", "-e", tmp_path / "absent.pt") == 2
    assert not (base / "chkpt" / "refused").exists()
    assert "embedder file not found" in next((base / "logs" / "refused").glob("refused-*.log")).read_text()


@pytest.fixture
def scripted_sdr(monkeypatch):
    """Validation scores chosen per step (the real validation runs; its median SDR is replaced),
    so that the best step is known: 3 dB at step 2, 5 dB at step 4 (the best), 4 dB at step 6."""
    import dataclasses

    from reverse_voicefilter.training import train as train_module
    from reverse_voicefilter.training.validation import Validator

    scores, now = {2: 3.0, 4: 5.0, 6: 4.0}, {}
    validate_and_save, validator_call = train_module.validate_and_save, Validator.__call__

    def at_step(run):
        now["step"] = run.state.step
        return validate_and_save(run)

    monkeypatch.setattr(train_module, "validate_and_save", at_step)
    monkeypatch.setattr(Validator, "__call__",
                        lambda self, model: dataclasses.replace(validator_call(self, model), sdr=scores[now["step"]]))
    return scores


def test_best_pt_after_a_kill_mid_write_equals_the_uninterrupted_runs(data, scripted_sdr):
    """A SIGKILL while best.pt of step 4 was being written leaves its temporary and either no
    best.pt (had it been the first) or step 2's. Resumed from chkpt_4.pt, the run ends with the
    uninterrupted run's best.pt: step 4, its weights and score."""
    config = write_config(data / "best.yaml", {"train": {"max_steps": 6, "checkpoint_interval": 2}})
    chkpt = data / "chkpt"
    assert train(data, "best-straight", config) == 0
    straight = load_checkpoint(chkpt / "best-straight" / "best.pt")
    assert straight["step"] == 4 and straight["sdr"] == 5.0
    assert train(data, "best-cut", config, "--max_steps", "4") == 0
    for left in ("none", "stale"):
        folder = chkpt / f"best-{left}"
        shutil.copytree(chkpt / "best-cut", folder)
        (folder / "best.pt").unlink()
        (folder / ".best.pt.k2j_x9ab.tmp.pt").write_bytes(b"half a best.pt")
        if left == "stale":
            step2 = load_checkpoint(folder / "chkpt_2.pt")
            save_checkpoint({"model": step2["model"], "step": 2, "hp_str": step2["hp_str"], "sdr": 3.0,
                             "embedder": step2["embedder"]}, folder / "best.pt")
        assert train(data, f"best-{left}", config, "--checkpoint_path", str(folder / "chkpt_4.pt")) == 0
        best = load_checkpoint(folder / "best.pt")
        assert (best["step"], best["sdr"]) == (4, 5.0), left
        assert best["model"].keys() == straight["model"].keys()
        assert all(torch.equal(best["model"][k], v) for k, v in straight["model"].items()), left
        assert load_checkpoint(folder / "chkpt_6.pt")["best_sdr"] == 5.0


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_earlier_ones(data, capsys, monkeypatch):
    """ENOSPC injected where the second checkpoint is flushed: exit 1, one line naming the run
    folder, the first checkpoint kept, no temporary left."""
    from reverse_voicefilter.core import atomic

    disk_full_at_flush(monkeypatch, ".chkpt_4.pt.")
    config = write_config(data / "disk-full.yaml", {"train": {"max_steps": 4, "checkpoint_interval": 2}})
    folder = data / "chkpt" / "disk-full"
    code = cli("-c", config, "-e", data / "embedder.pt", "-m", "disk-full", "-b", data, "--device", "cpu",
               "--train_dir", data / "train", "--test_dir", data / "test")
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: no space left on the device of {folder}"), errors
    assert (folder / "chkpt_2.pt").is_file() and not (folder / "chkpt_4.pt").exists()
    assert not [p.name for p in folder.iterdir() if atomic.is_temporary(p.name)]
