"""The procedure behind ``embedder_trainer.py``: GE2E training of a speaker encoder.

Reads top to bottom: config checks, speakers (:mod:`reverse_voicefilter.embedding.data`), the run's
folders (locked against a second run, see :mod:`reverse_voicefilter.core.runlock`; an earlier run's
files are refused unless ``--overwrite``), network and loss, optimizer, resume, then the loop of
:func:`train_step` with TensorBoard summaries and, every ``ge2e.checkpoint_interval`` steps, the
validation EER on held-out speakers (:func:`reverse_voicefilter.embedding.eer.evaluate_trials`, the
function evaluate_embedder.py uses), a training checkpoint ``chkpt_STEP.pt`` and the embedder file
``embedder.pt``, all written atomically.

``embedder.pt`` is what ``-e`` reads: for the original architecture the original's bare
state_dict (``lstm.*``, ``proj.linear_layer.*``), for the resemblyzer architecture
resemblyzer's ``{step, model_state}`` file. A run resumed from ``chkpt_STEP.pt`` continues
bit for bit (on CPU) as if never stopped: the batch of each step depends only on the seed and
the step, and the checkpoint holds the network, the loss's w and b, and Adam's moments.
"""
import contextlib
import copy
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from reverse_voicefilter.core.atomic import remove_stale_temporaries, save_torch, write_text
from reverse_voicefilter.core.audio import Audio, load_wav
from reverse_voicefilter.core.checkpoint import (
    check_checkpoint_file,
    check_run_folder,
    check_run_name,
    clear_earlier_run,
    load_checkpoint,
    load_model_weights,
)
from reverse_voicefilter.core.cli import new_folders, pick_device
from reverse_voicefilter.core.errors import TrainingDiverged, UserError
from reverse_voicefilter.core.hparams import HParam
from reverse_voicefilter.core.runlock import folder_lock
from reverse_voicefilter.core.signals import StopSignals, signal_exit_code
from reverse_voicefilter.core.summary_writer import SafeSummaryWriter
from reverse_voicefilter.embedding.config import ge2e_config_changes
from reverse_voicefilter.embedding.data import BatchSource, find_training_speakers, utterance_lists
from reverse_voicefilter.embedding.eer import evaluate_trials, folder_trials
from reverse_voicefilter.embedding.ge2e import GE2ELoss
from reverse_voicefilter.model.embedder import (
    RESEMBLYZER,
    DvecEmbedder,
    ResemblyzerEncoder,
    SpeechEmbedder,
    load_embedder,
    resemblyzer_format,
)

logger = logging.getLogger(__name__)

ARCHITECTURES = ("original", RESEMBLYZER)
EMBEDDER_NAME = "embedder.pt"
CONFIG_NAME = "config.yaml"
# where the data lie, how it is loaded and when to stop: a resume changing these is not warned about
NOT_HYPERPARAMETERS = {"ge2e.max_steps", "ge2e.libri_dir", "ge2e.vox_dir", "ge2e.num_workers", "ge2e.cache_audio"}


def check_config(hp):
    """Values the strict config merge cannot judge alone."""
    g, e = hp.ge2e, hp.embedder
    if g.architecture not in ARCHITECTURES:
        raise UserError(f"ge2e.architecture must be one of {', '.join(ARCHITECTURES)}, got {g.architecture!r}")
    for key in ("speakers_per_batch", "crop_frames", "summary_interval", "checkpoint_interval", "val_utterances"):
        if g[key] < 1:
            raise UserError(f"ge2e.{key} must be at least 1, got {g[key]}")
    for key in ("max_steps", "val_speakers", "val_trials", "num_workers"):
        if g[key] < 0:
            raise UserError(f"ge2e.{key} must be 0 or more, got {g[key]}")
    if g.utterances_per_speaker < 2 or g.speakers_per_batch < 2:
        raise UserError("GE2E needs ge2e.speakers_per_batch >= 2 and ge2e.utterances_per_speaker >= 2")
    if g.architecture == "original" and g.crop_frames < e.window:
        raise UserError(f"ge2e.crop_frames ({g.crop_frames}) must hold at least one embedder.window ({e.window})")
    if g.architecture == RESEMBLYZER and e.num_mels != ResemblyzerEncoder.NUM_MELS:
        raise UserError(f"the resemblyzer architecture has a {ResemblyzerEncoder.NUM_MELS}-band front-end, "
                        f"but embedder.num_mels is {e.num_mels}")
    if not (g.lr > 0 and g.grad_clip > 0 and g.init_w > 0):
        raise UserError("ge2e.lr, ge2e.grad_clip and ge2e.init_w must be positive")


