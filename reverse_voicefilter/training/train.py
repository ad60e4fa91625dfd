"""The training procedure behind ``trainer.py``.

:func:`run_training` reads top to bottom as the procedure: checks that need no
compute (flags, folders, data, checkpoint), device (and DDP under torchrun),
logging, data (d-vectors from the cache), the :class:`TrainingState` (model,
optimizer, grad scaler, position, best score: fresh, resumed or fine-tuned),
then :func:`train_loop`: :func:`train_step`, summaries, and every
``checkpoint_interval`` steps :func:`validate_and_save` (validation over the
test set, ``chkpt_STEP.pt``, ``best.pt``).

Beyond the original: any device, mixed precision (train.precision), exact
resume (RNG states, data position, grad scaler and best score live in the
checkpoint), the best checkpoint by median SDR kept as ``best.pt``,
Ctrl-C/SIGTERM writing a checkpoint before exiting, and failures that exit
non-zero instead of the original's catch-all ``exit 0``.
"""
import contextlib
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from reverse_voicefilter.core.audio import Audio
from reverse_voicefilter.core.checkpoint import (
    BEST_NAME,
    check_run_folder,
    checkpoint_file,
    clear_earlier_run,
    init_weights,
    remove_interrupted_writes,
    resume,
    save_best,
    save_checkpoint,
    write_config_copy,
)
from reverse_voicefilter.core.cli import apply_threads, check_writable_dir
from reverse_voicefilter.core.errors import TrainingDiverged, UserError
from reverse_voicefilter.core.precision import autocast, check_precision
from reverse_voicefilter.data.dataloader import build_dataset, create_dataloader
from reverse_voicefilter.data.online import create_online_loader
from reverse_voicefilter.model.embedder import load_embedder
from reverse_voicefilter.model.model import VoiceFilter, count_parameters
from reverse_voicefilter.training.distributed import Dist, barrier, is_main_process, setup_distributed, sync_step, wrap
from reverse_voicefilter.training.schedule import apply_schedule
from reverse_voicefilter.training.state import TrainingState, seed_everything
from reverse_voicefilter.training.validation import Validator
from reverse_voicefilter.training.writer import MyWriter

logger = logging.getLogger(__name__)

LOSS_LIMIT = 1e8            # the original's "loss exploded" threshold
POWER_LAW_FLOOR = 1e-4      # x**p has an infinite slope at 0: clamp before compressing
LOG_FORMAT = "%(asctime)s - %(levelname)s - %(message)s"  # the original's
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
FILE_LOGGER = "trainer.logfile"


# ---- loss, optimizer, one step -----------------------------------------------------------------
def make_loss(hp):
    """Elementwise loss [B, T, F] of (estimated, target) normalized magnitudes.

    ``mse``: the original's (est - target)^2. ``power_law``: the paper's compressed
    loss (est^p - target^p)^2 with p = audio.power, clamped at POWER_LAW_FLOOR so the
    gradient stays finite where the magnitude is 0.
    """
    if hp.train.loss == "mse":
        def mse(est, target):
            return (est - target) ** 2
        return mse
    power = hp.audio.power

    def power_law(est, target):
        est_c = torch.clamp(est, min=POWER_LAW_FLOOR) ** power
        target_c = torch.clamp(target, min=POWER_LAW_FLOOR) ** power
        return (est_c - target_c) ** 2
    return power_law


def make_optimizer(hp, params):
    if hp.train.optimizer == "adabound":
        from pytorch_optimizer import AdaBound
        return AdaBound(params, lr=hp.train.adabound.initial, final_lr=hp.train.adabound.final)
    return torch.optim.Adam(params, lr=hp.train.adam)


def train_step(model, batch, optimizer, scaler, loss_fn, device, precision):
    """One optimizer step on ``(dvec [B, E], target_mag [B, T, F], mixed_mag [B, T, F])``;
    returns the loss (a 0-dim tensor on the device, not synchronized)."""
    dvec, target_mag, mixed_mag = (t.to(device, non_blocking=True) for t in batch)
    with autocast(device, precision):
        mask = model(mixed_mag, dvec)
    loss = loss_fn(mixed_mag * mask.float(), target_mag).mean()  # loss in fp32
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def check_loss(value, step):
    """A NaN/inf loss, or one past the original's limit, ends the run without a checkpoint."""
    if not math.isfinite(value) or value > LOSS_LIMIT:
        raise TrainingDiverged(f"loss exploded to {value:.4g} at step {step}: training stopped (lower the "
                               f"learning rate, or check the data for NaN/inf values)")


