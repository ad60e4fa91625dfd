"""Inference speed: real-time factor (RTF = processing seconds / audio seconds; < 1 is faster
than real time) of the network alone and of the whole ``inference.py`` process, for a short
(3 s) and a long (60 s) mixture.

(a) the model alone: ``Separator.mask`` (the network under the separator's autocast) on the
    mixture's magnitude [1, T, F] already on the device, the whole length in one call
    (T = 301 / 6001 frames), the network prepared as ``inference.py`` prepares it (batch norms
    folded into the convolutions): variants ``model-fp32`` (baseline: ``inference.py``'s default),
    ``model-fp32-bn`` (batch norms not folded: the training network in eval mode, as before
    folding), ``model-fp32-cl`` (``--channels_last``), ``model-bf16`` (``--precision bf16``),
    ``model-bf16-cl`` (both);
(b) the whole process: ``inference.py -e resemblyzer`` run as a user runs it (interpreter and
    imports, checkpoint and embedder loading, audio reading, reference d-vector, STFTs, the
    network in chunks of 30 s + 2 x 3 s context for the long mixture, writing the result):
    variants ``process-fp32`` (baseline) and ``process-bf16-cl`` (``--precision bf16
    --channels_last``); a fresh ``inference.py`` per mixture.

The weights are random (a VoiceFilter saved in the original checkpoint format, as
tests/test_inference.py builds one): speed does not depend on them. The audio is real speech
from ``../shared/data/librispeech-mini`` (test-other: utterances of two speakers concatenated
and summed; the reference is another utterance of the first), or synthetic voices when that
folder is absent (the table says so). A line before the tables gives the start-up cost:
``python inference.py --help`` (interpreter + imports), which dominates short clips.

Duration at the defaults (config/default.yaml) on the 2-core development CPU (AMD EPYC with
AVX512-BF16): about 4 minutes for all variants, most of it the 60 s mixtures. On a CPU whose
oneDNN cannot run bf16 convolutions (AVX2 only) the bf16 variants are left out: inference.py runs
fp32 there (reverse_voicefilter.core.precision), and emulated bf16 took about 800 s for one 3 s clip.
``--quick`` (config/tiny.yaml): about 2 minutes.

    .venv/bin/python -m reverse_voicefilter.bench.inference
    .venv/bin/python -m reverse_voicefilter.bench.inference --quick
    .venv/bin/python -m reverse_voicefilter.bench.inference --device cuda --repeats 10
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from reverse_voicefilter.bench import common, roofline

VARIANTS = {  # name: (kind, precision, channels_last, batch norms folded)
    "model-fp32": ("model", "fp32", False, True),
    "model-fp32-bn": ("model", "fp32", False, False),
    "model-fp32-cl": ("model", "fp32", True, True),
    "model-bf16": ("model", "bf16", False, True),
    "model-bf16-cl": ("model", "bf16", True, True),
    "process-fp32": ("process", "fp32", False, True),
    "process-bf16-cl": ("process", "bf16", True, True),
}
RATE = 16000
REFERENCE_SECONDS = 5.0  # the reference recording is cut to this length
PROJECT_PACKAGES = {"inference", "reverse_voicefilter"}


def parse_args():
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="config (default config/default.yaml; --quick: config/tiny.yaml)")
    p.add_argument("--data", default=str(common.DEFAULT_DATA), help="LibriSpeech-layout folder (default: %(default)s)")
    p.add_argument("--durations", type=float, nargs="+", default=[3.0, 60.0], help="mixture lengths in s")
    common.add_allocator_flag(p, "reuse, as inference.py")  # model-alone rows, peaks; inference.py sets its own
    p.add_argument("--warmup", type=int, default=1, help="model alone: untimed calls on the shortest mixture")
    p.add_argument("--repeats", type=int, default=3, help="model alone: timed calls per mixture up to 10 s")
    p.add_argument("--long_repeats", type=int, default=1, help="model alone: timed calls per longer mixture")
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)  # internal: the prepared files (child)
    args = common.parse(p)
    args.config = args.config or str(common.PACKAGE / "config" / ("tiny.yaml" if args.quick else "default.yaml"))
    return args


# ---- the files every variant uses ------------------------------------------------------------
def _synthetic_voice(seconds, pitch, seed):
    """A harmonic tone whose loudness comes and goes like syllables (when there is no real speech)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    wav = sum(0.3 / k * np.sin(2 * np.pi * pitch * k * t) for k in range(1, 6))
    wav = wav * (0.55 + 0.45 * np.sin(2 * np.pi * (3 + seed % 3) * t)) + 0.01 * rng.standard_normal(t.size)
    return wav.astype(np.float32)


