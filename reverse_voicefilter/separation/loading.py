"""Loading a trained VoiceFilter for separation: the checkpoint (refusing what is not one, in one
line), the config it runs with (-c, or the one stored in the checkpoint, with the keys where they
differ named), the network folded for inference, and the embedder: :func:`load_separator`."""
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from reverse_voicefilter.core.checkpoint import load_checkpoint, load_model_weights
from reverse_voicefilter.core.errors import UserError
from reverse_voicefilter.core.hparams import HParam, config_changes
from reverse_voicefilter.model.embedder import RESEMBLYZER, ResemblyzerEncoder, load_embedder
from reverse_voicefilter.model.model import VoiceFilter
from reverse_voicefilter.separation.separator import Separator

logger = logging.getLogger(__name__)


# Config sections a checkpoint's hp_str must agree with; audio.preemphasis and
# audio.power play no part at inference (power only shapes a training loss).
CHECKED_SECTIONS = ("audio", "model", "embedder")
IGNORED_KEYS = {"audio.preemphasis", "audio.power"}

@dataclass
class ModelSource:
    """Where a loaded model came from: the checkpoint, its step, its stored config (``hp_str``),
    and which config the run uses (``config``: the -c path, or "checkpoint")."""

    checkpoint: str
    step: object
    hp_str: str
    config: str


def config_mismatches(hp_str, hp):
    """Keys of the audio/model/embedder sections where a checkpoint's ``hp_str`` and ``hp``
    differ, as ``['model.lstm_dim: 400 in the checkpoint, 64 in -c', ...]``; [] when they agree
    or the checkpoint holds no readable config."""
    if not hp_str:
        return []
    try:
        changes = config_changes(hp_str, hp, CHECKED_SECTIONS)
    except UserError as err:
        logger.debug("cannot read the checkpoint's hp_str: %s", err)
        return []
    return [f"{k}: {old!r} in the checkpoint, {new!r} in -c" for k, old, new in changes if k not in IGNORED_KEYS]


# First bytes of files people pass by mistake where a checkpoint goes: torch.load's own
# message for them is useless (a WAV gives "pop from empty list").
_FILE_SIGNATURES = ((b"RIFF", "a WAV audio file"), (b"fLaC", "a FLAC audio file"), (b"OggS", "an Ogg audio file"),
                    (b"ID3", "an MP3 audio file"), (b"\x89PNG", "a PNG picture"), (b"%PDF", "a PDF document"),
                    (b"\x1f\x8b", "a gzip archive"))


def describe_non_checkpoint(path):
    """What a file is when it is plainly not a PyTorch file (audio, picture, text...), else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head:
        return "an empty file"
    if head.startswith((b"PK\x03\x04", b"\x80")):  # torch's zip format, or a legacy pickle
        return None
    for magic, what in _FILE_SIGNATURES:
        if head.startswith(magic):
            return what
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if all(c.isprintable() or c.isspace() for c in text):
        looks_yaml = any(line.rstrip().endswith(":") for line in text.splitlines())
        return "a text file (a YAML config? give that with -c)" if looks_yaml else "a text file"
    return None


def read_checkpoint(path, device="cpu"):
    """:func:`load_checkpoint`, with a file that is plainly no checkpoint named for what it is,
    and an embedder's weights given in the checkpoint's place recognised as such."""
    path = Path(path)
    what = describe_non_checkpoint(path) if path.is_file() else None
    if what:
        raise UserError(f"--checkpoint_path {path} is {what}, not a VoiceFilter checkpoint "
                        f"(chkpt_STEP.pt or best.pt from trainer.py)")
    state = load_checkpoint(path, map_location=device, mmap=True)  # the optimizer's state stays unread
    keys = set(state["model"])
    if any(k.startswith("proj.") for k in keys) and all(k.startswith(("lstm.", "proj.")) for k in keys):
        raise UserError(f"--checkpoint_path {path} holds a speaker embedder's weights, not a VoiceFilter "
                        f"checkpoint: give it with -e, and the trainer's checkpoint with --checkpoint_path")
    return state


def run_config(config_path, state, checkpoint_path):
    """The run's hyper-parameters: ``-c`` when given, else the config the checkpoint stores."""
    if config_path:
        return HParam(config_path)
    hp_str = state.get("hp_str")
    if not hp_str:
        raise UserError(f"checkpoint {checkpoint_path} stores no config (hp_str): pass the config it was "
                        f"trained with as -c")
    try:
        return HParam.from_string(hp_str)
    except UserError as err:
        raise UserError(f"cannot read the config stored in checkpoint {checkpoint_path} ({err}): pass the "
                        f"config it was trained with as -c") from None