# ---- the procedure -----------------------------------------------------------------------------
@dataclass
class Run:
    """What the loop works with besides the :class:`TrainingState`; ``writer`` and ``validator``
    exist on rank 0 only."""
    hp: object
    name: str
    dist: Dist
    chkpt_dir: Path
    state: TrainingState
    model: torch.nn.Module  # state.model, or its DistributedDataParallel wrapper
    train_loader: torch.utils.data.DataLoader
    loss_fn: object
    writer: MyWriter | None
    validator: Validator | None
    progress: bool


def run_training(hp, name, base_dir=".", embedder="resemblyzer", checkpoint_path=None, init_from=None,
                 overwrite=False, threads=None, device="auto", progress=True):
    """Train VoiceFilter as ``trainer.py`` does; returns the exit code (0, or 130/143 when
    stopped by SIGINT/SIGTERM after writing a checkpoint). Raises :class:`UserError` for bad
    input and :class:`TrainingDiverged` (a UserError, exit code 1) when the loss explodes.

    ``checkpoint_path`` resumes a run; ``init_from`` starts a new one from another run's
    weights (fine-tuning); ``overwrite`` starts over where an earlier run left checkpoints.
    """
    if checkpoint_path and init_from:
        raise UserError("--init_from starts a new run from a checkpoint's weights, --checkpoint_path resumes one: "
                        "pass one of them")
    if checkpoint_path and overwrite:
        raise UserError("--overwrite starts a run over; to resume with --checkpoint_path leave it out")
    base_dir = Path(base_dir)
    chkpt_dir, log_dir = base_dir / hp.log.chkpt_dir / name, base_dir / hp.log.log_dir / name
    if is_main_process():  # before any compute, and before the log file opens
        check_run_folder(chkpt_dir, resuming=bool(checkpoint_path), overwrite=overwrite)
        for folder in (chkpt_dir, log_dir):
            check_writable_dir(folder, "-b")
    dist = setup_distributed(device)
    device = dist.device
    with contextlib.ExitStack() as cleanup:  # closed in reverse: writer, process group, failure log, handlers
        cleanup.callback(setup_run_logging(log_dir, name, dist.is_main))
        cleanup.enter_context(log_failures())
        if dist.active:
            cleanup.callback(torch_dist.destroy_process_group)
        apply_threads(threads, logger)
        if hp.train.keep_freed_memory and device.type == "cpu":
            # before the first activation is allocated
            from reverse_voicefilter.core.allocator import reuse_freed_memory

            logger.info("freed memory kept for reuse (train.keep_freed_memory): %s", reuse_freed_memory())
        train_dir, test_dir = check_settings(hp, device, checkpoint_path=checkpoint_path, init_from=init_from)
        logger.info("training %s on %s (%d process(es)), precision %s", name, device, dist.world_size,
                    hp.train.precision)
        configure_backends(device)
        seed_everything(hp.train.seed)
        if dist.is_main:
            remove_interrupted_writes(chkpt_dir)

        # data: precomputed folders (d-vectors cached next to the data) or mixed on the fly
        train_loader, test_set, embedder_name = load_data(hp, dist, embedder, train_dir, test_dir, progress,
                                                          chkpt_dir)

        # model, optimizer, scaler, position: fresh, resumed, or another run's weights
        state = make_state(hp, dist, embedder_name, train_loader.sampler.batches_per_epoch, checkpoint_path,
                           init_from, chkpt_dir)
        if hp.train.max_steps and state.step >= hp.train.max_steps:
            logger.info("the checkpoint is at step %d, train.max_steps is %d: nothing to train", state.step,
                        hp.train.max_steps)
            return 0
        model = wrap(state.model, dist)
        model.train()

        # rank 0 validates, logs and writes the checkpoints
        loss_fn, writer, validator = make_loss(hp), None, None
        if dist.is_main:
            if overwrite:
                clear_earlier_run(chkpt_dir, keep=init_from)
            write_config_copy(chkpt_dir, hp)
            # TensorBoard hides what an earlier run wrote from this run's first step on
            writer = MyWriter(hp, str(log_dir), purge_step=state.step + 1)
            cleanup.callback(writer.close)
            test_loader = create_dataloader(hp, test_set, False, device, seed=hp.train.seed)
            validator = Validator(test_loader, Audio(hp), loss_fn, device, hp.train.precision, progress=progress)
        return train_loop(Run(hp=hp, name=name, dist=dist, chkpt_dir=chkpt_dir, state=state, model=model,
                              train_loader=train_loader, loss_fn=loss_fn, writer=writer, validator=validator,
                              progress=progress))


