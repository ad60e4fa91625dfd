"""Training throughput: seconds per optimizer step of ``training.steps.train_step`` (Adam, the
config's loss), on synthetic tensors of the training shapes, per precision and memory format.

Variants (each in a fresh process):

* ``fp32``            the baseline: d-vectors looked up from a precomputed table (what the
                      trainer does with its d-vector cache);
* ``fp32-cl``         fp32 with ``train.channels_last`` (channels_last conv stack);
* ``bf16``            ``train.precision bf16`` (autocast);
* ``bf16-cl``         bf16 and channels_last;
* ``fp32-dvec-step``  the original's way: every step, the log-mel (``Audio.get_mel``, numpy) of
                      8 reference recordings of 5 s and a forward pass of the original embedder
                      (``SpeechEmbedder``: 3-layer LSTM of 768, random weights: the cost does not
                      depend on them) per reference, one at a time as the original did (under
                      ``no_grad``: the original also built an unused autograd graph, so this is
                      a lower bound of its cost);
* ``fp16``            CUDA only (gradient scaler);
* ``bf16-cl-cudnn``   CUDA only: bf16-cl with ``torch.backends.cudnn.benchmark`` (cuDNN times its
                      convolution algorithms on the first step and keeps the fastest);
* ``bf16-cl-compile`` CUDA only: bf16-cl with the network under ``torch.compile`` (compiled during
                      the warm-up steps: give it ``--warmup 2`` or more).

The inputs are random: the speed of dense convolutions, an LSTM and Adam does not depend on
the values. Default size (config/default.yaml): 601 frequency bins, 3 s -> 301 frames, 64 conv
channels, batch 8.

Duration on the 2-core development CPU (AMD EPYC with AVX512-BF16): an fp32 step takes about
22 s and a bf16 step 12 s, so ``--steps 2`` (1 warm-up) runs all five variants in about 6
minutes, plus the reference convolution's forward and backward after each timed step (1-3 s in
bf16, up to 9 s in fp32). On a CPU whose oneDNN cannot run bf16 convolutions (AVX2 only) the
bf16 variants are left out: the trainer runs fp32 there (reverse_voicefilter.core.precision), and emulated bf16 took
about 800 s for one forward pass of a 3 s clip.
``--quick`` (config/tiny.yaml, 2 steps) takes 2-3 minutes.

    .venv/bin/python -m reverse_voicefilter.bench.train                       # default size, ~30 min on that CPU
    .venv/bin/python -m reverse_voicefilter.bench.train --quick               # a check that it works
    .venv/bin/python -m reverse_voicefilter.bench.train --device cuda --steps 20 --warmup 5
"""
import sys
import time
from pathlib import Path

from reverse_voicefilter.bench import common, roofline

VARIANTS = {  # name: (precision, channels_last, recompute d-vectors)
    "fp32": ("fp32", False, False),
    "fp32-cl": ("fp32", True, False),
    "bf16": ("bf16", False, False),
    "bf16-cl": ("bf16", True, False),
    "fp32-dvec-step": ("fp32", False, True),
    "fp16": ("fp16", False, False),
    "bf16-cl-cudnn": ("bf16", True, False),
    "bf16-cl-compile": ("bf16", True, False),
}
CUDA_ONLY = {"fp16", "bf16-cl-cudnn", "bf16-cl-compile"}
REFERENCE_SECONDS = 5.0
DVEC_TABLE = 1000  # precomputed d-vectors the cached variants look up from


def parse_args():
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="config (default config/default.yaml; --quick: config/tiny.yaml)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 3; --quick: 2)")
    common.add_allocator_flag(p, "as trainer.py with the config: reuse where train.keep_freed_memory is true")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    args = common.parse(p)
    args.config = args.config or str(common.PACKAGE / "config" / ("tiny.yaml" if args.quick else "default.yaml"))
    args.steps = args.steps or (2 if args.quick else 3)
    return args