def load_model(hp, checkpoint_path, device, channels_last=False, state=None):
    """A VoiceFilter on ``device`` with the checkpoint's weights, ready for inference
    (:meth:`VoiceFilter.for_inference`: batch norms folded; channels_last when asked for or
    when the config sets ``train.channels_last``). ``state``: the checkpoint, already read.

    A checkpoint that does not fit the config is a :class:`UserError` asking for
    the training config; a config that fits but differs from the checkpoint's
    own (hop length, embedder...) is logged as a warning.
    """
    if state is None:
        state = read_checkpoint(checkpoint_path, device)
    differences = config_mismatches(state.get("hp_str"), hp)
    with torch.device("meta"):  # no random initialisation of weights the checkpoint replaces
        model = VoiceFilter(hp)
    try:
        load_model_weights(model, state["model"], checkpoint_path, assign=True)
    except UserError as err:
        if differences:
            raise UserError(f"{err}; its stored config differs from -c in {'; '.join(differences[:4])}") from None
        raise
    if differences:
        logger.warning("checkpoint %s was trained with another config than -c (%s): pass the training "
                       "config for faithful results", checkpoint_path, "; ".join(differences))
    # float(): the checkpoint's tensors are taken as they are (assign), so fp16/bf16 ones become fp32 here
    return model.float().to(device).for_inference(channels_last)


def load_separator(hp, checkpoint_path, embedder_spec, device, channels_last=False, config_path=None,
                   **options):
    """Model and embedder from files -> :class:`Separator` (``options`` go to its constructor).

    ``hp`` None: the config is ``config_path`` (-c) when given, else the one stored in the
    checkpoint. ``separator.source`` (:class:`ModelSource`) says which.
    """
    started = time.perf_counter()
    ready = device_ready_seconds(device)
    marks = [("device", ready)]
    clock = time.perf_counter()
    state = read_checkpoint(checkpoint_path, device)
    if hp is not None or config_path:
        hp = hp if hp is not None else run_config(config_path, state, checkpoint_path)
        config = str(config_path or getattr(hp, "path", None) or "given")
    else:
        hp, config = run_config(None, state, checkpoint_path), "checkpoint"
    model = load_model(hp, checkpoint_path, device, channels_last, state=state)
    marks.append(("model", time.perf_counter() - clock))
    clock = time.perf_counter()
    embedder = load_embedder(embedder_spec, hp, device)
    marks.append(("embedder", time.perf_counter() - clock))
    source = ModelSource(str(checkpoint_path), state.get("step"), state.get("hp_str") or "", config)
    separator = Separator(hp, model, embedder, device, source=source, **options)
    logger.info("model: %s (step %s, config from %s), embedder %s, on %s, %s; loaded in %.1f s (%s)", checkpoint_path,
                state.get("step", "?"), "the checkpoint" if config == "checkpoint" else config, embedder.name,
                device, separator.precision, time.perf_counter() - started,
                ", ".join(f"{name} {seconds:.2f} s" for name, seconds in marks))
    return separator


def device_ready_seconds(device):
    """Seconds to make ``device`` ready for its first tensor: on a GPU the CUDA context and its libraries
    (seconds, paid once per process; timed apart so that ``-v`` shows it), nothing on a CPU."""
    if device.type != "cuda":
        return 0.0
    started = time.perf_counter()
    torch.zeros(1, device=device)
    torch.cuda.synchronize(device)
    return time.perf_counter() - started


def embedder_window_seconds(embedder, hp):
    """The span one d-vector window covers: a reference shorter than it gives a poor d-vector."""
    if embedder.kind == RESEMBLYZER:
        return ResemblyzerEncoder.PARTIAL_FRAMES * ResemblyzerEncoder.HOP / ResemblyzerEncoder.SAMPLE_RATE
    return hp.embedder.window * hp.audio.hop_length / hp.audio.sample_rate