def train_loop(run):
    """Train until ``train.max_steps`` (0: until stopped); returns the exit code."""
    state, hp, dist = run.state, run.hp, run.dist
    max_steps, sampler = hp.train.max_steps, run.train_loader.sampler
    stop, timer, last_saved = StopSignals(), StepTimer(), None
    bar = tqdm(total=max_steps or None, initial=state.step, desc=run.name, unit="step", dynamic_ncols=True,
               disable=not (dist.is_main and run.progress))
    with stop, logging_redirect_tqdm(), bar:
        while True:
            sampler.set_position(state.epoch, state.batch)
            for batch in run.train_loader:
                apply_schedule(state.optimizer, hp, state.step)
                loss = train_step(run.model, batch, state.optimizer, state.scaler, run.loss_fn, dist.device,
                                  hp.train.precision)
                state.advance()
                timer.steps += 1
                loss_value, signum = sync_step(loss, stop.signum, dist)
                check_loss(loss_value, state.step)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
                if dist.is_main and state.step % hp.train.summary_interval == 0:
                    log_summary(run, loss_value, timer)
                finished = bool(max_steps) and state.step >= max_steps
                if state.step % hp.train.checkpoint_interval == 0 or finished:
                    validate_and_save(run)
                    last_saved = state.step
                    timer.restart()  # step_time counts training, not validation
                if signum:
                    return stop_for_signal(run, signum, saved=last_saved == state.step)
                if finished:
                    logger.info("reached train.max_steps %d; best median SDR %s", max_steps,
                                f"{state.best_sdr:.2f} dB" if state.best_sdr is not None else "-")
                    return 0


def validate_and_save(run):
    """Rank 0 validates, then writes the checkpoint (with the updated best score) and, when the
    score improved, ``best.pt``; the other processes wait."""
    state = run.state
    if run.dist.is_main:
        result = run.validator(state.model)
        ex = result.example
        run.writer.log_evaluation(result.test_loss, result.sdr, ex["mixed_wav"], ex["target_wav"], ex["est_wav"],
                                  ex["mixed_spec"], ex["target_spec"], ex["est_spec"], ex["est_mask"], state.step)
        logger.info("validation at step %d: test_loss %.5f, SDR median %.2f dB (mean %.2f, mixture %.2f) over "
                    "%d samples", state.step, result.test_loss, result.sdr, result.sdr_mean, result.input_sdr,
                    result.count)
        improved = state.improves(result.sdr)
        path = save_checkpoint(state.state_dict(), checkpoint_file(run.chkpt_dir, state.step))
        logger.info("Saved checkpoint to: %s", path)
        if improved:
            logger.info("new best median SDR %.2f dB: %s", state.best_sdr, save_best(run.chkpt_dir, state))
    barrier(run.dist)


def log_summary(run, loss_value, timer):
    step_time = timer.restart()
    lr = run.state.optimizer.param_groups[0]["lr"]
    run.writer.log_training(loss_value, run.state.step, step_time=step_time, learning_rate=lr)
    logger.info("step %d: train_loss %.5f, %.3f s/step", run.state.step, loss_value, step_time)


def stop_for_signal(run, signum, saved):
    """Ctrl-C/SIGTERM: write this step's checkpoint (unless just written) and return 130/143."""
    path = checkpoint_file(run.chkpt_dir, run.state.step)
    if run.dist.is_main and not saved:
        save_checkpoint(run.state.state_dict(), path)
    barrier(run.dist)
    logger.warning("stopped by %s at step %d: checkpoint saved to %s (resume with --checkpoint_path %s)",
                   signal.Signals(signum).name, run.state.step, path, path)
    return SIGNAL_EXIT.get(signum, 128 + signum)