def run_variant(args, name):
    import numpy as np
    import torch

    from reverse_voicefilter.core.audio import Audio
    from reverse_voicefilter.core.hparams import HParam
    from reverse_voicefilter.model.embedder import SpeechEmbedder
    from reverse_voicefilter.model.model import VoiceFilter
    from reverse_voicefilter.training.steps import make_loss, make_optimizer, train_step

    hp = HParam(args.config)
    common.set_allocator(args, "reuse" if hp.train.keep_freed_memory else "glibc")
    device = common.pick(args.device)
    if name == roofline.PEAKS:
        frames = 1 + int(hp.data.audio_len * hp.audio.sample_rate) // hp.audio.hop_length
        return roofline.measure_peaks(device, hp.model.conv_channels, frames, hp.audio.num_freq, args.batch_size,
                                      bf16=roofline.native_bf16(device))
    precision, channels_last, recompute = VARIANTS[name]
    hp.train.precision, hp.train.channels_last = precision, channels_last
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    batch, a = args.batch_size, hp.audio
    frames = 1 + int(hp.data.audio_len * a.sample_rate) // a.hop_length

    model = VoiceFilter(hp).to(device).train()
    optimizer = make_optimizer(hp, model.parameters())
    torch.backends.cudnn.benchmark = name.endswith("-cudnn")
    if name.endswith("-compile"):
        model = torch.compile(model)  # shares the parameters the optimizer holds
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_fn = make_loss(hp)
    mixed = torch.rand(batch, frames, a.num_freq)
    target = mixed * torch.rand(batch, frames, a.num_freq)
    dvec_table = torch.nn.functional.normalize(torch.randn(DVEC_TABLE, hp.embedder.emb_dim), dim=1)

    if recompute:
        audio = Audio(hp)
        embedder = SpeechEmbedder(hp).to(device).eval()
        refs = [rng.uniform(-0.5, 0.5, int(REFERENCE_SECONDS * a.sample_rate)).astype(np.float32)
                for _ in range(batch)]

    dvec_seconds, ref_times = [], []

    def step():
        if recompute:  # the original: mel and embedder forward per reference, every step
            start = time.perf_counter()
            with torch.no_grad():
                dvec = torch.stack([embedder(torch.from_numpy(audio.get_mel(w)).to(device)) for w in refs])
            common.synchronize(device)
            dvec_seconds.append(time.perf_counter() - start)
        else:  # the cache: a lookup of precomputed d-vectors
            dvec = dvec_table[torch.from_numpy(rng.integers(0, DVEC_TABLE, batch))]
        loss = train_step(model, (dvec, target, mixed), optimizer, scaler, loss_fn, device, precision)
        loss.item()  # the trainer reads the loss every step: a synchronization point

    def result(times):
        seconds = common.median(times)
        out = {"precision": precision, "channels_last": channels_last, "dvec_recomputed": recompute,
               "batch_size": batch, "frames": frames, "freq": a.num_freq, "steps": times, "s_per_step": seconds,
               "samples_per_s": batch / seconds, **common.process_stats(device)}
        if recompute:
            out["dvec_s_per_step"] = common.median(dvec_seconds[args.warmup:])
        if ref_times:
            out["conv_train_gflops"] = ref_flops / common.median(ref_times) / 1e9
        return out

    # the same convolution's forward + backward, timed after each step: the rate the step is held to
    ref_fn, ref_flops = roofline.conv_training_reference(device, hp.model.conv_channels, frames, a.num_freq,
                                                         batch, precision)
    ref_fn()  # its warm-up

    def after_step(times):
        ref_times.extend(common.time_call(ref_fn, device, warmup=0, repeats=1))
        common.emit_partial(result(times))

    times = common.time_call(step, device, warmup=args.warmup, repeats=args.steps, on_repeat=after_step)
    return result(times)


def main():
    args = parse_args()
    device = None if args.variant else common.pick(args.device)
    available = [n for n in VARIANTS if args.variant or device.type == "cuda" or n not in CUDA_ONLY]
    if not args.variant and not roofline.native_bf16(device):  # bf16 would run as fp32 or emulated
        available = [n for n in available if VARIANTS[n][0] == "fp32"]

    def before(device):
        print(f"training benchmark: {args.config}, batch {args.batch_size}, {args.warmup} warm-up + {args.steps} "
              f"timed steps per variant, timeout {args.timeout:g} s", file=sys.stderr)
        peaks = common.run_variants(__spec__.name, [roofline.PEAKS], common.child_argv(), args.timeout)[roofline.PEAKS]
        return None if "error" in peaks else peaks

    common.run_benchmark(__spec__.name, args, run_variant, available, "Training throughput",
                         lambda results, _, peaks, device: summarize(args, results, peaks, device), before=before)


def summarize(args, results, peaks, device):
    """The table, notes and JSON payload of the results so far."""
    from reverse_voicefilter.core.hparams import HParam

    hp = HParam(args.config)
    frames = 1 + int(hp.data.audio_len * hp.audio.sample_rate) // hp.audio.hop_length
    step_flops = roofline.voicefilter_flops(hp, args.batch_size, frames, training=True)
    for r in results.values():
        r["flops"] = step_flops
    roofline.add_roofline(results, peaks)
    roofline.add_same_time_fraction(results)
    columns = [("s/step", "s_per_step"), ("samples/s", "samples_per_s"), ("GFLOP/s", "gflops"),
               ("of conv peak", "of_conv_peak"), ("conv fwd+bwd GFLOP/s", "conv_train_gflops"),
               ("of conv fwd+bwd", "of_conv_train"), ("d-vector s/step", "dvec_s_per_step"),
               ("peak RSS MB", "peak_rss_mb"), ("load (1 min)", "load_1min")]
    if device.type == "cuda":
        columns.append(("CUDA peak MB", "cuda_peak_mb"))
    ratios = [("speed vs fp32", "s_per_step", False), ("memory vs fp32", "peak_rss_mb", False)]
    any_ok = next((r for r in results.values() if "error" not in r), {})
    shape = f"[{args.batch_size}, {any_ok.get('frames', '?')}, {any_ok.get('freq', '?')}]"
    notes = [f"Config {Path(args.config).name}, batch {shape}, median of {args.steps} steps after {args.warmup} "
             f"warm-up. Ratios: > 1 is better than fp32 (faster, less memory). fp32-dvec-step recomputes the "
             f"d-vectors each step with the original SpeechEmbedder (random weights), as the original trainer did; "
             f"the others look up cached d-vectors. A step is {step_flops / 1e12:.2f} TFLOP (forward and "
             f"backward); 'of conv peak' is the step's rate over the best rate of one 5x5 convolution of the "
             f"network's shape in the same precision on this machine, measured in the same run; 'conv fwd+bwd' is "
             f"that convolution's forward and backward (channels_last, the step's precision) timed after each "
             f"step in the variant's own process, and 'of conv fwd+bwd' the step's rate over it: the figure "
             f"that stays put where the machine's speed drifts.",
             roofline.peaks_line(peaks)]
    table = common.markdown_table(results, columns, ratios, baseline="fp32")
    return table, notes, {"args": vars(args), "results": results, "peaks": peaks}


if __name__ == "__main__":
    main()
