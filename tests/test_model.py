import numpy as np
import pytest
import torch

from reverse_voicefilter.core.checkpoint import load_checkpoint, load_model_weights, save_checkpoint
from reverse_voicefilter.core.errors import UserError
from reverse_voicefilter.core.hparams import HParam
from reverse_voicefilter.model.model import VoiceFilter, count_parameters

ORIGINAL_KEYS = {f"conv.{i}" for i in (1, 5, 9, 13, 17, 21, 25, 28)} | {
    f"conv.{i}" for i in (2, 6, 10, 14, 18, 22, 26, 29)}


def test_default_model_has_the_original_size_and_names():
    model = VoiceFilter(HParam())
    assert round(count_parameters(model) / 1e6, 1) == 18.9
    prefixes = {k.rsplit(".", 1)[0] for k in model.state_dict() if k.startswith("conv.")}
    assert prefixes == ORIGINAL_KEYS
    assert {"lstm.weight_ih_l0", "lstm.weight_hh_l0_reverse", "fc1.weight", "fc2.bias"} <= set(model.state_dict())


@pytest.mark.parametrize("batch, frames", [(1, 50), (3, 101)])
def test_forward_shapes_and_range(batch, frames):
    hp = HParam("config/tiny.yaml")
    model = VoiceFilter(hp).eval()
    with torch.no_grad():
        mask = model(torch.rand(batch, frames, 257), torch.randn(batch, 256))
    assert mask.shape == (batch, frames, 257)
    assert float(mask.min()) >= 0 and float(mask.max()) <= 1


def _plain_and_channels_last(training):
    """Two tiny models with the same weights, NCHW and channels_last, in train or eval mode."""
    hp = HParam("config/tiny.yaml")
    hp.train.channels_last = False
    torch.manual_seed(0)
    plain = VoiceFilter(hp).train(training)
    hp.train.channels_last = True
    fast = VoiceFilter(hp).train(training)
    fast.load_state_dict(plain.state_dict())
    return plain, fast


def test_channels_last_gives_the_same_mask(tmp_path):
    plain, fast = _plain_and_channels_last(training=False)
    x, d = torch.rand(2, 40, 257), torch.randn(2, 256)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, d), plain(x, d), atol=1e-5, rtol=1e-5)


def _conv_output_formats(model, x, d, dtype=None):
    """Memory format of each convolution's output in one training forward + backward."""
    formats = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: formats.append(
        "channels_last" if not out.is_contiguous() and out.is_contiguous(memory_format=torch.channels_last)
        else "nchw")) for m in model.conv if isinstance(m, torch.nn.Conv2d)]
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(x, d)
    out.float().sum().backward()
    for h in hooks:
        h.remove()
    return formats


def test_channels_last_training_runs_the_convolutions_channels_last():
    # the one-channel input alone is NCHW and channels_last at once: without channels_last
    # weights every convolution of a "channels_last" training ran in NCHW
    hp = HParam("config/tiny.yaml")
    hp.train.channels_last = True
    torch.manual_seed(0)
    model = VoiceFilter(hp).train()
    x, d = torch.rand(2, 20, 257), torch.randn(2, 256)
    assert _conv_output_formats(model, x, d) == ["channels_last"] * 8
    assert _conv_output_formats(model, x, d, torch.bfloat16) == ["channels_last"] * 8
    assert model.conv[9].weight.grad.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_training_gives_the_nchw_gradients():
    # Within 3 % (relative L2 per parameter), not float rounding: PyTorch's channels_last batch
    # norm gathers its batch statistics less precisely than the NCHW kernel (measured 5e-4
    # relative output error against 8e-6 for inputs of mean 5 and spread 0.1), and the random
    # network's backward, through 8 batch norms, amplifies that to ~1 %. A layout mix-up
    # (weights or features in the wrong order) is off by 100 %.
    plain, fast = _plain_and_channels_last(training=True)
    x, d = torch.rand(2, 30, 257), torch.randn(2, 256)
    torch.testing.assert_close(fast(x, d), plain(x, d), atol=1e-5, rtol=1e-5)
    plain(x, d).square().mean().backward()
    fast(x, d).square().mean().backward()
    before_norm = {f"conv.{i}.bias" for i in (1, 5, 9, 13, 17, 21, 25, 28)}  # zero gradient up to rounding
    for (name, p), q in zip(plain.named_parameters(), fast.parameters(), strict=True):
        if name not in before_norm:
            assert (q.grad - p.grad).norm() <= 0.03 * p.grad.norm(), name


