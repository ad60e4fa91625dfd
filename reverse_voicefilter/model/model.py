"""The VoiceFilter masking network (Wang et al. 2018), as the original built it.

Parameter names match the original's checkpoints (``conv.1.weight`` ...,
``lstm.*``, ``fc1.*``, ``fc2.*``), so ``load_state_dict`` takes them unchanged.
The original padded with separate ``ZeroPad2d`` layers; here each convolution
pads itself (the same zeros, one copy less) and the pad slots hold
``nn.Identity`` so that the ``nn.Sequential`` indices stay the original's.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from reverse_voicefilter.core.precision import cpu_runs_bf16

# (kernel, time dilation) of cnn1..cnn7; cnn8 is a 1x1 projection to 8 channels.
_CONV_LAYOUT = [((1, 7), 1), ((7, 1), 1), ((5, 5), 1), ((5, 5), 2), ((5, 5), 4), ((5, 5), 8), ((5, 5), 16)]
PROJ_CHANNELS = 8


def _fused_conv_relu(x, conv, dtype):
    """relu(conv(x)) in one oneDNN call, in ``dtype``."""
    c = conv
    weight, bias = c.weight.to(dtype), None if c.bias is None else c.bias.to(dtype)
    return torch.ops.mkldnn._convolution_pointwise(x.to(dtype), weight, bias, list(c.padding), list(c.stride),
                                                   list(c.dilation), c.groups, "relu", [], "")


class ConvReLU(nn.Module):
    """relu(conv(x)) for inference, in one oneDNN call on CPU (the ReLU applied as the
    convolution writes its output: one pass over the activations less per layer, measured
    6-8 % of a dilated 5x5 layer's time; the same values). Autocast is applied by hand, as
    for ``nn.Conv2d``: the fused call is not on autocast's lists. In bf16 the fused call is
    made only where oneDNN runs bf16 convolutions (:func:`reverse_voicefilter.core.precision.cpu_runs_bf16`);
    elsewhere the plain convolution runs (oneDNN refuses the fused one there)."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        c = self.conv
        fusable = (x.device.type == "cpu" and torch.backends.mkldnn.is_available() and isinstance(c.padding, tuple)
                   and c.padding_mode == "zeros" and not torch.is_grad_enabled())
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if not fusable or (dtype == torch.bfloat16 and not cpu_runs_bf16()) or \
                dtype not in (torch.float32, torch.bfloat16):
            return F.relu(c(x))
        return _fused_conv_relu(x, c, dtype)


def _same_padding(kernel, dilation):
    return ((kernel[0] - 1) * dilation // 2, (kernel[1] - 1) // 2)


class VoiceFilter(nn.Module):
    """Mask estimator: ``forward(mag [B, T, F], dvec [B, E]) -> mask [B, T, F]`` in [0, 1]."""

    def __init__(self, hp):
        super().__init__()
        num_freq = hp.audio.num_freq
        assert hp.audio.n_fft // 2 + 1 == num_freq == hp.model.fc2_dim, "stft-related dimension mismatch"
        width = hp.model.conv_channels
        layers = []
        in_ch = 1
        for kernel, dilation in _CONV_LAYOUT:
            layers += [
                nn.Identity(),  # the original's ZeroPad2d slot
                nn.Conv2d(in_ch, width, kernel_size=kernel, dilation=(dilation, 1),
                          padding=_same_padding(kernel, dilation)),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            in_ch = width
        # cnn8 had no pad layer in the original, hence indices 28/29.
        layers += [nn.Conv2d(width, PROJ_CHANNELS, kernel_size=(1, 1)), nn.BatchNorm2d(PROJ_CHANNELS),
                   nn.ReLU(inplace=True)]
        # In-place ReLUs: batch norm's backward reads its input, not its output, so the ReLU may
        # overwrite the output; one activation buffer less per block, the same gradients bit for
        # bit, and a tiny training step about 5 % faster on a CPU.
        self.conv = nn.Sequential(*layers)
        # FiLM (model.film, off by default): the d-vector scales and shifts each block's output, so
        # the speaker conditions the convolutions too, not only the LSTM's input. Zero-initialized:
        # the network starts as the original. New parameters (film.N.*), present only when on.
        self.film = nn.ModuleList(nn.Linear(hp.embedder.emb_dim, 2 * width) for _ in _CONV_LAYOUT) \
            if hp.model.get("film", False) else None
        if self.film is not None:
            for layer in self.film:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.lstm = nn.LSTM(PROJ_CHANNELS * num_freq + hp.embedder.emb_dim, hp.model.lstm_dim,
                            batch_first=True, bidirectional=True)
        self.fc1 = nn.Linear(2 * hp.model.lstm_dim, hp.model.fc1_dim)
        self.fc2 = nn.Linear(hp.model.fc1_dim, hp.model.fc2_dim)
        self.channels_last = bool(hp.train.get("channels_last", False))
        if self.channels_last:
            # The weights decide: the input [B, 1, T, F] has one channel, so it is NCHW and
            # channels_last at once, and with NCHW weights every convolution (and its backward)
            # ran in NCHW. Channels_last weights make oneDNN keep the whole stack channels_last.
            self.conv.to(memory_format=torch.channels_last)

    def forward(self, x, dvec):
        # x: [B, T, F] -> [B, 1, T, F]
        x = x.unsqueeze(1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.conv(x) if self.film is None else self._conv_with_film(x, dvec)
        # [B, 8, T, F] -> [B, T, 8 * F]; the LSTM wants channel-major features per frame
        x = x.transpose(1, 2).reshape(x.size(0), x.size(2), -1)
        dvec = dvec.to(x.dtype).unsqueeze(1).expand(-1, x.size(1), -1)
        x = torch.cat((x, dvec), dim=2)  # [B, T, 8 * F + E]
        x = self._blstm(x)  # [B, T, 2 * lstm_dim]
        x = self.fc1(F.relu(x))
        x = self.fc2(F.relu(x))  # [B, T, F]
        return torch.sigmoid(x)

    def _conv_with_film(self, x, dvec):
        """The conv stack with each block's output (after its ReLU slot, index 4k + 3) modulated:
        x * (1 + gamma) + beta, (gamma, beta) = film[k](dvec) per channel."""
        for i, layer in enumerate(self.conv):
            x = layer(x)
            block, slot = divmod(i, 4)
            if slot == 3 and block < len(self.film):
                gamma, beta = self.film[block](dvec.to(x.dtype)).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
                x = x * (1 + gamma) + beta
        return x

    def _blstm(self, x):
        if self.training and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # oneDNN's bf16 LSTM backward is far slower than its fp32 one on CPU: forward +
            # backward of the default BLSTM, batch 2, measured 4.1 s bf16 against 0.76 s fp32
            # (AMD EPYC, AVX512-BF16, no AMX; not measured on AMX), a third of a bf16 training
            # step. Forward only (inference) bf16 is the faster one, so only training leaves
            # autocast here.
            with torch.autocast("cpu", enabled=False):
                return self.lstm(x.float())[0]
        return self.lstm(x)[0]

    def for_inference(self, channels_last=False):
        """Eval mode with each batch norm folded into its convolution and the ReLU after it fused
        into the convolution's call (:class:`ConvReLU`; two passes over the activations less per
        layer; the masks agree with the unfolded network to float rounding), in channels_last
        memory format when asked for or when the config set ``train.channels_last``. Done after
        loading weights: the folded network has no batch-norm parameters and cannot be trained
        further."""
        self.eval()
        layers = list(self.conv)
        for i, (conv, norm, relu) in enumerate(zip(layers, layers[1:], layers[2:], strict=False)):
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and isinstance(relu, nn.ReLU):
                self.conv[i] = ConvReLU(fuse_conv_bn_eval(conv, norm))
                self.conv[i + 1], self.conv[i + 2] = nn.Identity(), nn.Identity()
        self.channels_last = self.channels_last or bool(channels_last)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        return self


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