def _speech(data):
    """(reference, stream of speaker A, stream of speaker B) from test-other, or None."""
    import numpy as np

    from reverse_voicefilter.core.audio import load_wav

    speakers = sorted(p for p in Path(data, "test-other").glob("*") if p.is_dir())
    if len(speakers) < 2:
        return None
    a_files, b_files = (sorted(s.rglob("*.flac")) for s in speakers[:2])
    if len(a_files) < 2 or not b_files:
        return None
    a = np.concatenate([load_wav(f) for f in a_files[1:]])
    b = np.concatenate([load_wav(f) for f in b_files])
    return load_wav(a_files[0]), a, b


def prepare(args, workdir):
    """Reference, mixtures and a random-weight checkpoint in ``workdir``; returns a description."""
    import numpy as np
    import torch

    from reverse_voicefilter.core.audio import save_wav
    from reverse_voicefilter.core.checkpoint import save_checkpoint
    from reverse_voicefilter.core.hparams import HParam
    from reverse_voicefilter.model.model import VoiceFilter

    workdir = Path(workdir)
    speech = _speech(args.data) if Path(args.data, "test-other").is_dir() else None
    longest = int(max(args.durations) * RATE)
    if speech is None:
        source = "synthetic voices"
        reference = _synthetic_voice(REFERENCE_SECONDS, 200, 1)
        a, b = _synthetic_voice(longest / RATE, 200, 2), _synthetic_voice(longest / RATE, 150, 3)
    else:
        source = f"real speech ({args.data}/test-other)"
        reference, a, b = speech
        reference = reference[:int(REFERENCE_SECONDS * RATE)]
    a, b = (np.resize(x, longest) for x in (a, b))  # repeated when the recordings are shorter
    mixtures = {}
    for seconds in args.durations:
        n = int(seconds * RATE)
        mix = a[:n] + b[:n]
        path = workdir / f"mix_{seconds:g}s.wav"
        save_wav(path, mix / (1.1 * np.abs(mix).max()), RATE)
        mixtures[f"{seconds:g}"] = str(path)
    save_wav(workdir / "reference.wav", reference, RATE)
    hp = HParam(args.config)
    torch.manual_seed(0)
    save_checkpoint({"model": VoiceFilter(hp).state_dict(), "optimizer": {}, "step": 0, "hp_str": hp.hp_str},
                    workdir / "chkpt.pt")
    return {"source": source, "mixtures": mixtures, "reference": str(workdir / "reference.wav"),
            "checkpoint": str(workdir / "chkpt.pt"), "reference_seconds": round(reference.size / RATE, 2)}


def startup_cost(args):
    """Median wall time of ``python -c pass`` and ``python inference.py --help`` (3 runs each),
    and the slowest third-party packages that ``import inference`` loads (``python -X importtime``;
    a package's time includes what it imports itself, e.g. torch's numpy)."""
    def wall(cmd):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run(cmd, cwd=common.ROOT, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    bare = wall([sys.executable, "-c", "pass"])
    help_s = wall([sys.executable, "inference.py", "--help"])
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", "import inference"], cwd=common.ROOT,
                         check=True, capture_output=True, text=True).stderr
    heaviest = {}  # package -> its largest cumulative import time (its first, outermost import)
    for line in err.splitlines():  # "import time:  self [us] | cumulative [us] | name" (nesting = indentation)
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| +(\S+)", line)
        if m and m.group(2).split(".")[0] not in PROJECT_PACKAGES:
            package = m.group(2).split(".")[0]
            heaviest[package] = max(heaviest.get(package, 0.0), int(m.group(1)) / 1e6)
    top = sorted(((s, name) for name, s in heaviest.items()), reverse=True)
    return {"python_s": bare, "inference_help_s": help_s, "top_imports": top[:5]}