def test_bf16_training_keeps_the_lstm_in_fp32_and_inference_does_not():
    # oneDNN's bf16 LSTM backward is several times slower than fp32 on CPU; its forward is faster
    hp = HParam("config/tiny.yaml")
    model = VoiceFilter(hp)
    seen = []
    model.lstm.register_forward_hook(lambda _m, _i, out: seen.append(out[0].dtype))
    x, d = torch.rand(1, 20, 257), torch.randn(1, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.train()(x, d).float().sum().backward()
        with torch.no_grad():
            model.eval()(x, d)
    assert seen == [torch.float32, torch.bfloat16]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("channels_last", [False, True])
def test_inference_network_folds_batch_norms_and_keeps_the_mask(channels_last):
    hp = HParam("config/tiny.yaml")
    hp.train.channels_last = False  # the layout comes from for_inference's argument alone
    torch.manual_seed(0)
    plain = VoiceFilter(hp)
    for module in plain.modules():  # trained-looking statistics, so that folding has work to do
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.2, 3.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.3)
    plain.eval()
    fast = VoiceFilter(hp)
    fast.load_state_dict(plain.state_dict())
    fast.for_inference(channels_last)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert not fast.training and fast.channels_last == channels_last
    x, d = torch.rand(2, 40, 257), torch.randn(2, 256)
    with torch.no_grad():
        expected = plain(x, d)
        assert (expected - 0.5).abs().max() > 0.01  # not a trivially flat mask
        torch.testing.assert_close(fast(x, d), expected, atol=1e-5, rtol=1e-5)


def test_original_checkpoint_loads_safely_and_gives_the_original_mask(parity_dir):
    hp = HParam(parity_dir / "config.yaml")
    state = load_checkpoint(parity_dir / "chkpt.pt")
    assert {"model", "optimizer", "step", "hp_str"} <= set(state) and state["step"] == 3
    model = VoiceFilter(hp).eval()
    model.load_state_dict(state["model"])  # unchanged original names
    mag = torch.from_numpy(np.load(parity_dir / "mixed_mag.npy"))[None]
    dvec = torch.from_numpy(np.load(parity_dir / "dvec.npy"))[None]
    with torch.no_grad():
        mask = model(mag, dvec)[0].numpy()
    assert np.abs(mask - np.load(parity_dir / "mask.npy")).max() < 1e-3
    with torch.no_grad():
        folded = model.for_inference(channels_last=True)(mag, dvec)[0].numpy()
    assert np.abs(folded - np.load(parity_dir / "mask.npy")).max() < 1e-3


def test_checkpoint_round_trip_and_errors(tmp_path):
    hp = HParam("config/tiny.yaml")
    model = VoiceFilter(hp)
    path = save_checkpoint({"model": model.state_dict(), "step": 7, "hp_str": hp.hp_str}, tmp_path / "c.pt")
    state = load_checkpoint(path)
    other = VoiceFilter(hp)
    load_model_weights(other, state["model"], path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, other.state_dict()[key])
    with pytest.raises(UserError, match="pass the same -c"):
        load_model_weights(VoiceFilter(HParam()), state["model"], path)
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(UserError, match="cannot load checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError):
        load_checkpoint(truncated)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": Evil()}, path)
    with pytest.raises(UserError, match="cannot load"):
        load_checkpoint(path)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_conv_relu_equals_relu_of_the_convolution(dtype, channels_last):
    from reverse_voicefilter.model.model import ConvReLU

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, (5, 5), dilation=(2, 1), padding=(4, 2)).eval()
    fused = ConvReLU(conv)
    x = torch.randn(2, 8, 30, 257)
    if channels_last:
        conv.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        expected, got = torch.relu(conv(x)), fused(x)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        trainable = fused(x.requires_grad_())  # with gradients: the differentiable path
    trainable.float().sum().backward()
    assert x.grad is not None


def test_the_inference_network_fuses_every_relu_of_the_conv_stack():
    from reverse_voicefilter.model.model import ConvReLU

    fast = VoiceFilter(HParam("config/tiny.yaml")).for_inference()
    assert sum(isinstance(m, ConvReLU) for m in fast.conv) == 8
    assert not any(isinstance(m, (torch.nn.ReLU, torch.nn.BatchNorm2d)) for m in fast.conv)


def test_film_starts_as_the_original_network_and_learns():
    """model.film: zero-initialized, the network computes what it computes without it; its parameters
    are new (film.N.*) and get gradients; off, the state dict is the original's."""
    hp = HParam("config/tiny.yaml")
    torch.manual_seed(0)
    plain = VoiceFilter(hp)
    assert not any(k.startswith("film") for k in plain.state_dict())
    hp.model.film = True
    torch.manual_seed(0)
    film = VoiceFilter(hp)
    film.load_state_dict(plain.state_dict(), strict=False)
    x, d = torch.rand(2, 30, 257), torch.randn(2, 256)
    with torch.no_grad():
        assert torch.equal(film.eval()(x, d), plain.eval()(x, d))
    film.train()(x, d).square().mean().backward()
    assert all(layer.weight.grad.abs().sum() > 0 for layer in film.film)


def test_in_place_relus_give_the_same_gradients_bit_for_bit():
    hp = HParam("config/tiny.yaml")
    torch.manual_seed(0)
    model = VoiceFilter(hp).train()
    assert [m.inplace for m in model.conv if isinstance(m, torch.nn.ReLU)] == [True] * 8
    copy = VoiceFilter(hp).train()
    copy.load_state_dict(model.state_dict())
    for module in copy.conv:
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
    x, d = torch.rand(2, 40, 257), torch.randn(2, 256)
    for net in (model, copy):
        net(x, d).square().mean().backward()
    for (name, a), b in zip(model.named_parameters(), copy.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name
