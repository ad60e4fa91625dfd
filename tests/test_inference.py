"""inference.py and separation/separator.py: parity with the original, bad input, batches, long inputs."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import ROOT, tone

from reverse_voicefilter.core.audio import load_wav
from reverse_voicefilter.core.checkpoint import save_checkpoint
from reverse_voicefilter.core.hparams import HParam
from reverse_voicefilter.core.precision import BF16_ENV, cpu_has_native_bf16, cpu_runs_bf16
from reverse_voicefilter.model.embedder import SpeechEmbedder, load_embedder
from reverse_voicefilter.model.model import VoiceFilter
from reverse_voicefilter.separation.loading import config_mismatches, load_separator
from reverse_voicefilter.separation.masks import apply_mask
from reverse_voicefilter.separation.options import INV_DIV_EPS, MASK_MODES
from reverse_voicefilter.separation.separator import Separator

RATE = 16000
# tiny.yaml plus a small embedder, so that an original-format embedder.pt is quick to make
TINY_EMBEDDER = "---\nembedder:\n  lstm_hidden: 32\n"


def snr_db(reference, estimate):
    n = min(len(reference), len(estimate))
    reference, estimate = np.asarray(reference[:n], np.float64), np.asarray(estimate[:n], np.float64)
    return 10 * np.log10(np.sum(reference ** 2) / np.sum((reference - estimate) ** 2))


# One intra-op thread per script process: the tests run several at once on a 2-core machine, where
# two OpenMP threads per process spin against each other (an LSTM step then takes 100x longer).
SCRIPT_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_script(script, *args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env=SCRIPT_ENV)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The in-process work of these tests on one thread too (see SCRIPT_ENV); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def start_script(script, *args):
    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=SCRIPT_ENV)


def run_main(main, argv, capsys):
    """An entry script's main through run_cli in this process: (exit code, stdout, stderr)."""
    from reverse_voicefilter.core.errors import run_cli

    with pytest.raises(SystemExit) as stop:
        run_cli(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return stop.value.code, out, err


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def voice(seconds, pitch, seed):
    """A speech-like stand-in: a harmonic tone whose loudness comes and goes like syllables."""
    wav = tone(seconds, RATE, pitch, amp=0.3, seed=seed)
    t = np.arange(wav.size) / RATE
    return (wav * (0.55 + 0.45 * np.sin(2 * np.pi * (3 + seed % 3) * t))).astype(np.float32)


def make_tiny_setup(root, seed=0):
    """Config, random-weight checkpoint and original-format embedder for the tiny config, in ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    config = root / "tiny.yaml"
    config.write_text((ROOT / "config" / "tiny.yaml").read_text() + TINY_EMBEDDER)
    hp = HParam(config)
    torch.manual_seed(seed)
    model = VoiceFilter(hp)
    checkpoint = save_checkpoint({"model": model.state_dict(), "optimizer": {}, "step": 0, "hp_str": hp.hp_str},
                                 root / "chkpt_0.pt")
    embedder = root / "embedder.pt"
    torch.save(SpeechEmbedder(hp).state_dict(), embedder)
    return hp, config, checkpoint, embedder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    hp, config, checkpoint, embedder = make_tiny_setup(root)
    audio = root / "audio"
    audio.mkdir()
    reference = audio / "reference.wav"
    sf.write(reference, voice(2.0, 200, 1), RATE, subtype="FLOAT")
    mixes = audio / "mixes"
    mixes.mkdir()
    for name, (p1, p2, seed) in {"mix1": (200, 310, 2), "mix2": (200, 150, 3)}.items():
        sf.write(mixes / f"{name}.wav", voice(3.0, p1, seed) + voice(3.0, p2, seed + 10), RATE, subtype="FLOAT")
    # stereo 44.1 kHz, another length: read, downmixed and resampled by the loader
    t = np.arange(int(2.5 * 44100)) / 44100
    left = 0.3 * np.sin(2 * np.pi * 210 * t) + 0.2 * np.sin(2 * np.pi * 290 * t)
    sf.write(mixes / "stereo44.flac", np.stack([left, 0.8 * left], axis=1), 44100)
    return {"hp": hp, "config": config, "checkpoint": checkpoint, "embedder": embedder, "root": root,
            "reference": reference, "mixes": mixes}


@pytest.fixture(scope="module")
def tiny_separator(tiny):
    return load_separator(tiny["hp"], tiny["checkpoint"], tiny["embedder"], torch.device("cpu"))


def base_args(tiny, out, *extra):
    return ["-c", tiny["config"], "-e", tiny["embedder"], "--checkpoint_path", tiny["checkpoint"],
            "-r", tiny["reference"], "-o", out, *extra]


# ---- parity with the original --------------------------------------------------------------------
# the fast paths too: measured 120 dB (fp32, either memory format) and 47 dB (bf16) against the original
@pytest.mark.parametrize("fast_flags", [
    pytest.param([], id="fp32"),
    pytest.param(["--channels_last"], id="fp32-channels_last"),
    pytest.param(["--precision", "bf16", "--channels_last"], id="bf16-channels_last",
                 marks=pytest.mark.skipif(not cpu_has_native_bf16(), reason="bf16 is emulated (minutes) on this CPU")),
])
def test_parity_with_the_original_all_modes(parity_dir, tmp_path, fast_flags):
    out = tmp_path / "out"
    proc = run_script("inference.py", "-c", parity_dir / "config.yaml", "-e", parity_dir / "embedder.pt",
                      "--checkpoint_path", parity_dir / "chkpt.pt", "-m", parity_dir / "mixed.wav",
                      "-r", parity_dir / "reference.wav", "-o", out, "--mask", "all", "--device", "cpu",
                      *fast_flags)
    assert proc.returncode == 0, proc.stderr
    for mode in MASK_MODES:
        ours, rate = sf.read(out / f"result_{mode}.wav", dtype="float32")
        original, _ = sf.read(parity_dir / f"result_{mode}.wav", dtype="float32")
        assert rate == RATE and sf.info(out / f"result_{mode}.wav").subtype == "FLOAT"
        assert ours.shape == original.shape
        assert snr_db(original, ours) >= 40, mode


def test_parity_of_the_dvec_and_the_mask_modes(parity_dir):
    """The d-vector, and each mode's formula on the original's mask, against the original's arrays."""
    hp = HParam(parity_dir / "config.yaml")
    embedder = load_embedder(parity_dir / "embedder.pt", hp)
    dvec = embedder.embed(load_wav(parity_dir / "reference.wav"))
    original_dvec = torch.from_numpy(np.load(parity_dir / "dvec.npy"))
    assert torch.nn.functional.cosine_similarity(dvec, original_dvec, dim=0) >= 0.9999
    mag = torch.from_numpy(np.load(parity_dir / "mixed_mag.npy"))
    mask = torch.from_numpy(np.load(parity_dir / "mask.npy"))
    assert float(mask.min()) > 100 * INV_DIV_EPS  # the inv_div guard cannot act on the fixture
    for mode in MASK_MODES:
        est = apply_mask(mag, mask, mode, 0.7).numpy()
        np.testing.assert_allclose(est, np.load(parity_dir / f"est_mag_{mode}.npy"), rtol=1e-5, atol=1e-6)


def test_mask_modes_formulas():
    mag, mask = torch.rand(2, 5, 7), torch.rand(2, 5, 7)
    torch.testing.assert_close(apply_mask(mag, mask, "org"), mag * mask)
    torch.testing.assert_close(apply_mask(mag, mask, "inv_sub", 0.5), mag * (1 - mask) / 0.5)
    torch.testing.assert_close(apply_mask(mag, mask.clamp(min=0.01), "inv_div", 0.7), 0.7 * mag / mask.clamp(min=0.01))
    zero = torch.zeros(1, 2, 3)
    assert torch.isfinite(apply_mask(zero, zero, "inv_div")).all()  # the eps guard: no 0/0
    with pytest.raises(ValueError):
        apply_mask(mag, mask, "bogus")


# ---- bad input: one 'error:' line, non-zero exit ----------------------------------------------------
def _bad_inputs(tiny, root):
    """{case: argv} of inference.py runs that must fail cleanly."""
    root.mkdir(parents=True, exist_ok=True)
    good = tiny["mixes"] / "mix1.wav"
    rng = np.random.default_rng(0)
    files = {}
    files["garbage.pt"] = rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()
    files["truncated.pt"] = tiny["checkpoint"].read_bytes()[:2000]
    files["garbage.wav"] = rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()
    for name, data in files.items():
        (root / name).write_bytes(data)
    sf.write(root / "silent.wav", np.zeros(RATE, np.float32), RATE)
    sf.write(root / "empty.wav", np.zeros(0, np.float32), RATE)
    sf.write(root / "short_ref.wav", voice(0.2, 200, 1), RATE)
    other = HParam.from_string(tiny["config"].read_text().replace("lstm_dim: 64", "lstm_dim: 32"))
    save_checkpoint({"model": VoiceFilter(other).state_dict(), "optimizer": {}, "step": 0, "hp_str": other.hp_str},
                    root / "other_config.pt")
    small = HParam.from_string(tiny["config"].read_text().replace("lstm_hidden: 32", "lstm_hidden: 16"))
    torch.save(SpeechEmbedder(small).state_dict(), root / "other_embedder.pt")
    (root / "bad_key.yaml").write_text("model:\n  lstm_dimm: 3\n")

    def args(change=None, extra=()):
        values = {"-c": tiny["config"], "-e": tiny["embedder"], "--checkpoint_path": tiny["checkpoint"],
                  "-m": [good], "-r": [tiny["reference"]], "-o": [root / "out"]}
        for key, value in (change or {}).items():
            values[key] = value if isinstance(value, list) else [value]
        argv = []
        for key, value in values.items():
            argv += [key, *(value if isinstance(value, list) else [value])]
        return argv + list(extra)

    cases = {
        "missing checkpoint": args({"--checkpoint_path": root / "nope.pt"}),
        "random-bytes checkpoint": args({"--checkpoint_path": root / "garbage.pt"}),
        "truncated checkpoint": args({"--checkpoint_path": root / "truncated.pt"}),
        "checkpoint of another config": args({"--checkpoint_path": root / "other_config.pt"}),
        "missing embedder": args({"-e": root / "nope_embedder.pt"}),
        "garbage embedder": args({"-e": root / "garbage.pt"}),
        "embedder of another config": args({"-e": root / "other_embedder.pt"}),
        "missing config": args({"-c": root / "nope.yaml"}),
        "bad config key": args({"-c": root / "bad_key.yaml"}),
        "missing mixture": args({"-m": root / "nope.wav"}),
        "corrupt mixture": args({"-m": root / "garbage.wav"}),
        "silent mixture": args({"-m": root / "silent.wav"}),
        "empty mixture": args({"-m": root / "empty.wav"}),
        "missing reference": args({"-r": root / "nope_ref.wav"}),
        "folder reference": args({"-r": root}),
        "too short reference": args({"-r": root / "short_ref.wav"}),
        "references do not pair": args({"-r": [tiny["reference"]] * 2, "-m": sorted(tiny["mixes"].iterdir())}),
        "bogus mask": args(extra=["--mask", "bogus"]),
        "zero factor": args(extra=["--factor", "0"]),
        "negative factor": args(extra=["--factor", "-0.5"]),
    }
    if not torch.cuda.is_available():
        cases["absent cuda"] = args(extra=["--device", "cuda"])
    return cases


@pytest.fixture(scope="module")
def bad_cases(tiny):
    return _bad_inputs(tiny, tiny["root"] / "bad")


BAD_CASES = ["missing checkpoint", "random-bytes checkpoint", "truncated checkpoint", "checkpoint of another config",
             "missing embedder", "garbage embedder", "embedder of another config", "missing config", "bad config key",
             "missing mixture", "corrupt mixture", "silent mixture", "empty mixture", "missing reference",
             "folder reference", "too short reference", "references do not pair", "bogus mask", "zero factor",
             "negative factor", "absent cuda"]
# the same through the real script, in separate processes (each pays the torch import)
SCRIPT_CASES = ["checkpoint of another config", "corrupt mixture", "zero factor"]


def check_error_output(case, code, err):
    assert code not in (0, None)
    assert len(error_lines(err)) == 1, err
    assert "Traceback" not in err
    if case == "checkpoint of another config":
        assert "pass the same -c" in err and "model.lstm_dim" in err
    if case.startswith("missing"):
        assert "not found" in err
    if case == "folder reference":  # not "not found": it is there, and is the wrong kind of thing
        assert "is a folder: -r takes an audio file" in err


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_error_line(bad_cases, case, capsys):
    from reverse_voicefilter.commands import inference

    if case not in bad_cases:
        pytest.skip("CUDA is available here")
    code, _, err = run_main(inference.main, bad_cases[case], capsys)
    check_error_output(case, code, err)


def test_bad_input_through_the_script(bad_cases, tiny):
    running = [(case, start_script("inference.py", *bad_cases[case])) for case in SCRIPT_CASES]
    for case, proc in running:
        _, err = proc.communicate(timeout=300)
        check_error_output(case, proc.returncode, err)
    assert not (tiny["root"] / "bad" / "out").exists()  # nothing written


def test_config_mismatch_is_reported(tiny):
    hp = tiny["hp"]
    assert config_mismatches(hp.hp_str, hp) == []
    other = HParam.from_string(hp.hp_str.replace("hop_length: 160", "hop_length: 100"))
    assert config_mismatches(other.hp_str, hp) == ["audio.hop_length: 100 in the checkpoint, 160 in -c"]
    assert config_mismatches(None, hp) == []


def test_checkpoint_of_a_fitting_but_different_config_warns(tiny, tmp_path, caplog):
    from reverse_voicefilter.separation.loading import load_model

    state = torch.load(tiny["checkpoint"], weights_only=True)
    state["hp_str"] = state["hp_str"].replace("hop_length: 160", "hop_length: 100")
    path = save_checkpoint(state, tmp_path / "hop100.pt")
    with caplog.at_level("WARNING"):
        load_model(tiny["hp"], path, torch.device("cpu"))
    assert "audio.hop_length: 100 in the checkpoint, 160 in -c" in caplog.text


@pytest.mark.skipif(not cpu_runs_bf16(), reason="this CPU cannot run bf16 convolutions (fp32 runs instead)")
def test_bf16_precision_is_close_to_fp32(tiny, tiny_separator):
    wav = load_wav(tiny["mixes"] / "mix1.wav")
    dvec = tiny_separator.reference_dvec(load_wav(tiny["reference"]))
    fast = Separator(tiny["hp"], tiny_separator.model, tiny_separator.embedder, torch.device("cpu"),
                     precision="bf16")
    assert fast.precision == "bf16"
    reference = tiny_separator.separate(wav, dvec, ["org"]).wavs["org"]
    assert snr_db(reference, fast.separate(wav, dvec, ["org"]).wavs["org"]) > 20


def test_bf16_on_a_cpu_that_cannot_run_it_is_fp32_with_one_warning(tiny, tmp_path):
    # the decision forced: on an AVX2-only CPU oneDNN refuses bf16 convolutions (a traceback before)
    env = {**SCRIPT_ENV, BF16_ENV: "none"}
    runs = {}
    for name, flags in (("fp32", []), ("bf16", ["--precision", "bf16"])):
        runs[name] = subprocess.run([sys.executable, str(ROOT / "inference.py"),
                                     *map(str, base_args(tiny, tmp_path / name, "-m", tiny["mixes"] / "mix1.wav",
                                                         "--channels_last", *flags))],
                                    capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
        assert runs[name].returncode == 0, runs[name].stderr
    warnings = [line for line in runs["bf16"].stderr.splitlines() if "bfloat16" in line]
    assert len(warnings) == 1 and "fp32 runs instead" in warnings[0], runs["bf16"].stderr
    assert "Traceback" not in runs["bf16"].stderr
    ours, _ = sf.read(tmp_path / "bf16" / "result.wav", dtype="float32")
    fp32, _ = sf.read(tmp_path / "fp32" / "result.wav", dtype="float32")
    assert np.array_equal(ours, fp32)


# ---- single, batch, folder, stereo, plot -----------------------------------------------------------
def test_single_batch_and_folder_give_the_same_outputs(tiny, tiny_separator, tmp_path, capsys):
    from reverse_voicefilter.commands import inference

    mixes = tiny["mixes"]
    names = ["mix1", "mix2", "stereo44"]
    files = [mixes / "mix1.wav", mixes / "mix2.wav", mixes / "stereo44.flac"]
    # the two script runs go on while this process does the single-input run and the references
    many = start_script("inference.py", *base_args(tiny, tmp_path / "many", "-m", files[0], files[1], "-m", files[2]))
    folder = start_script("inference.py", *base_args(tiny, tmp_path / "folder", "-m", mixes, "--mask", "all"))
    code, out, err = run_main(inference.main, base_args(tiny, tmp_path / "single", "-m", files[0], "--plot"), capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == ["result.png", "result.wav"]
    assert (tmp_path / "single" / "result.png").stat().st_size > 1000
    dvec = tiny_separator.reference_dvec(load_wav(tiny["reference"]))
    alone = {name: tiny_separator.separate(load_wav(path), dvec, list(MASK_MODES))  # one at a time
             for name, path in zip(names, files, strict=True)}
    for proc in (many, folder):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == sorted(f"{n}-result.wav" for n in names)
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == sorted(
        f"{n}-result_{m}.wav" for n in names for m in MASK_MODES)

    for name, path in zip(names, files, strict=True):
        batched, rate = sf.read(tmp_path / "many" / f"{name}-result.wav", dtype="float32")
        assert rate == RATE and batched.shape == load_wav(path).shape
        np.testing.assert_allclose(batched, alone[name].wavs["org"], atol=1e-5)
        for mode in MASK_MODES:
            from_folder, _ = sf.read(tmp_path / "folder" / f"{name}-result_{mode}.wav", dtype="float32")
            np.testing.assert_allclose(from_folder, alone[name].wavs[mode], atol=1e-5)
    single, _ = sf.read(tmp_path / "single" / "result.wav", dtype="float32")
    np.testing.assert_allclose(single, alone["mix1"].wavs["org"], atol=1e-5)


def test_paired_references_and_name_clash(tiny, tiny_separator, tmp_path):
    from reverse_voicefilter.core.errors import UserError
    from reverse_voicefilter.separation.options import output_plan, pair_references

    a, b = Path("x/a.wav"), Path("y/a.wav")
    with pytest.raises(UserError, match="same output name"):
        output_plan([a, b], tmp_path, ["org"])
    assert pair_references([a, b], ["r1.wav", "r2.wav"]) == [Path("r1.wav"), Path("r2.wav")]
    assert pair_references([a, b], ["r.wav"]) == [Path("r.wav")] * 2


# ---- long inputs -----------------------------------------------------------------------------------
class PointwiseModel(torch.nn.Module):
    """A mask that depends on each bin alone: chunking must then change nothing at all."""

    def forward(self, mag, dvec):
        return torch.sigmoid(4 * mag - 2 + dvec[:, :1, None])


def test_chunk_stitching_is_exact_for_a_pointwise_mask(tiny):
    hp = tiny["hp"]
    embedder = load_embedder(tiny["embedder"], hp)
    wav = voice(7.3, 180, 4) + voice(7.3, 260, 5)
    dvec = torch.full((256,), 0.1)
    whole = Separator(hp, PointwiseModel(), embedder, torch.device("cpu"), chunk_seconds=0)
    chunked = Separator(hp, PointwiseModel(), embedder, torch.device("cpu"), chunk_seconds=1.0,
                        overlap_seconds=0.3)
    assert chunked.is_long(wav.size) and not whole.is_long(wav.size)
    a = whole.separate(wav, dvec, list(MASK_MODES))
    b = chunked.separate(wav, dvec, list(MASK_MODES))
    for mode in MASK_MODES:
        assert b.wavs[mode].shape == wav.shape
        np.testing.assert_allclose(b.wavs[mode], a.wavs[mode], atol=2e-5)


def test_chunked_output_is_close_to_the_whole_output(tiny, tiny_separator):
    hp = tiny["hp"]
    wav = voice(9.0, 190, 6) + voice(9.0, 280, 7)
    dvec = tiny_separator.reference_dvec(load_wav(tiny["reference"]))
    chunked = Separator(hp, tiny_separator.model, tiny_separator.embedder, torch.device("cpu"),
                        chunk_seconds=2.0, overlap_seconds=1.5)
    assert chunked.is_long(wav.size)
    whole = tiny_separator.separate(wav, dvec, ["org", "inv_sub"], keep_spectra=True)
    parts = chunked.separate(wav, dvec, ["org", "inv_sub"], keep_spectra=True)
    assert parts.spectra_note and parts.spectra["mask"].shape[1] == hp.audio.num_freq
    for mode in ("org", "inv_sub"):
        assert parts.wavs[mode].shape == wav.shape
        assert snr_db(whole.wavs[mode], parts.wavs[mode]) > 30, mode


LONG_SECONDS = 180
# Runs inference.py's main in a fresh process and reports how far its peak memory rose above the
# memory it held when separation began (the model and d-vector loaded): MiB on stdout's last line.
MEMORY_PROBE = """
import sys
sys.path.insert(0, {root!r})
from reverse_voicefilter.commands import inference
from reverse_voicefilter.separation import separator as separation
def current_mib(field):
    status = open("/proc/self/status").read()
    return int(status.split(field + ":")[1].split()[0]) / 1024

start = {{}}
plain = separation.Separator.separate_stream

def probed(self, *args, **kwargs):
    try:
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
            f.write("5")
    except OSError:
        pass  # then VmHWM may include an earlier peak: the bound only gets stricter
    start["mib"] = current_mib("VmRSS")
    yield from plain(self, *args, **kwargs)

separation.Separator.separate_stream = probed
code = inference.main(sys.argv[1:])
print(current_mib("VmHWM") - start["mib"])
sys.exit(code)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status (Linux)")
def test_minutes_long_input_runs_in_bounded_memory(tiny, tmp_path):
    """3 minutes through the script, in 10 s chunks: the output has the input's length, and the
    memory separation adds stays far below what one unchunked pass needs (three live conv
    activations of channels x frames x bins floats: 424 MiB here; measured: chunked +172 MiB,
    unchunked (--chunk_seconds 0) +502 MiB)."""
    long_wav = tmp_path / "long.wav"
    wav = np.concatenate([voice(10.0, 170 + 10 * (i % 5), i) for i in range(LONG_SECONDS // 10)])
    sf.write(long_wav, wav, RATE, subtype="FLOAT")
    args = base_args(tiny, tmp_path / "out", "-m", long_wav, "--mask", "all", "--chunk_seconds", "10",
                     "--overlap_seconds", "1")
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE.format(root=str(ROOT)), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env=SCRIPT_ENV)
    assert proc.returncode == 0, proc.stderr
    for mode in MASK_MODES:
        out, _ = sf.read(tmp_path / "out" / f"result_{mode}.wav", dtype="float32")
        assert out.shape == wav.shape
    hp = tiny["hp"]
    frames = 1 + wav.size // hp.audio.hop_length
    unchunked_mib = 3 * hp.model.conv_channels * frames * hp.audio.num_freq * 4 / 2 ** 20
    added_mib = float(proc.stdout.strip().splitlines()[-1])
    assert added_mib < 0.6 * unchunked_mib, (added_mib, unchunked_mib)


def test_help_documents_the_modes_and_the_guard():
    from reverse_voicefilter.commands import inference

    text = inference.build_parser().format_help()
    assert "inv_div" in text and "--chunk_seconds" in text and "max(mask, eps)" in text


@pytest.mark.parametrize("script", ["inference.py", "evaluate.py"])
def test_help_and_flag_errors_answer_before_torch_is_imported(script, tmp_path):
    # -X importtime lists every module the interpreter imported: torch must not be among them
    # when the command line alone already decides the answer.
    for args in (["--help"], ["-c", "x.yaml", "--checkpoint_path", "c.pt", "-o", str(tmp_path), "--mask", "bad"]):
        proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / script), *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
        imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
        assert "torch" not in imported and "numpy" not in imported, args
        assert proc.returncode == (0 if args == ["--help"] else 2)


# ---- one way to do each thing ------------------------------------------------------------------------
@pytest.mark.parametrize("script", ["inference", "evaluate"])
def test_mask_names_and_embedder_flag_are_shared(script):
    import importlib

    from reverse_voicefilter.separation.options import ALL_MODES, MASK_CHOICES

    module = importlib.import_module(f"reverse_voicefilter.commands.{script}")  # the root scripts only call it
    parser = module.build_parser()
    mask = next(a for a in parser._actions if "--mask" in a.option_strings)
    assert tuple(mask.choices) == MASK_CHOICES == (*MASK_MODES, ALL_MODES)
    for flag in ("-e", "--embedder_path", "--embedder"):  # the trainer's names, and the old alias
        args = parser.parse_args([flag, "x.pt", "--checkpoint_path", "c.pt", "-o", "o", "-m", "m.wav", "-r", "r.wav"]
                                 if script == "inference" else [flag, "x.pt", "--checkpoint_path", "c.pt", "-o", "o"])
        assert args.embedder_path == "x.pt" and args.config is None  # -c is optional


def test_mask_names_are_written_once():
    """No second list of the mode names beside reverse_voicefilter/separation/options.py."""
    for path in [ROOT / "inference.py", ROOT / "evaluate.py", *sorted((ROOT / "utils").glob("*.py"))]:
        if path.name != "separation_options.py":
            assert '"inv_div", "inv_sub"' not in path.read_text(), path


# ---- the config stored in the checkpoint -------------------------------------------------------------
def test_config_comes_from_the_checkpoint_when_c_is_absent(tiny, tmp_path, capsys):
    from reverse_voicefilter.commands import inference

    args = ["-e", tiny["embedder"], "--checkpoint_path", tiny["checkpoint"], "-m", tiny["mixes"] / "mix1.wav",
            "-r", tiny["reference"]]
    code, _, err = run_main(inference.main, args + ["-o", tmp_path / "stored"], capsys)
    assert code == 0, err
    code, _, err = run_main(inference.main, args + ["-c", tiny["config"], "-o", tmp_path / "given"], capsys)
    assert code == 0, err
    stored, _ = sf.read(tmp_path / "stored" / "result.wav", dtype="float32")
    given, _ = sf.read(tmp_path / "given" / "result.wav", dtype="float32")
    np.testing.assert_array_equal(stored, given)

    state = torch.load(tiny["checkpoint"], weights_only=True)
    del state["hp_str"]
    bare = save_checkpoint(state, tmp_path / "no_hp_str.pt")
    argv = ["-e", tiny["embedder"], "--checkpoint_path", bare, "-m", tiny["mixes"] / "mix1.wav", "-r",
            tiny["reference"], "-o", tmp_path / "bare"]
    code, _, err = run_main(inference.main, argv, capsys)
    assert code == 2 and error_lines(err) == [f"error: checkpoint {bare} stores no config (hp_str): pass the "
                                              f"config it was trained with as -c"], err
    assert not (tmp_path / "bare").exists()
    code, _, err = run_main(inference.main, argv + ["-c", tiny["config"]], capsys)
    assert code == 0, err


# ---- defects -------------------------------------------------------------------------------------------
def test_unwritable_out_dir_is_one_line_before_any_work(tiny, tmp_path, capsys, monkeypatch):
    from reverse_voicefilter.commands import inference
    from reverse_voicefilter.separation import loading as separation
    blocker = tmp_path / "somefile.txt"
    blocker.write_text("a file, not a folder")
    monkeypatch.setattr(separation, "load_separator", lambda *a, **k: pytest.fail("loaded the model first"))
    code, _, err = run_main(inference.main, base_args(tiny, blocker / "out", "-m", tiny["mixes"] / "mix1.wav"), capsys)
    assert code == 2 and "Traceback" not in err
    assert error_lines(err) == [f"error: cannot write to -o folder {blocker / 'out'}: Not a directory"], err


def test_verbose_logs_files_model_device_threads_and_timings(tiny, tmp_path):
    proc = run_script("inference.py", *base_args(tiny, tmp_path / "out", "-m", tiny["mixes"] / "mix1.wav", "-v",
                                                 "--threads", "1", "--device", "cpu"))
    assert proc.returncode == 0, proc.stderr
    log = proc.stderr
    assert "1 mixture(s), mask org" in log and "using 1 CPU thread(s)" in log
    assert f"model: {tiny['checkpoint']} (step 0" in log and "on cpu" in log
    assert f"separating {tiny['mixes'] / 'mix1.wav'} (3.0 s)" in log
    assert "separated 1 of 1 mixture(s) in " in log


def test_a_generator_folder_gives_its_mixtures_only(tmp_path):
    from reverse_voicefilter.separation.options import expand_inputs

    for name in ("000000-mixed.wav", "000000-target.wav", "000001-mixed.wav", "000001-target.wav"):
        sf.write(tmp_path / name, voice(0.5, 200, 1), RATE)
    assert [p.name for p in expand_inputs([tmp_path])] == ["000000-mixed.wav", "000001-mixed.wav"]


@pytest.mark.parametrize("embedder,seconds", [("tiny", 12700 / RATE), ("resemblyzer", 1.0)])
def test_a_reference_shorter_than_the_embedders_window_warns(tiny, tmp_path, caplog, embedder, seconds):
    """The original embedder's window is 80 frames x 160 samples (0.8 s); resemblyzer's 1.6 s."""
    from reverse_voicefilter.separation.files import reference_dvecs

    spec = tiny["embedder"] if embedder == "tiny" else "resemblyzer"
    separator = Separator(tiny["hp"], None, load_embedder(spec, tiny["hp"]), torch.device("cpu"))
    short, long = tmp_path / "short.wav", tmp_path / "long.wav"
    sf.write(short, voice(seconds, 200, 1)[:round(seconds * RATE)], RATE)
    sf.write(long, voice(2.0, 200, 1), RATE)
    with caplog.at_level("WARNING"):
        dvecs = reference_dvecs(separator, [short, long])
    assert all(isinstance(d, torch.Tensor) for d in dvecs.values())
    window = "0.80" if embedder == "tiny" else "1.60"
    assert [r.getMessage() for r in caplog.records] == [
        f"reference {short} is {seconds:.2f} s long, shorter than the embedder's {window} s window: its d-vector "
        f"may not represent the speaker well (use a few seconds of speech)"]


def test_a_file_that_is_no_checkpoint_says_what_it_is(tiny, tmp_path, capsys):
    from reverse_voicefilter.commands import inference

    (tmp_path / "config.yaml").write_text("model:\n  lstm_dim: 64\n")
    cases = {tiny["reference"]: "is a WAV audio file, not a VoiceFilter checkpoint",
             tmp_path / "config.yaml": "is a text file (a YAML config? give that with -c)",
             tiny["embedder"]: "holds a speaker embedder's weights, not a VoiceFilter checkpoint: give it with -e"}
    for path, expected in cases.items():
        argv = base_args(tiny, tmp_path / "out", "-m", tiny["mixes"] / "mix1.wav")
        argv[argv.index("--checkpoint_path") + 1] = path
        code, _, err = run_main(inference.main, argv, capsys)
        assert code == 2 and len(error_lines(err)) == 1 and expected in err, err
        assert "pop from empty list" not in err


def test_bad_files_among_several_do_not_stop_the_others(tiny, tmp_path, capsys):
    from reverse_voicefilter.commands import inference

    sf.write(tmp_path / "silent.wav", np.zeros(RATE, np.float32), RATE)
    (tmp_path / "garbage.wav").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes())
    good = [tiny["mixes"] / "mix1.wav", tiny["mixes"] / "mix2.wav"]
    argv = base_args(tiny, tmp_path / "out", "-m", good[0], tmp_path / "silent.wav", tmp_path / "garbage.wav", good[1])
    code, out, err = run_main(inference.main, argv, capsys)
    assert code == 1, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mix1-result.wav", "mix2-result.wav"]
    assert out.split() == [str(tmp_path / "out" / "mix1-result.wav"), str(tmp_path / "out" / "mix2-result.wav")]
    failed = [line for line in err.splitlines() if line.startswith("failed:")]
    assert len(failed) == 2 and str(tmp_path / "silent.wav") in failed[0] and "silent" in failed[0]
    assert str(tmp_path / "garbage.wav") in failed[1] and "cannot read" in failed[1]
    assert error_lines(err) == ["error: 2 of 4 mixtures could not be separated (named above); the other 2 were "
                                "written"]
    # all of them bad: exit 2, nothing written
    argv = base_args(tiny, tmp_path / "none", "-m", tmp_path / "silent.wav", tmp_path / "garbage.wav")
    code, out, err = run_main(inference.main, argv, capsys)
    assert code == 2 and out == "" and not (tmp_path / "none").exists()
    assert len([line for line in err.splitlines() if line.startswith("failed:")]) == 2
    assert error_lines(err) == ["error: none of the 2 mixtures could be separated"]


def test_result_picture_shares_scales_and_has_real_axes(tiny, tiny_separator, tmp_path, monkeypatch):
    """result.png: one colour scale for mixture and outputs, one for mask and gains; seconds and Hz;
    the file names in the title; the inverse modes' panel is the gain they applied."""
    from reverse_voicefilter.core import plotting
    from reverse_voicefilter.separation.files import save_result_picture

    figures = []
    monkeypatch.setattr(plotting, "_save_figure", lambda fig, path: figures.append(fig))
    wav = load_wav(tiny["mixes"] / "mix1.wav")
    dvec = tiny_separator.reference_dvec(load_wav(tiny["reference"]))
    result = tiny_separator.separate(wav, dvec, list(MASK_MODES), keep_spectra=True)
    save_result_picture(tmp_path / "result.png", result, tiny["mixes"] / "mix1.wav", tiny["reference"],
                        list(MASK_MODES), 0.7, tiny["hp"])
    (fig,) = figures
    assert "mix1.wav" in fig._suptitle.get_text() and "reference.wav" in fig._suptitle.get_text()
    panels = {ax.get_title(loc="left"): ax.images[0] for ax in fig.axes if ax.images}
    assert len(panels) == 1 + 2 * len(MASK_MODES)
    magnitudes = [im for name, im in panels.items() if name == "mixture" or name.startswith("output")]
    gains = [im for name, im in panels.items() if name.startswith(("mask", "gain"))]
    assert len(magnitudes) == 4 and {im.get_clim() for im in magnitudes} == {(0.0, 1.0)}
    assert len(gains) == 3 and len({im.get_clim() for im in gains}) == 1
    for im in panels.values():
        left, right, bottom, top = im.get_extent()
        assert (left, bottom, top) == (0, 0, 8000.0) and abs(right - 3.01) < 0.01
    sub = panels["gain applied (inv_sub, factor 0.7; after the clip to the ceiling)"].get_array()
    mask, mag = result.spectra["mask"], result.spectra["mixture"]
    expected = np.where(mag * (1 - mask) / 0.7 <= 1, (1 - mask) / 0.7, 1 / np.maximum(mag, 1e-6))
    np.testing.assert_allclose(np.asarray(sub).T[mag > 1e-3], expected[mag > 1e-3], rtol=1e-4)


# ---- reliability: overwritten inputs, full disks, odd names, killed runs, truncated files -----------
@pytest.mark.parametrize("role", ["-m", "-r"])
def test_an_output_that_is_an_input_is_refused_before_any_work(tiny, tmp_path, capsys, monkeypatch, role):
    from reverse_voicefilter.commands import inference
    from reverse_voicefilter.separation import loading

    out = tmp_path / "out"
    out.mkdir()
    given = out / "result.wav"
    given.write_bytes((tiny["mixes"] / "mix1.wav").read_bytes())
    before = given.read_bytes()
    monkeypatch.setattr(loading, "load_separator", lambda *a, **k: pytest.fail("loaded the model first"))
    argv = ["-c", tiny["config"], "-e", tiny["embedder"], "--checkpoint_path", tiny["checkpoint"], "-o", out,
            "-m", given if role == "-m" else tiny["mixes"] / "mix1.wav",
            "-r", given if role == "-r" else tiny["reference"]]
    code, out_text, err = run_main(inference.main, argv, capsys)
    what = "mixture" if role == "-m" else "reference"
    assert code == 2 and out_text == "" and "Traceback" not in err
    assert error_lines(err) == [f"error: the result {given} would overwrite the {what} {given}: choose another "
                                f"output folder (-o) or rename the input"]
    assert given.read_bytes() == before


def test_a_full_disk_stops_with_one_line_and_keeps_the_earlier_results(tiny, tmp_path, capsys, monkeypatch):
    from reverse_voicefilter.commands import inference
    from reverse_voicefilter.core import audio

    real_write, calls = audio._write_float_wav, []

    def write_until_full(path, wav, sample_rate):
        calls.append(path)
        if len(calls) == 1:
            return real_write(path, wav, sample_rate)
        with open(path, "wb") as f:
            f.write(b"RIFF half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audio, "_write_float_wav", write_until_full)
    out = tmp_path / "out"
    argv = base_args(tiny, out, "-m", tiny["mixes"] / "mix1.wav", tiny["mixes"] / "mix2.wav")
    code, stdout, err = run_main(inference.main, argv, capsys)
    assert code == 1 and "Traceback" not in err
    assert error_lines(err) == [f"error: no space left on the device of {out}: free some space and run again (the "
                                f"files written before are kept)"]
    assert sorted(p.name for p in out.iterdir()) == ["mix1-result.wav"]  # no temporary, no half file
    assert stdout.splitlines() == [str(out / "mix1-result.wav")]  # named as it was written, before the stop
    assert sf.info(out / "mix1-result.wav").frames == RATE * 3


@pytest.mark.skipif(os.name != "posix", reason="names that are not valid UTF-8 exist on POSIX file systems")
def test_an_output_folder_whose_name_is_not_utf8_works(tiny, tmp_path):
    out = os.fsencode(tmp_path) + b"/out_\xffdir"  # as a shell passes $'out_\xffdir'
    argv = [os.fsencode(str(a)) for a in base_args(tiny, "OUT", "-m", tiny["mixes"] / "mix1.wav")]
    argv[argv.index(b"OUT")] = out
    proc = subprocess.run([sys.executable, str(ROOT / "inference.py"), *argv], capture_output=True, cwd=ROOT,
                          timeout=300, env=SCRIPT_ENV)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert proc.stdout == out + b"/result.wav\n"  # the name that opens the file, byte for byte
    assert os.listdir(out) == [b"result.wav"]


@pytest.mark.skipif(os.name != "posix", reason="whether a writer lives is only probed on POSIX")
def test_a_killed_runs_temporary_is_removed_a_parallel_runs_is_kept(tiny, tmp_path, capsys):
    from reverse_voicefilter.commands import inference

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    out = tmp_path / "out"
    out.mkdir()
    killed = out / f".mix2-result.wav.pid{ended.pid}.ab12cd34.tmp.wav"  # what a SIGKILL left
    parallel = out / f".mix2-result.wav.pid{os.getpid()}.k2j_x9ab.tmp.wav"  # a run still writing
    for path in (killed, parallel):
        path.write_bytes(b"RIFF half")
    code, _, err = run_main(inference.main, base_args(tiny, out, "-m", tiny["mixes"] / "mix1.wav"), capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted([parallel.name, "result.wav"])


def test_a_truncated_mixture_is_separated_with_a_warning(tiny, tmp_path, capsys, caplog):
    from reverse_voicefilter.commands import inference

    cut = tmp_path / "cut.wav"
    data = (tiny["mixes"] / "mix1.wav").read_bytes()  # 3 s of float samples
    cut.write_bytes(data[:data.index(b"data") + 8 + RATE * 4])  # 1 s of them, under the 3 s header
    with caplog.at_level("WARNING"):
        code, _, err = run_main(inference.main, base_args(tiny, tmp_path / "out", "-m", cut), capsys)
    assert code == 0, err
    (line,) = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert str(cut) in line and "promises 3.00 s" in line and "holds 1.00 s" in line
    assert sf.info(tmp_path / "out" / "result.wav").frames == RATE