def build_encoder(hp):
    """The network of ``ge2e.architecture``, sized by the embedder section."""
    e = hp.embedder
    if hp.ge2e.architecture == RESEMBLYZER:
        return ResemblyzerEncoder(hidden=e.lstm_hidden, layers=e.lstm_layers, emb_dim=e.emb_dim)
    return SpeechEmbedder(hp)


def initial_weights(hp, net):
    """Load ``ge2e.init`` (``resemblyzer`` or an embedder file of the same architecture) into ``net``."""
    spec = hp.ge2e.init
    if not spec:
        return
    loaded = load_embedder(spec, hp)
    kind = RESEMBLYZER if loaded.kind == RESEMBLYZER else "original"
    if kind != hp.ge2e.architecture:
        raise UserError(f"ge2e.init {spec} is a {kind} embedder but ge2e.architecture is {hp.ge2e.architecture}")
    load_model_weights(net, loaded.net.state_dict(), spec)
    logger.info("starting from the weights of %s", spec)


def crop_embeddings(net, audio, crops, crop_frames):
    """Waveform crops [B, S] -> embeddings [B, D], through the architecture's own front-end."""
    if isinstance(net, ResemblyzerEncoder):
        return net(net.mel_frames(crops)[:, :crop_frames])       # [B, crop_frames, 40]
    return net.embed_frames(audio.get_mel_torch(crops)[:, :, :crop_frames])  # mels [B, num_mels, crop_frames]


def embedder_file_state(run):
    """What ``embedder.pt`` holds: the original's bare state_dict, or resemblyzer's ``{step, model_state}``."""
    if isinstance(run.net, ResemblyzerEncoder):
        return resemblyzer_format(run.net, run.step, (run.loss_fn.w, run.loss_fn.b))
    return {k: v.detach().cpu().clone() for k, v in run.net.state_dict().items()}


@dataclass
class Run:
    """Everything a step, a validation or a checkpoint needs."""
    hp: HParam
    net: torch.nn.Module
    loss_fn: GE2ELoss
    optimizer: torch.optim.Optimizer
    audio: Audio
    device: torch.device
    chkpt_dir: Path
    step: int = 0
    eer_history: list = field(default_factory=list)  # [(step, eer)]
    writer: SafeSummaryWriter | None = None


def train_step(run, crops):
    """One Adam step on a batch of crops [N * M, S]; returns the loss."""
    g = run.hp.ge2e
    run.net.train()
    emb = crop_embeddings(run.net, run.audio, crops.to(run.device), g.crop_frames)
    loss = run.loss_fn(emb.reshape(g.speakers_per_batch, g.utterances_per_speaker, -1))
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.loss_fn.scale_gradients(g.wb_grad_scale)
    torch.nn.utils.clip_grad_norm_(list(run.net.parameters()) + list(run.loss_fn.parameters()), g.grad_clip)
    run.optimizer.step()
    value = loss.item()
    if not math.isfinite(value):
        raise TrainingDiverged(f"the GE2E loss became {value} at step {run.step + 1}: lower ge2e.lr "
                               f"(no checkpoint was written for this step)")
    return value


def load_utterance(utt):
    return load_wav(utt.path)[utt.start:utt.stop]


