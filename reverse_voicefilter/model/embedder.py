"""Speaker encoders that turn a reference recording into a d-vector.

Two are supported behind one interface (:func:`load_embedder`):

* ``SpeechEmbedder``: the original's GE2E LSTM, loaded from an
  ``embedder.pt`` in the original key layout (``lstm.*``,
  ``proj.linear_layer.*``); input the log10 mel of ``Audio.get_mel``.
* ``ResemblyzerEncoder``: the pretrained GE2E encoder that ships inside the
  ``resemblyzer`` pip package, so a user without the original file has a
  working d-vector offline. Only its weights file is read (safely); its
  Python module is not imported (it needs setuptools' pkg_resources through
  webrtcvad, and this project trims silence itself). A file in resemblyzer's
  own format (``{step, model_state}``, what embedder_trainer.py writes for this
  architecture) loads the same way, sized from its weights.

Both give a d-vector per reference waveform (256-dim for the published weights).
"""
import hashlib
import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from reverse_voicefilter.core.audio import Audio, mel_basis
from reverse_voicefilter.core.checkpoint import state_dict_mismatch
from reverse_voicefilter.core.errors import UserError

logger = logging.getLogger(__name__)

RESEMBLYZER = "resemblyzer"


class LinearNorm(nn.Module):
    def __init__(self, hp):
        super().__init__()
        self.linear_layer = nn.Linear(hp.embedder.lstm_hidden, hp.embedder.emb_dim)

    def forward(self, x):
        return self.linear_layer(x)


class SpeechEmbedder(nn.Module):
    """The original GE2E d-vector network."""

    def __init__(self, hp):
        super().__init__()
        self.hp = hp
        self.lstm = nn.LSTM(hp.embedder.num_mels, hp.embedder.lstm_hidden,
                            num_layers=hp.embedder.lstm_layers, batch_first=True)
        self.proj = LinearNorm(hp)

    def _window_embeddings(self, windows):
        # windows: [W, window, num_mels] -> L2-normalized [W, emb_dim]
        x, _ = self.lstm(windows)
        x = self.proj(x[:, -1, :])  # last frame only
        return x / torch.norm(x, p=2, dim=1, keepdim=True)

    def embed_frames(self, mels):
        """Equal-length mels [B, num_mels, T] -> d-vectors [B, emb_dim], each the mean of its windows'
        unit vectors as in :meth:`forward` (the batched form embedder_trainer.py trains through)."""
        e = self.hp.embedder
        windows = mels.unfold(2, e.window, e.stride).permute(0, 2, 3, 1)  # [B, W, window, num_mels]
        b, w = windows.shape[:2]
        return self._window_embeddings(windows.reshape(b * w, e.window, -1)).reshape(b, w, -1).mean(1)

    def forward(self, mel):
        """mel [num_mels, T] -> d-vector [emb_dim]: mean of per-window unit vectors."""
        e = self.hp.embedder
        windows = mel.unfold(1, e.window, e.stride).permute(1, 2, 0)  # [W, window, num_mels]
        return self._window_embeddings(windows).mean(0)

    def forward_batch(self, mels):
        """A list of mels [num_mels, T_i] -> d-vectors [B, emb_dim], all windows in one LSTM call."""
        e = self.hp.embedder
        windows = [m.unfold(1, e.window, e.stride).permute(1, 2, 0) for m in mels]
        counts = torch.tensor([w.size(0) for w in windows], device=mels[0].device)
        emb = self._window_embeddings(torch.cat(windows))
        owner = torch.repeat_interleave(torch.arange(len(windows), device=emb.device), counts)
        sums = torch.zeros(len(windows), emb.size(1), device=emb.device, dtype=emb.dtype).index_add_(0, owner, emb)
        return sums / counts.unsqueeze(1).to(emb.dtype)


