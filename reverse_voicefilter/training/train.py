"""The training procedure behind ``trainer.py``.

:func:`run_training` reads top to bottom as the procedure: device (and DDP under
torchrun), the checks that need no compute (flags, run name, data, checkpoint),
then the run's folders, locked against a second run (:mod:`reverse_voicefilter.core.runlock`),
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
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from reverse_voicefilter.core.audio import Audio
from reverse_voicefilter.core.checkpoint import (
    check_run_folder,
    check_run_name,
    checkpoint_file,
    clear_earlier_run,
    remove_interrupted_writes,
    save_best,
    save_checkpoint,
    write_config_copy,
)
from reverse_voicefilter.core.cli import apply_threads, new_folders
from reverse_voicefilter.core.errors import UserError
from reverse_voicefilter.core.runlock import folder_lock
from reverse_voicefilter.core.signals import StopSignals, signal_exit_code
from reverse_voicefilter.data.dataloader import create_dataloader
from reverse_voicefilter.training.distributed import Dist, barrier, setup_distributed, sync_step, wrap
from reverse_voicefilter.training.schedule import apply_schedule
from reverse_voicefilter.training.setup import (
    RunLogging,
    check_settings,
    configure_backends,
    load_data,
    log_failures,
    make_state,
)
from reverse_voicefilter.training.state import TrainingState, seed_everything
from reverse_voicefilter.training.steps import check_loss, make_loss, train_step
from reverse_voicefilter.training.validation import Validator
from reverse_voicefilter.training.writer import MyWriter

logger = logging.getLogger(__name__)


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
    check_run_name(name, "-m")
    if checkpoint_path and init_from:
        raise UserError("--init_from starts a new run from a checkpoint's weights, --checkpoint_path resumes one: "
                        "pass one of them")
    if checkpoint_path and overwrite:
        raise UserError("--overwrite starts a run over; to resume with --checkpoint_path leave it out")
    base_dir = Path(base_dir)
    chkpt_dir, log_dir = base_dir / hp.log.chkpt_dir / name, base_dir / hp.log.log_dir / name
    dist = setup_distributed(device)
    device = dist.device
    with contextlib.ExitStack() as cleanup:  # closed in reverse: writer, lock, folders, failure log, logging, group
        if dist.active:
            cleanup.callback(torch_dist.destroy_process_group)
        run_log = RunLogging(dist.is_main)
        cleanup.callback(run_log.close)
        cleanup.enter_context(log_failures())
        # what needs no compute is checked before anything is created: a refused run leaves nothing
        train_dir, test_dir = check_settings(hp, device, checkpoint_path=checkpoint_path, init_from=init_from)
        if dist.is_main:  # the one process that writes in the run's folders
            cleanup.enter_context(new_folders(chkpt_dir, log_dir, flag="-b"))
            cleanup.enter_context(folder_lock(chkpt_dir, "-m"))
            # under the lock: no other run can pass this check at the same time
            check_run_folder(chkpt_dir, resuming=bool(checkpoint_path), overwrite=overwrite)
            run_log.open_file(log_dir, name)
            remove_interrupted_writes(chkpt_dir)
        apply_threads(threads, logger)
        if hp.train.keep_freed_memory and device.type == "cpu":
            # before the first activation is allocated
            from reverse_voicefilter.core.allocator import reuse_freed_memory

            logger.info("freed memory kept for reuse (train.keep_freed_memory): %s", reuse_freed_memory())
        logger.info("training %s on %s (%d process(es)), precision %s", name, device, dist.world_size,
                    hp.train.precision)
        configure_backends(device)
        seed_everything(hp.train.seed)

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
    return signal_exit_code(signum)


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