# ---- one variant (child process) ---------------------------------------------------------------
def run_model(args, files, precision, channels_last, fold, device):
    import torch

    from reverse_voicefilter.core.audio import Audio, load_wav
    from reverse_voicefilter.core.hparams import HParam
    from reverse_voicefilter.model.model import VoiceFilter
    from reverse_voicefilter.separation.separator import Separator

    hp = HParam(args.config)
    hp.train.channels_last = channels_last
    torch.manual_seed(0)
    model = VoiceFilter(hp).to(device)
    model = model.for_inference() if fold else model.eval()
    separator = Separator(hp, model, None, device, precision=precision)
    audio = Audio(hp)
    dvec = torch.nn.functional.normalize(torch.randn(1, hp.embedder.emb_dim, device=device), dim=1)
    result = {"precision": precision}
    for i, (seconds, path) in enumerate(files["mixtures"].items()):
        mag = audio.wav2spec_torch(torch.from_numpy(load_wav(path)).to(device)[None], phase=False)  # [1, T, F]
        repeats = args.repeats if float(seconds) <= 10 else args.long_repeats
        times = common.time_call(lambda m=mag: separator.mask(m, dvec), device,
                                 warmup=args.warmup if i == 0 else 0, repeats=repeats)
        result[f"s_{seconds}"] = common.median(times)
        result[f"rtf_{seconds}"] = result[f"s_{seconds}"] / float(seconds)
        result[f"frames_{seconds}"] = mag.size(1)
        result[f"flops_{seconds}"] = roofline.voicefilter_flops(hp, 1, mag.size(1), training=False)
        common.emit_partial({**result, **common.process_stats(device)})
    return {**result, **common.process_stats(device)}


def run_process(args, files, precision, channels_last):
    result = {"peak_rss_mb": 0.0}
    for seconds, path in files["mixtures"].items():
        with tempfile.TemporaryDirectory(prefix="out_", dir=args.workdir) as out:  # the parent removes it too
            run = common.run_tool([sys.executable, "inference.py", "-c", args.config, "-e", "resemblyzer",
                                   "--checkpoint_path", files["checkpoint"], "-m", path, "-r", files["reference"],
                                   "-o", out, "--device", args.device, "--precision", precision,
                                   "--channels_last", str(channels_last)])
        result[f"s_{seconds}"] = run.seconds
        result[f"rtf_{seconds}"] = run.seconds / float(seconds)
        result[f"rss_{seconds}"] = round(run.peak_rss_mb, 1)
        result["peak_rss_mb"] = max(result["peak_rss_mb"], round(run.peak_rss_mb, 1))
        result["load_1min"] = round(os.getloadavg()[0], 2)
        common.emit_partial(result)
    return result


def run_variant(args, name):
    common.set_allocator(args, "reuse")
    device = common.pick(args.device)
    if name == roofline.PEAKS:  # the convolution at the frames of the shortest mixture, batch 1
        from reverse_voicefilter.core.hparams import HParam

        hp = HParam(args.config)
        frames = 1 + int(min(args.durations) * hp.audio.sample_rate) // hp.audio.hop_length
        return roofline.measure_peaks(device, hp.model.conv_channels, frames, hp.audio.num_freq, 1,
                                      bf16=roofline.native_bf16(device))
    kind, precision, channels_last, fold = VARIANTS[name]
    files = json.loads(Path(args.workdir, "files.json").read_text())
    if kind == "model":
        return run_model(args, files, precision, channels_last, fold, device)
    return run_process(args, files, precision, channels_last)