class ResemblyzerEncoder(nn.Module):
    """The GE2E encoder of the resemblyzer package (3-layer LSTM 40->256, linear 256->256).

    The sizes are arguments so that embedder_trainer.py can train smaller ones; the defaults
    are the package's, whose weights this shape loads.
    """

    SAMPLE_RATE = 16000
    HOP = 160                # 10 ms
    N_FFT = 400              # 25 ms
    PARTIAL_FRAMES = 160     # 1.6 s per partial utterance
    RATE = 1.3               # partials per second
    MIN_COVERAGE = 0.75
    TARGET_DBFS = -30.0

    NUM_MELS = 40

    def __init__(self, hidden=256, layers=3, emb_dim=256):
        super().__init__()
        self.lstm = nn.LSTM(self.NUM_MELS, hidden, layers, batch_first=True)
        self.linear = nn.Linear(hidden, emb_dim)
        self._mel_basis = torch.from_numpy(mel_basis(self.SAMPLE_RATE, self.N_FFT, self.NUM_MELS).copy())

    def forward(self, mels):
        """mels [P, frames, 40] -> unit embeddings [P, 256]."""
        _, (hidden, _) = self.lstm(mels)
        x = torch.relu(self.linear(hidden[-1]))
        return x / torch.norm(x, dim=1, keepdim=True)

    def partial_slices(self, n_samples):
        """Frame ranges of the partial utterances, as resemblyzer's ``compute_partial_slices``."""
        n_frames = int(np.ceil((n_samples + 1) / self.HOP))
        step = int(np.round((self.SAMPLE_RATE / self.RATE) / self.HOP))
        starts = list(range(0, max(1, n_frames - self.PARTIAL_FRAMES + step + 1), step))
        last = starts[-1] * self.HOP
        coverage = (n_samples - last) / (self.PARTIAL_FRAMES * self.HOP)
        if coverage < self.MIN_COVERAGE and len(starts) > 1:
            starts = starts[:-1]
        return starts

    def mel_frames(self, wav):
        """wav [N] (or [B, N]) tensor -> power mel frames [T, 40] (or [B, T, 40]), as resemblyzer's
        ``wav_to_mel_spectrogram``."""
        D = torch.stft(wav, n_fft=self.N_FFT, hop_length=self.HOP, window=torch.hann_window(self.N_FFT,
                       device=wav.device), center=True, pad_mode="constant", return_complex=True)
        return (self._mel_basis.to(wav.device) @ (D.real ** 2 + D.imag ** 2)).transpose(-1, -2)

    @classmethod
    def normalize_volume(cls, wav):
        """wav [N] -> wav [N] raised to TARGET_DBFS when quieter, as resemblyzer's preprocessing."""
        rms = torch.sqrt(torch.mean(wav ** 2))
        gain_db = cls.TARGET_DBFS - 20 * torch.log10(torch.clamp(rms, min=1e-10))
        if gain_db > 0:  # resemblyzer only raises quiet recordings
            wav = wav * 10 ** (gain_db / 20)
        return wav

    def partial_mels(self, wav):
        """wav [N] -> [P, PARTIAL_FRAMES, 40], volume-normalized and zero-padded like resemblyzer."""
        wav = self.normalize_volume(wav)
        starts = self.partial_slices(wav.numel())
        needed = (starts[-1] + self.PARTIAL_FRAMES) * self.HOP
        if needed >= wav.numel():
            wav = torch.nn.functional.pad(wav, (0, needed - wav.numel()))
        mel = self.mel_frames(wav)
        return torch.stack([mel[s:s + self.PARTIAL_FRAMES] for s in starts])


class DvecEmbedder:
    """A frozen speaker encoder on one device: waveforms in, d-vectors out.

    ``name`` identifies the weights (used as a cache key for d-vectors).
    """

    def __init__(self, kind, net, audio, device, name):
        self.kind, self.net, self.audio, self.device, self.name = kind, net, audio, device, name
        self.net.to(device).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    @property
    def emb_dim(self):
        return self.net.linear.out_features if self.kind == RESEMBLYZER else self.net.hp.embedder.emb_dim

    @torch.inference_mode()
    def embed(self, wav):
        """One waveform (numpy [N], 16 kHz) -> d-vector [E] (float32 tensor on the device)."""
        return self.embed_many([wav])[0]

    @torch.inference_mode()
    def embed_many(self, wavs):
        """A list of waveforms -> d-vectors [B, E], batched through the LSTM."""
        tensors = [torch.as_tensor(np.asarray(w, dtype=np.float32), device=self.device) for w in wavs]
        if self.kind == RESEMBLYZER:
            partials = [self.net.partial_mels(w) for w in tensors]
            counts = [p.size(0) for p in partials]
            emb = self.net(torch.cat(partials)).split(counts)
            out = torch.stack([e.mean(0) for e in emb])
            return out / torch.norm(out, dim=1, keepdim=True)
        window = self.net.hp.embedder.window
        mels = [self.audio.get_mel_torch(w) for w in tensors]
        short = [i for i, m in enumerate(mels) if m.size(1) < window]
        if short:
            needed = (window - 1) * self.audio.hp.audio.hop_length
            raise UserError(f"reference audio is too short for the embedder: it needs at least "
                            f"{needed / self.audio.hp.audio.sample_rate:.2f} s")
        return self.net.forward_batch(mels)