def validation_set(hp, val_speakers):
    """Trials over held-out speakers: up to ``val_speakers`` of them (sorted), ``val_utterances`` each.
    A speaker with one recording is cut into crops when ``split_long_utterances`` is set."""
    g = hp.ge2e
    names = sorted(val_speakers)[:g.val_speakers or None]
    crop_samples = g.crop_frames * hp.audio.hop_length
    utts = {}
    for name in names:
        files = val_speakers[name]
        cut = g.split_long_utterances and len(files) == 1
        utts[name] = utterance_lists({name: files}, cut, crop_samples)[name][:g.val_utterances]
    utts = {k: v for k, v in utts.items() if len(v) >= 2}
    if len(utts) < 2:
        return []
    return folder_trials(utts, sample=g.val_trials, seed=g.seed)


def validate(run, trials, progress):
    """EER over the held-out trials, with the utterance-level embeddings -e would give."""
    kind = RESEMBLYZER if isinstance(run.net, ResemblyzerEncoder) else "ge2e"
    frozen = DvecEmbedder(kind, copy.deepcopy(run.net), run.audio, run.device, "validation")
    result = evaluate_trials(frozen, trials, load=load_utterance, progress=progress)
    run.eer_history.append((run.step, result["eer"]))
    if run.writer is not None:
        run.writer.scalar("validation_EER", result["eer"], run.step)
        if run.writer.writing():
            utts = list(result["embeddings"])  # projected in TensorBoard, labelled by speaker folder
            run.writer.add_embedding(torch.from_numpy(np.stack([result["embeddings"][u] for u in utts])).float(),
                                     metadata=[Path(u.path).parent.parent.name for u in utts],
                                     global_step=run.step, tag="validation_embeddings")
    logger.info("step %d: validation EER %.2f %% (%d same, %d different pairs)", run.step, 100 * result["eer"],
                result["same_trials"], result["different_trials"])
    return result["eer"]


def save(run):
    """Write ``chkpt_STEP.pt`` and ``embedder.pt`` atomically; returns the checkpoint's path."""
    path = run.chkpt_dir / f"chkpt_{run.step}.pt"
    save_torch({"model": run.net.state_dict(), "ge2e": run.loss_fn.state_dict(),
                "optimizer": run.optimizer.state_dict(), "step": run.step, "hp_str": run.hp.hp_str,
                "architecture": run.hp.ge2e.architecture,
                "eer_history": [[s, float(e)] for s, e in run.eer_history]}, path)
    save_torch(embedder_file_state(run), run.chkpt_dir / EMBEDDER_NAME)
    logger.info("saved %s and %s", path, run.chkpt_dir / EMBEDDER_NAME)
    return path


def resume(run, path):
    state = load_checkpoint(path)
    if "ge2e" not in state or "architecture" not in state:
        raise UserError(f"{path} is not an embedder_trainer.py checkpoint (no GE2E state in it)")
    if state["architecture"] != run.hp.ge2e.architecture:
        raise UserError(f"{path} trains the {state['architecture']} architecture but the config's "
                        f"ge2e.architecture is {run.hp.ge2e.architecture}: pass the run's config")
    load_model_weights(run.net, state["model"], path)
    run.loss_fn.load_state_dict(state["ge2e"])
    try:
        run.optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as err:
        raise UserError(f"the optimizer state in {path} does not fit: {err}") from None
    run.step = int(state["step"])
    run.eer_history = [(int(s), float(e)) for s, e in state.get("eer_history", [])]
    changes = ge2e_config_changes(state["hp_str"], run.hp, ["audio", "embedder", "ge2e"], NOT_HYPERPARAMETERS)
    for key, old, new in changes:
        logger.warning("resuming with %s = %r (the checkpoint was trained with %r)", key, new, old)
    logger.info("resumed from %s at step %d", path, run.step)