# ---- before the loop ---------------------------------------------------------------------------
def check_settings(hp, device, checkpoint_path=None, init_from=None):
    """What can be checked before any compute; returns the train and test folders."""
    if hp.train.max_steps < 0 or hp.train.validation_samples < 0:
        raise UserError("train.max_steps and train.validation_samples must be 0 or positive")
    hp.train.precision = check_precision(hp.train.precision, device, "train.precision")
    if hp.data.mixing == "precomputed" and hp.data.reverse_data:
        raise UserError("data.reverse_data (--reverse_data) applies to online mixing; precomputed data is reversed "
                        "when generated: generator.py --reverse_data True")
    train_dir = _check_data_dir(hp, "train_dir") if hp.data.mixing == "precomputed" else _check_online(hp)
    folders = train_dir, _check_data_dir(hp, "test_dir")
    for flag, path in (("--checkpoint_path", checkpoint_path), ("--init_from", init_from)):
        if path and not Path(path).is_file():
            raise UserError(f"{flag}: checkpoint not found: {path}")
    return folders


def _check_data_dir(hp, key):
    value = hp.data[key]
    if not value:
        raise UserError(f"data.{key} is empty: set it in the config or pass --{key}")
    if not Path(value).is_dir():
        raise UserError(f"data.{key} folder not found: {value}")
    return Path(value)


def _check_online(hp):
    """data.mixing online: the corpus root, checked before any compute (None: no train folder)."""
    d = hp.data
    if d.libri_dir and d.voxceleb_dir:
        raise UserError("data.libri_dir and data.voxceleb_dir are both set: online mixing reads one corpus")
    root = d.libri_dir or d.voxceleb_dir
    if not root:
        raise UserError("data.mixing is online but data.libri_dir and data.voxceleb_dir are empty: set one in "
                        "the config or pass --libri_dir / --voxceleb_dir")
    if not Path(root).is_dir():
        flag = "libri_dir" if d.libri_dir else "voxceleb_dir"
        raise UserError(f"data.{flag} folder not found: {root}")
    if d.epoch_samples < 1:
        raise UserError("data.epoch_samples must be at least 1 with online mixing")
    if d.train_dir:
        logger.warning("data.mixing is online: data.train_dir %s is not read (the training data is mixed from %s)",
                       d.train_dir, root)
    return None


def configure_backends(device):
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    elif device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)  # exact resume on CPU


def load_data(hp, dist, embedder_spec, train_dir, test_dir, progress, chkpt_dir=None):
    """The training loader (this process's shard), the test set (rank 0 only, else None) and the
    embedder's name. Precomputed data: each split's d-vectors are computed once and cached beside
    the data. Online mixing (``train_dir`` None): the loader mixes from the corpus root and embeds
    each reference when first drawn (cached in data.dvec_cache_dir, default ``chkpt_dir``)."""
    dvec_embedder = load_embedder(embedder_spec, hp, dist.device)
    embedder_name = dvec_embedder.name
    if train_dir is None:
        return load_online_data(hp, dist, dvec_embedder, test_dir, progress, chkpt_dir)
    train_set = build_dataset(hp, train_dir, dvec_embedder, write_cache=dist.is_main,
                              progress=dist.is_main and progress)
    test_set = None
    if dist.is_main:
        test_set = build_dataset(hp, test_dir, dvec_embedder, with_wavs=True, limit=hp.train.validation_samples,
                                 progress=progress)
        test_set[0]  # read one sample now: a bad file fails here, not after hours of training
    del dvec_embedder  # frozen and no longer needed: the d-vectors are in the datasets
    train_set[0]
    train_loader = create_dataloader(hp, train_set, True, dist.device, seed=hp.train.seed, rank=dist.rank,
                                     world_size=dist.world_size)
    logger.info("%d training samples (batches per epoch and process: %d), %s test samples", len(train_set),
                train_loader.sampler.batches_per_epoch, len(test_set) if test_set is not None else "-")
    return train_loader, test_set, embedder_name