# ---- the parent ----------------------------------------------------------------------------------
def tables(results, durations, cuda, peaks):
    keys = [f"{d:g}" for d in durations]
    for k in keys:
        roofline.add_roofline(results, peaks, flops_key=f"flops_{k}", seconds_key=f"s_{k}", suffix=f"_{k}")
    out = []
    for kind, title in (("model", "(a) model alone (Separator.mask)"), ("process", "(b) whole inference.py process")):
        rows = {n: r for n, r in results.items() if VARIANTS[n][0] == kind}
        if not rows:
            continue
        columns = [c for k in keys for c in ((f"{k} s: seconds", f"s_{k}"), (f"{k} s: RTF", f"rtf_{k}"))]
        if kind == "process":
            columns += [(f"{k} s: peak RSS MB", f"rss_{k}") for k in keys]
        else:
            columns += [c for k in keys for c in ((f"{k} s: GFLOP/s", f"gflops_{k}"),
                                                   (f"{k} s: of conv peak", f"of_conv_peak_{k}"))]
            columns.append(("peak RSS MB", "peak_rss_mb"))
            if cuda:
                columns.append(("CUDA peak MB", "cuda_peak_mb"))
        columns.append(("load (1 min)", "load_1min"))
        ratios = [(f"speed vs fp32 ({k} s)", f"s_{k}", False) for k in keys]
        ratios.append(("memory vs fp32", "peak_rss_mb", False))
        out.append(f"{title}\n\n{common.markdown_table(rows, columns, ratios, baseline=f'{kind}-fp32')}")
    return "\n\n".join(out)


def main():
    args = parse_args()
    available = list(VARIANTS)
    if not args.variant and not roofline.native_bf16(common.pick(args.device)):  # bf16 would run as fp32
        available = [n for n in available if VARIANTS[n][1] == "fp32"]

    def before(device):
        startup = startup_cost(args)
        peaks = common.run_variants(__spec__.name, [roofline.PEAKS], common.child_argv(), args.timeout)[roofline.PEAKS]
        return startup, None if "error" in peaks else peaks

    def prepare_files(workdir):
        files = prepare(args, workdir)
        print(f"inference benchmark: {args.config}, mixtures of {', '.join(files['mixtures'])} s "
              f"({files['source']}), timeout {args.timeout:g} s per variant", file=sys.stderr)
        return files

    common.run_benchmark(__spec__.name, args, run_variant, available, "Inference speed",
                         lambda results, files, extra, device: summarize(args, results, files, *extra, device),
                         prepare=prepare_files, before=before, workdir_prefix="bench_inference_",
                         shared_file="files.json")


def summarize(args, results, files, startup, peaks, device):
    """The tables, notes and JSON payload of the results so far."""
    imports = ", ".join(f"{name} {s:.2f} s" for s, name in startup["top_imports"])
    notes = [f"Start-up: `python -c pass` {startup['python_s']:.2f} s, `python inference.py --help` "
             f"{startup['inference_help_s']:.2f} s (interpreter + imports; median of 3). Slowest packages imported "
             f"by `import inference` (-X importtime, each with what it imports): {imports}.",
             f"Audio: {files['source']}; reference {files['reference_seconds']} s. Config {Path(args.config).name}; "
             f"random weights. RTF = seconds / audio seconds (< 1: faster than real time). Ratios: > 1 is better "
             f"than the fp32 row of the same table. (a) is the median of {args.repeats} calls (up to 10 s of audio) "
             f"or {args.long_repeats} (longer) after {args.warmup} warm-up; (b) is one run per mixture, wall time "
             f"of the whole command. 'of conv peak': the network's rate over the best rate of one 5x5 "
             f"convolution of its shape (batch 1, the shortest mixture) in the same precision, this run.",
             roofline.peaks_line(peaks)]
    return (tables(results, args.durations, device.type == "cuda", peaks), notes,
            {"args": vars(args), "startup": startup, "results": results, "peaks": peaks})


if __name__ == "__main__":
    main()
