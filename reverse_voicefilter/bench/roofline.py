"""How far a figure is from what the machine can do: FLOP counts of VoiceFilter and measured peaks.

* :func:`voicefilter_flops`: floating-point operations of one forward pass, or one training step
  (forward and backward), at a given batch and number of frames. The convolutions and linear
  layers are counted by ``torch.utils.flop_counter.FlopCounterMode``; it has no formula for the
  LSTM kernels, so the bidirectional LSTM is added by hand (4 gates, input and recurrent
  products, both directions).
* :func:`measure_peaks`: the rates the machine reaches on the network's dominant operation alone,
  one 5 x 5 convolution of ``conv_channels`` channels over [batch, C, T, F] (fp32 and bf16, NCHW
  and channels_last), and a square matrix product (fp32, bf16). A variant's GFLOP/s divided by
  the peak of its precision is its roofline fraction: the figure that stays comparable between
  machines.
"""
from reverse_voicefilter.bench import common

MATMUL_SIZE = 2048
COUNT_FRAMES = 101
PEAKS = "peaks"  # the pseudo-variant that measures the peaks, in its own process like the others


def _lstm_flops(hp, batch, frames):
    """Forward FLOPs of the bidirectional LSTM: per frame, direction and gate, a product with the
    input and one with the hidden state (2 FLOP per multiply-add)."""
    from reverse_voicefilter.model.model import PROJ_CHANNELS

    hidden = hp.model.lstm_dim
    inputs = PROJ_CHANNELS * hp.audio.num_freq + hp.embedder.emb_dim
    return 2 * 4 * hidden * (inputs + hidden) * 2 * frames * batch


def voicefilter_flops(hp, batch, frames, training):
    """FLOPs of one forward pass (``training=False``) or one forward + backward (``True``).

    Every layer keeps the number of frames and works on each frame (or its neighbourhood) alike,
    so the count is linear in ``frames``: it is taken on COUNT_FRAMES frames and scaled, which
    keeps a 60 s input from allocating gigabytes just to be counted."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from reverse_voicefilter.model.model import VoiceFilter

    model = VoiceFilter(hp)
    mixed = torch.rand(1, COUNT_FRAMES, hp.audio.num_freq)
    dvec = torch.rand(1, hp.embedder.emb_dim)
    with FlopCounterMode(display=False) as counter:
        out = model(mixed, dvec)
        if training:
            out.sum().backward()
    lstm = _lstm_flops(hp, 1, COUNT_FRAMES) * (3 if training else 1)  # backward: about twice the forward
    return (counter.get_total_flops() + lstm) * batch * frames / COUNT_FRAMES


def _rate(fn, flops, device, repeats=5):
    times = common.time_call(fn, device, warmup=2, repeats=repeats)
    return flops / common.median(times) / 1e9


def conv_training_reference(device, channels, frames, freq, batch, precision):
    """``(fn, flops)``: forward and backward (input and weight gradients) of one 5 x 5 convolution of
    the network's shape, channels_last, in the step's precision (fp16 as bf16 on CPU).

    The benchmarks time it between a variant's steps, in the same process: on a shared or
    frequency-scaled CPU the rates of one operation differed threefold from one run to the next
    (reverse_voicefilter/bench/README.md), so a step is compared with what the convolution reached at the same time."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16,
             "fp16": torch.float16 if device.type == "cuda" else torch.bfloat16}[precision]
    fmt = torch.channels_last
    conv = torch.nn.Conv2d(channels, channels, 5, padding=2).to(device, dtype=dtype, memory_format=fmt)
    x = torch.rand(batch, channels, frames, freq, device=device, dtype=dtype).contiguous(memory_format=fmt)
    x.requires_grad_(True)
    grad = torch.ones_like(x)

    def fn():
        conv(x).backward(grad)
        conv.weight.grad = conv.bias.grad = x.grad = None

    return fn, 3 * 2 * channels * channels * 25 * frames * freq * batch


def native_bf16(device):
    """Whether bf16 runs here without PyTorch's emulation (a GPU, or a CPU whose oneDNN runs bf16
    convolutions: reverse_voicefilter.core.precision.cpu_runs_bf16)."""
    from reverse_voicefilter.core.precision import cpu_runs_bf16

    return device.type != "cpu" or cpu_runs_bf16()


def measure_peaks(device, channels, frames, freq, batch, bf16=True):
    """``{name: GFLOP/s}``: the 5 x 5 convolution in fp32/bf16 x NCHW/channels_last, and the matrix
    product in fp32/bf16 (bf16 left out where ``bf16`` is False: emulated, it would take minutes)."""
    import torch

    conv = torch.nn.Conv2d(channels, channels, 5, padding=2).to(device).eval()
    x = torch.rand(batch, channels, frames, freq, device=device)
    conv_flops = 2 * channels * channels * 25 * frames * freq * batch
    a = torch.rand(MATMUL_SIZE, MATMUL_SIZE, device=device)
    peaks = {}
    dtypes = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if bf16 else [])
    with torch.no_grad():
        for name, dtype in dtypes:
            for layout, fmt in (("", torch.contiguous_format), ("-cl", torch.channels_last)):
                c = conv.to(dtype=dtype, memory_format=fmt)
                xi = x.to(dtype=dtype).contiguous(memory_format=fmt)
                peaks[f"conv_{name}{layout}"] = _rate(lambda c=c, xi=xi: c(xi), conv_flops, device)
            ai = a.to(dtype)
            peaks[f"matmul_{name}"] = _rate(lambda ai=ai: ai @ ai, 2 * MATMUL_SIZE ** 3, device)
    return peaks


def conv_peak(peaks, precision):
    """The best convolution rate of a precision (either layout); fp16 is measured as bf16."""
    key = "bf16" if precision in ("bf16", "fp16") else "fp32"
    rates = [v for k, v in peaks.items() if k.startswith(f"conv_{key}")]
    return max(rates) if rates else None


def add_roofline(results, peaks, flops_key="flops", seconds_key="s_per_step", suffix=""):
    """Give each result ``gflops{suffix}`` (its achieved rate) and ``of_conv_peak{suffix}`` (that rate
    over the best convolution rate of its precision)."""
    for r in results.values():
        if "error" in r and not r.get("partial"):
            continue
        flops, seconds = r.get(flops_key), r.get(seconds_key)
        if not flops or not seconds:
            continue
        r[f"gflops{suffix}"] = flops / seconds / 1e9
        peak = conv_peak(peaks or {}, r.get("precision", "fp32"))
        if peak:
            r[f"of_conv_peak{suffix}"] = f"{100 * r[f'gflops{suffix}'] / peak:.0f} %"


def add_same_time_fraction(results):
    """Give each result with a step rate (``gflops``) and its reference convolution's forward and
    backward rate (``conv_train_gflops``, timed between its steps) ``of_conv_train``: the one over the
    other."""
    for r in results.values():
        if r.get("gflops") and r.get("conv_train_gflops"):
            r["of_conv_train"] = f"{100 * r['gflops'] / r['conv_train_gflops']:.0f} %"


def peaks_line(peaks):
    if not peaks:
        return "Machine peaks: not measured."
    parts = [f"{k.replace('_', ' ')} {v:.0f}" for k, v in peaks.items()]
    return "Machine peaks, GFLOP/s (one 5x5 convolution of the network's shape; a square matrix product): " + \
        ", ".join(parts) + "."