def run_training(hp, name, base_dir=".", checkpoint_path=None, overwrite=False, device="auto", progress=True):
    """Train until ``ge2e.max_steps`` (or a signal); returns the exit status.

    ``checkpoint_path`` resumes a run; a new run where an earlier one left its checkpoints or
    ``embedder.pt`` is refused unless ``overwrite`` (which deletes them) is given.
    """
    check_run_name(name, "-m")
    if checkpoint_path and overwrite:
        raise UserError("--overwrite starts a run over; to resume with --checkpoint_path leave it out")
    check_config(hp)
    g = hp.ge2e
    device = pick_device(device)
    if checkpoint_path:
        check_checkpoint_file(checkpoint_path, "--checkpoint_path")
    chkpt_dir, log_dir = Path(base_dir) / "chkpt" / name, Path(base_dir) / "logs" / name

    # the speakers before any folder is made: a run refused for its data leaves nothing behind
    train_speakers, val_speakers = find_training_speakers(g)
    crop_samples = g.crop_frames * hp.audio.hop_length
    source = BatchSource(utterance_lists(train_speakers, g.split_long_utterances, crop_samples),
                         g.speakers_per_batch, g.utterances_per_speaker, crop_samples, g.seed,
                         volume_normalize=g.architecture == RESEMBLYZER, cache_audio=g.cache_audio)
    trials = validation_set(hp, val_speakers)

    with contextlib.ExitStack() as cleanup:  # closed in reverse: writer, lock, folders
        cleanup.enter_context(new_folders(chkpt_dir, log_dir, flag="-b"))
        cleanup.enter_context(folder_lock(chkpt_dir, "-m"))
        # under the lock: no other run can pass this check at the same time
        check_run_folder(chkpt_dir, resuming=bool(checkpoint_path), overwrite=overwrite, product=EMBEDDER_NAME)
        remove_stale_temporaries(chkpt_dir)
        logger.info("%d training speakers, %d validation trials", len(source.names), len(trials))

        torch.manual_seed(g.seed)
        net = build_encoder(hp).to(device)
        initial_weights(hp, net)
        loss_fn = GE2ELoss(g.init_w, g.init_b).to(device)
        optimizer = torch.optim.Adam(list(net.parameters()) + list(loss_fn.parameters()), lr=g.lr)
        run = Run(hp, net, loss_fn, optimizer, Audio(hp), device, chkpt_dir)
        if checkpoint_path:
            resume(run, checkpoint_path)
        if overwrite:  # after ge2e.init was read, which may be this folder's embedder.pt
            clear_earlier_run(chkpt_dir, keep=g.init or None, product=EMBEDDER_NAME)
        write_text(chkpt_dir / CONFIG_NAME, hp.hp_str)
        run.writer = SafeSummaryWriter(str(log_dir))
        cleanup.callback(run.writer.close)
        return _loop(run, source, trials, progress)


def _loop(run, source, trials, progress):
    g = run.hp.ge2e
    if trials and run.step == 0:
        validate(run, trials, progress)  # the starting point, for the EER curve
    steps = range(run.step, g.max_steps) if g.max_steps else itertools.count(run.step)
    if g.max_steps and run.step >= g.max_steps:
        logger.info("already at step %d (ge2e.max_steps %d): nothing to do", run.step, g.max_steps)
        return 0
    loader = torch.utils.data.DataLoader(source, batch_size=None, sampler=steps, num_workers=g.num_workers)
    last_saved, started = None, time.perf_counter()
    with StopSignals() as signals, tqdm(total=g.max_steps or None, initial=run.step, unit="step",
                                         disable=not progress) as bar:
        for crops in loader:
            loss = train_step(run, crops)
            run.step += 1
            bar.update()
            if run.step % g.summary_interval == 0:
                run.writer.scalar("train_loss", loss, run.step)
                run.writer.scalar("learning_rate", run.optimizer.param_groups[0]["lr"], run.step)
                run.writer.scalar("ge2e_w", run.loss_fn.w.item(), run.step)
                bar.set_postfix(loss=f"{loss:.3f}")
            if run.step % g.checkpoint_interval == 0 or run.step == g.max_steps:
                if trials:
                    validate(run, trials, progress)
                save(run)
                last_saved = run.step
            if signals.signum:
                path = save(run) if last_saved != run.step else run.chkpt_dir / f"chkpt_{run.step}.pt"
                logger.warning("stopped at step %d: resume with --checkpoint_path %s", run.step, path)
                return signal_exit_code(signals.signum)
    eer = f", validation EER {100 * run.eer_history[-1][1]:.2f} %" if run.eer_history else ""
    logger.info("done: step %d in %.0f s%s; embedder written to %s", run.step, time.perf_counter() - started,
                eer, run.chkpt_dir / EMBEDDER_NAME)
    return 0