def load_online_data(hp, dist, dvec_embedder, test_dir, progress, chkpt_dir):
    """:func:`load_data` with online mixing: the embedder stays, to embed references as they are drawn."""
    test_set = None
    if dist.is_main:
        test_set = build_dataset(hp, test_dir, dvec_embedder, with_wavs=True, limit=hp.train.validation_samples,
                                 progress=progress)
        test_set[0]
    cache_dir = Path(hp.data.dvec_cache_dir or chkpt_dir)
    train_loader = create_online_loader(hp, dvec_embedder, cache_dir, dist.device, seed=hp.train.seed,
                                        rank=dist.rank, world_size=dist.world_size)
    logger.info("%s test samples", len(test_set) if test_set is not None else "-")
    return train_loader, test_set, dvec_embedder.name


def make_state(hp, dist, embedder_name, batches_per_epoch, checkpoint_path=None, init_from=None, chkpt_dir=None):
    """A new :class:`TrainingState` on this process's device, then resumed from ``checkpoint_path``
    or given the weights of ``init_from``. The model's random init comes first either way, so a
    fresh run draws the same random numbers as before."""
    model = VoiceFilter(hp).to(dist.device)
    state = TrainingState(model, make_optimizer(hp, model.parameters()),
                          torch.amp.GradScaler(dist.device.type, enabled=hp.train.precision == "fp16"),
                          hp_str=hp.hp_str, embedder=embedder_name, batches_per_epoch=batches_per_epoch,
                          world_size=dist.world_size)
    logger.info("VoiceFilter: %.2f M parameters", count_parameters(model) / 1e6)
    if checkpoint_path:
        logger.info("Resuming from checkpoint: %s", checkpoint_path)
        resume(checkpoint_path, state, hp)
        if state.best_sdr is not None and chkpt_dir is not None and not (Path(chkpt_dir) / BEST_NAME).is_file():
            # another run's checkpoint (or a moved one): its best score belongs to its own best.pt
            logger.info("%s holds no best.pt yet: the best score starts afresh (the checkpoint's was %.2f dB)",
                        chkpt_dir, state.best_sdr)
            state.best_sdr = None
    elif init_from:
        init_weights(init_from, state)
    else:
        logger.info("Starting new training run")
    return state


class StepTimer:
    """Seconds per training step since the last restart."""

    def __init__(self):
        self.start, self.steps = time.perf_counter(), 0

    def restart(self):
        """Return the mean seconds per step so far (0 if none) and start counting again."""
        now = time.perf_counter()
        mean = (now - self.start) / self.steps if self.steps else 0.0
        self.start, self.steps = now, 0
        return mean


# ---- signals, logging --------------------------------------------------------------------------
class StopSignals:
    """SIGINT/SIGTERM ask the loop to stop after the current step and checkpoint; a second
    Ctrl-C aborts at once without saving."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNAL_EXIT:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        if self.signum:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # second Ctrl-C: abort without a checkpoint
            return  # e.g. torchrun's SIGTERM after the terminal's SIGINT: already stopping
        self.signum = signum
        logger.warning("%s received: stopping after this step and writing a checkpoint (Ctrl-C again aborts "
                       "without saving)", signal.Signals(signum).name)


def setup_run_logging(log_dir, name, is_main):
    """Console + ``log_dir/NAME-TIME.log`` on rank 0 (warnings only on other ranks).
    Returns a function that removes the handlers again."""
    root = logging.getLogger()
    old_level = root.level
    fmt = logging.Formatter(LOG_FORMAT)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    handlers = [console]
    file_logger = logging.getLogger(FILE_LOGGER)
    file_logger.propagate = False
    if is_main:
        log_dir.mkdir(parents=True, exist_ok=True)
        log_file = log_dir / f"{name}-{time.strftime('%Y-%m-%d_%H-%M-%S')}.log"
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(fmt)
        handlers.append(file_handler)
        file_logger.addHandler(file_handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(logging.INFO if is_main else logging.WARNING)  # (tqdm's redirect drops handler levels)

    def restore():
        for handler in handlers:
            root.removeHandler(handler)
            file_logger.removeHandler(handler)
            handler.close()
        root.setLevel(old_level)
    return restore


@contextlib.contextmanager
def log_failures():
    """Put how the run ended into the log file too (the console gets it from run_cli, or the traceback)."""
    file_logger = logging.getLogger(FILE_LOGGER)
    try:
        yield
    except UserError as err:
        file_logger.error("error: %s", err)
        raise
    except KeyboardInterrupt:
        file_logger.warning("interrupted")
        raise
    except BaseException:
        file_logger.exception("training stopped by an exception")
        raise