def resemblyzer_weights_path():
    spec = importlib.util.find_spec(RESEMBLYZER)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the resemblyzer package is not installed (pip install resemblyzer==0.1.4), "
                        "or pass -e with an original embedder.pt")
    path = Path(list(spec.submodule_search_locations)[0]) / "pretrained.pt"
    if not path.is_file():
        raise UserError(f"resemblyzer is installed but its weights are missing: {path}")
    return path


def _file_digest(path):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _load_state(path, what):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure means the file is not usable weights
        raise UserError(f"cannot load {what} {path}: {str(err).splitlines()[0]}") from None
    return state


def _check_state(state, net, path):
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not an embedder state_dict (expected a dict of tensors "
                        f"with keys lstm.* and proj.linear_layer.*)")
    mismatch = state_dict_mismatch(net, state)
    if mismatch and mismatch[0] == "keys":
        raise UserError(f"{path} does not hold the original embedder's keys "
                        f"(missing: {mismatch[1]}, unexpected: {mismatch[2]})")
    if mismatch:
        _, key, in_file, in_model = mismatch
        raise UserError(f"{path}: {key} has shape {in_file} but the config's embedder "
                        f"section expects {in_model} (check embedder.lstm_hidden/emb_dim)")


def resemblyzer_from_state(model_state, path):
    """A :class:`ResemblyzerEncoder` sized from, and loaded with, a resemblyzer-format ``model_state``
    (``lstm.*``, ``linear.*``; the GE2E loss's ``similarity_*`` are not part of the encoder)."""
    state = {k: v for k, v in model_state.items() if not k.startswith("similarity")}
    try:
        hidden, layers = state["lstm.weight_hh_l0"].shape[1], sum(k.startswith("lstm.weight_hh_l") for k in state)
        net = ResemblyzerEncoder(hidden=hidden, layers=layers, emb_dim=state["linear.weight"].shape[0])
        net.load_state_dict(state)
    except (KeyError, RuntimeError, AttributeError, IndexError) as err:
        raise UserError(f"{path} holds a 'model_state' but not a resemblyzer encoder's "
                        f"(lstm.*, linear.*): {str(err).splitlines()[0]}") from None
    return net


def resemblyzer_format(net, step, similarity=None):
    """The file resemblyzer's own ``VoiceEncoder(weights_fpath=...)`` reads: ``{step, model_state}``,
    the GE2E ``similarity_weight``/``similarity_bias`` included when given (its pretrained file has them)."""
    model_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    if similarity is not None:
        model_state = {"similarity_weight": similarity[0].detach().cpu().reshape(1).clone(),
                       "similarity_bias": similarity[1].detach().cpu().reshape(1).clone(), **model_state}
    return {"step": int(step), "model_state": model_state}


def load_embedder(spec, hp, device="cpu"):
    """``spec`` is the word ``resemblyzer`` or a path to an embedder file: the original's bare
    state_dict (``lstm.*``, ``proj.linear_layer.*``) or resemblyzer's ``{step, model_state}``
    (what embedder_trainer.py writes for its resemblyzer-shaped encoder)."""
    device = torch.device(device)
    audio = Audio(hp)
    if str(spec).lower() == RESEMBLYZER:
        if hp.embedder.emb_dim != 256:
            raise UserError(f"the resemblyzer encoder gives 256-dim d-vectors but embedder.emb_dim is "
                            f"{hp.embedder.emb_dim}")
        path = resemblyzer_weights_path()
        checkpoint = _load_state(path, "the resemblyzer weights")
        net = ResemblyzerEncoder()
        net.load_state_dict({k: v for k, v in checkpoint["model_state"].items() if not k.startswith("similarity")})
        return DvecEmbedder(RESEMBLYZER, net, audio, device, f"resemblyzer-{_file_digest(path)}")
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"embedder file not found: {path} (or use -e resemblyzer)")
    state = _load_state(path, "embedder")
    if isinstance(state, dict) and isinstance(state.get("model_state"), dict):
        net = resemblyzer_from_state(state["model_state"], path)
        if net.linear.out_features != hp.embedder.emb_dim:
            raise UserError(f"{path} gives {net.linear.out_features}-dim d-vectors but embedder.emb_dim is "
                            f"{hp.embedder.emb_dim}")
        return DvecEmbedder(RESEMBLYZER, net, audio, device, f"resemblyzer-format-{_file_digest(path)}")
    net = SpeechEmbedder(hp)
    _check_state(state, net, path)
    net.load_state_dict(state)
    return DvecEmbedder("ge2e", net, audio, device, f"ge2e-{_file_digest(path)}")
