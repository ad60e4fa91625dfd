"""The training procedure behind ``trainer.py``.

:func:`run_training` reads top to bottom as the procedure: device (and DDP
under torchrun), logging, data (d-vectors from the cache), model, optimizer,
resume, then the loop of :func:`train_step` with summaries, validation
(:class:`Validator`, the whole test set) and checkpoints
(:func:`save_training_checkpoint`) every ``checkpoint_interval`` steps.

Beyond the original: any device, mixed precision (train.precision), exact
resume (RNG states, data position, grad scaler and best score live in the
checkpoint), the best checkpoint by median SDR kept as ``best.pt``,
Ctrl-C/SIGTERM writing a checkpoint before exiting, and failures that exit
non-zero instead of the original's catch-all ``exit 0``.
"""
import contextlib
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from datasets.dataloader import build_dataset, create_dataloader
from model.embedder import load_embedder
from model.model import VoiceFilter, count_parameters
from utils.audio import Audio
from utils.checkpoint import load_checkpoint, load_model_weights, save_checkpoint
from utils.cli import pick_device
from utils.errors import UserError
from utils.hparams import config_changes
from utils.metrics import sdr
from utils.precision import autocast, check_precision
from utils.writer import MyWriter

logger = logging.getLogger(__name__)

LOSS_LIMIT = 1e8            # the original's "loss exploded" threshold
POWER_LAW_FLOOR = 1e-4      # x**p has an infinite slope at 0: clamp before compressing
BEST_NAME = "best.pt"
CONFIG_NAME = "config.yaml"
LOG_FORMAT = "%(asctime)s - %(levelname)s - %(message)s"  # the original's
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
# Where the data lie and when to stop are not hyper-parameters: a resume that changes only
# these (a moved data folder, a longer run) is not warned about.
NOT_HYPERPARAMETERS = {"train.max_steps", "data.train_dir", "data.test_dir"}


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf or exceeded 1e8: the run stops without writing a checkpoint."""


# ---- device and processes ----------------------------------------------------------------------
@dataclass
class Dist:
    """This process's place in the run: rank 0 of 1 without torchrun."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def active(self):
        return torch_dist.is_available() and torch_dist.is_initialized()


def setup_distributed(device_name):
    """One device per process. Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) join the
    process group: nccl with cuda:LOCAL_RANK on GPUs, gloo on CPU."""
    if not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return Dist(device=pick_device(device_name))
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise UserError(f"multi-process training runs on CUDA or CPU, not {device.type} (pass --device cpu)")
    torch_dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return Dist(rank=rank, world_size=world, local_rank=local, device=device)


def barrier(dist):
    if dist.active:
        if dist.device.type == "cuda":
            torch_dist.barrier(device_ids=[dist.local_rank])
        else:
            torch_dist.barrier()


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


# ---- precision, loss, optimizer ----------------------------------------------------------------
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


def _is_adabound(optimizer_state):
    return "final_lr" in (optimizer_state.get("param_groups") or [{}])[0]


# ---- random state ------------------------------------------------------------------------------
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    """Python/numpy/torch RNG states in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- checkpoints -------------------------------------------------------------------------------
@dataclass
class Position:
    """Steps done, and where the next batch comes from: batch ``batch`` of epoch ``epoch``."""
    step: int = 0
    epoch: int = 0
    batch: int = 0

    def advance(self, batches_per_epoch):
        self.step += 1
        self.batch += 1
        if self.batch >= batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0


def checkpoint_file(chkpt_dir, step):
    return Path(chkpt_dir) / f"chkpt_{step}.pt"


def save_training_checkpoint(path, model, optimizer, scaler, hp, pos, best_sdr, embedder_name, world_size):
    """The original's ``{model, optimizer, step, hp_str}`` plus what an exact resume needs."""
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": pos.step,
        "hp_str": hp.hp_str,
        "epoch": pos.epoch,
        "batch_in_epoch": pos.batch,
        "world_size": world_size,
        "rng": rng_state(),
        "scaler": scaler.state_dict(),
        "best_sdr": best_sdr,
        "embedder": embedder_name,
    }
    return save_checkpoint(state, path)


def save_best(path, model, hp, step, score, embedder_name):
    """``best.pt``: weights, step, config and median SDR of the best validation so far."""
    return save_checkpoint({"model": unwrap(model).state_dict(), "step": step, "hp_str": hp.hp_str,
                            "sdr": score, "embedder": embedder_name}, path)


def write_config_copy(chkpt_dir, hp):
    """The run's full config next to its checkpoints (atomic)."""
    path = Path(chkpt_dir) / CONFIG_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(hp.hp_str)
    os.replace(tmp, path)
    return path


def config_differences(old_hp_str, hp):
    """``['train.adam: 0.001 -> 0.0005', ...]``, hyper-parameters only (not NOT_HYPERPARAMETERS);
    None when the old config cannot be read."""
    try:
        changes = config_changes(old_hp_str or "", hp)
    except UserError:
        return None
    return [f"{k}: {old!r} -> {new!r}" for k, old, new in changes if k not in NOT_HYPERPARAMETERS]


def resume(path, model, optimizer, scaler, hp, embedder_name, batches_per_epoch, world_size):
    """Load a checkpoint into model/optimizer/scaler and the RNGs; return (Position, best_sdr).

    An original checkpoint (model, optimizer, step, hp_str only) resumes too, with a warning
    that the data order and random state cannot be restored.
    """
    state = load_checkpoint(path, map_location="cpu")
    load_model_weights(unwrap(model), state["model"], path)
    diffs = config_differences(state.get("hp_str"), hp)
    if diffs is None:
        logger.warning("the checkpoint's config cannot be read; using the given config")
    elif diffs:
        logger.warning("New hparams is different from checkpoint (using the new ones): %s", "; ".join(diffs))
    if "optimizer" not in state:
        logger.warning("%s holds no optimizer state: the optimizer starts afresh", path)
    elif _is_adabound(state["optimizer"]) != (hp.train.optimizer == "adabound"):
        logger.warning("%s was trained with another optimizer than train.optimizer %s: the optimizer starts "
                       "afresh", path, hp.train.optimizer)
    else:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as err:
            raise UserError(f"the optimizer state in {path} does not fit this model: {err}") from None
    step = int(state.get("step", 0))
    exact = all(k in state for k in ("epoch", "batch_in_epoch", "rng"))
    if exact:
        pos = Position(step, int(state["epoch"]), int(state["batch_in_epoch"]))
        set_rng_state(state["rng"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if int(state.get("world_size", 1)) != world_size:
            logger.warning("the checkpoint was written by %d process(es), this run has %d: the data order "
                           "after resuming differs from an uninterrupted run", state.get("world_size"), world_size)
    else:
        pos = Position(step, step // batches_per_epoch, step % batches_per_epoch)
        logger.warning("%s holds no data position or random state (an original checkpoint?): resuming at step "
                       "%d, but not exactly as an uninterrupted run would continue", path, step)
    if state.get("embedder") and state["embedder"] != embedder_name:
        logger.warning("the checkpoint was trained with d-vectors of %s, this run uses %s", state["embedder"],
                       embedder_name)
    best = state.get("best_sdr")
    return pos, (float(best) if best is not None else None)


# ---- one step, validation ----------------------------------------------------------------------
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
    if not math.isfinite(value) or value > LOSS_LIMIT:
        raise TrainingDiverged(f"loss exploded to {value:.4g} at step {step}: training stopped (lower the "
                               f"learning rate, or check the data for NaN/inf values)")


@dataclass
class ValidationResult:
    test_loss: float
    sdr: float              # median over the samples
    sdr_mean: float
    input_sdr: float        # median SDR of the unprocessed mixture
    count: int
    example: dict           # first sample: wavs [N], spectrograms [T, F] (numpy)


def _nanmedian(values):
    values = np.asarray(values, dtype=np.float64)
    return float(np.median(values[np.isfinite(values)])) if np.isfinite(values).any() else float("nan")


def _nanmean(values):
    values = np.asarray(values, dtype=np.float64)
    return float(values[np.isfinite(values)].mean()) if np.isfinite(values).any() else float("nan")


class Validator:
    """Scores a model on the test loader: mean test loss and median SDR (mir_eval) of
    ``spec2wav(mixed_mag * mask, mixed phase)`` against the target wav; batched on the device."""

    def __init__(self, loader, audio, loss_fn, device, precision, progress=True):
        self.loader, self.audio, self.loss_fn = loader, audio, loss_fn
        self.device, self.precision, self.progress = device, precision, progress
        self._input_sdrs = None  # SDR of the mixtures themselves: computed at the first call

    @torch.no_grad()
    def __call__(self, model):
        was_training = model.training
        model.eval()
        try:
            return self._run(model)
        finally:
            model.train(was_training)

    def _run(self, model):
        losses, sdrs, input_sdrs, example = [], [], [], None
        for batch in tqdm(self.loader, desc="validation", unit="batch", leave=False, disable=not self.progress):
            dvec, target_mag, mixed_mag, target_wav, mixed_wav, frames, lengths = (
                t.to(self.device, non_blocking=True) for t in batch)
            with autocast(self.device, self.precision):
                mask = model(mixed_mag, dvec)
            mask = mask.float()
            est_mag = mixed_mag * mask  # [B, T, F]
            valid = (torch.arange(mixed_mag.size(1), device=self.device) < frames[:, None]).unsqueeze(2)
            per_sample = (self.loss_fn(est_mag, target_mag) * valid).sum((1, 2)) / (frames * mixed_mag.size(2))
            losses.append(per_sample.cpu())
            _, mixed_phase = self.audio.wav2spec_torch(mixed_wav)
            if mixed_phase.shape != mixed_mag.shape:
                raise UserError(f"the test spectrograms {tuple(mixed_mag.shape[1:])} do not match those of the "
                                f"test wavs {tuple(mixed_phase.shape[1:])}: regenerate the data with this config")
            est_wav = self.audio.spec2wav_torch(est_mag, mixed_phase, length=mixed_wav.size(1))  # [B, N]
            target_np, est_np, mixed_np = (w.float().cpu().numpy() for w in (target_wav, est_wav, mixed_wav))
            for i, n in enumerate(lengths.tolist()):  # mir_eval works per sample, on the CPU
                sdrs.append(sdr(target_np[i, :n], est_np[i, :n]))
                if self._input_sdrs is None:
                    input_sdrs.append(sdr(target_np[i, :n], mixed_np[i, :n]))
            if example is None:
                t, n = int(frames[0]), int(lengths[0])
                example = {
                    "mixed_wav": mixed_np[0, :n], "target_wav": target_np[0, :n], "est_wav": est_np[0, :n],
                    "mixed_spec": mixed_mag[0, :t].cpu().numpy(), "target_spec": target_mag[0, :t].cpu().numpy(),
                    "est_spec": est_mag[0, :t].cpu().numpy(), "est_mask": mask[0, :t].cpu().numpy(),
                }
        if self._input_sdrs is None:
            self._input_sdrs = input_sdrs
        return ValidationResult(test_loss=float(torch.cat(losses).mean()), sdr=_nanmedian(sdrs),
                                sdr_mean=_nanmean(sdrs), input_sdr=_nanmedian(self._input_sdrs),
                                count=len(sdrs), example=example)


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


FILE_LOGGER = "trainer.logfile"


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


# ---- the procedure -----------------------------------------------------------------------------
def run_training(hp, name, base_dir=".", embedder="resemblyzer", checkpoint_path=None, device="auto",
                 progress=True):
    """Train VoiceFilter as ``trainer.py`` does; returns the exit code (0, or 130/143 when
    stopped by SIGINT/SIGTERM after writing a checkpoint). Raises :class:`UserError` for bad
    input and :class:`TrainingDiverged` when the loss explodes."""
    dist = setup_distributed(device)
    base_dir = Path(base_dir)
    chkpt_dir = base_dir / hp.log.chkpt_dir / name
    log_dir = base_dir / hp.log.log_dir / name
    file_logger = logging.getLogger(FILE_LOGGER)
    with contextlib.ExitStack() as cleanup:  # closed in reverse: writer, process group, log handlers
        cleanup.callback(setup_run_logging(log_dir, name, dist.is_main))
        if dist.active:
            cleanup.callback(torch_dist.destroy_process_group)
        try:
            return _train(hp, name, dist, chkpt_dir, log_dir, embedder, checkpoint_path, progress, cleanup)
        except (UserError, TrainingDiverged) as err:
            file_logger.error("error: %s", err)
            raise
        except KeyboardInterrupt:
            file_logger.warning("interrupted")
            raise
        except BaseException:
            file_logger.exception("training stopped by an exception")
            raise


def _check_data_dir(hp, key):
    value = hp.data[key]
    if not value:
        raise UserError(f"data.{key} is empty: set it in the config or pass --{key}")
    if not Path(value).is_dir():
        raise UserError(f"data.{key} folder not found: {value}")
    return Path(value)


def _train(hp, name, dist, chkpt_dir, log_dir, embedder_spec, checkpoint_path, progress, cleanup):
    device, is_main = dist.device, dist.is_main
    precision, max_steps = hp.train.precision, hp.train.max_steps
    if max_steps < 0 or hp.train.validation_samples < 0:
        raise UserError("train.max_steps and train.validation_samples must be 0 or positive")
    check_precision(precision, device, "train.precision")
    train_dir, test_dir = _check_data_dir(hp, "train_dir"), _check_data_dir(hp, "test_dir")
    if checkpoint_path and not Path(checkpoint_path).is_file():
        raise UserError(f"checkpoint not found: {checkpoint_path}")
    logger.info("training %s on %s (%d process(es)), precision %s", name, device, dist.world_size, precision)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    elif device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)  # exact resume on CPU
    seed_everything(hp.train.seed)

    # data: d-vectors computed once per split (cached next to the data)
    dvec_embedder = load_embedder(embedder_spec, hp, device)
    embedder_name = dvec_embedder.name
    train_set = build_dataset(hp, train_dir, dvec_embedder, write_cache=is_main, progress=is_main and progress)
    test_set = None
    if is_main:
        test_set = build_dataset(hp, test_dir, dvec_embedder, with_wavs=True, limit=hp.train.validation_samples,
                                 progress=progress)
        test_set[0]  # read one sample now: a bad file fails here, not after hours of training
    del dvec_embedder  # frozen and no longer needed: the d-vectors are in the datasets
    train_set[0]
    train_loader = create_dataloader(hp, train_set, True, device, seed=hp.train.seed, rank=dist.rank,
                                     world_size=dist.world_size)
    sampler = train_loader.sampler
    batches_per_epoch = sampler.batches_per_epoch
    logger.info("%d training samples (batches per epoch and process: %d), %s test samples",
                len(train_set), batches_per_epoch, len(test_set) if test_set is not None else "-")

    # model, optimizer, resume
    model = VoiceFilter(hp).to(device)
    optimizer = make_optimizer(hp, model.parameters())
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    logger.info("VoiceFilter: %.2f M parameters", count_parameters(model) / 1e6)
    pos, best_sdr = Position(), None
    if checkpoint_path:
        logger.info("Resuming from checkpoint: %s", checkpoint_path)
        pos, best_sdr = resume(checkpoint_path, model, optimizer, scaler, hp, embedder_name, batches_per_epoch,
                               dist.world_size)
    else:
        logger.info("Starting new training run")
    if max_steps and pos.step >= max_steps:
        logger.info("the checkpoint is at step %d, train.max_steps is %d: nothing to train", pos.step, max_steps)
        return 0
    if dist.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()

    audio, loss_fn = Audio(hp), make_loss(hp)
    validator = writer = None
    if is_main:
        chkpt_dir.mkdir(parents=True, exist_ok=True)
        write_config_copy(chkpt_dir, hp)
        writer = MyWriter(hp, str(log_dir))
        cleanup.callback(writer.close)
        test_loader = create_dataloader(hp, test_set, False, device, seed=hp.train.seed)
        validator = Validator(test_loader, audio, loss_fn, device, precision, progress=progress)
    ckpt_args = dict(optimizer=optimizer, scaler=scaler, hp=hp, embedder_name=embedder_name,
                     world_size=dist.world_size)

    def checkpoint_and_validate():
        """Rank 0 validates, then writes the checkpoint (with the updated best score); the others wait."""
        nonlocal best_sdr
        if is_main:
            result = validator(unwrap(model))
            ex = result.example
            writer.log_evaluation(result.test_loss, result.sdr, ex["mixed_wav"], ex["target_wav"], ex["est_wav"],
                                  ex["mixed_spec"], ex["target_spec"], ex["est_spec"], ex["est_mask"], pos.step)
            logger.info("validation at step %d: test_loss %.5f, SDR median %.2f dB (mean %.2f, mixture %.2f) over "
                        "%d samples", pos.step, result.test_loss, result.sdr, result.sdr_mean, result.input_sdr,
                        result.count)
            improved = math.isfinite(result.sdr) and (best_sdr is None or result.sdr > best_sdr)
            if improved:
                best_sdr = result.sdr
            path = save_training_checkpoint(checkpoint_file(chkpt_dir, pos.step), model, pos=pos,
                                            best_sdr=best_sdr, **ckpt_args)
            logger.info("Saved checkpoint to: %s", path)
            if improved:
                save_best(chkpt_dir / BEST_NAME, model, hp, pos.step, best_sdr, embedder_name)
                logger.info("new best median SDR %.2f dB: %s", best_sdr, chkpt_dir / BEST_NAME)
        barrier(dist)

    # the loop
    stop = StopSignals()
    last_saved = None
    interval_start, interval_steps = time.perf_counter(), 0
    bar = tqdm(total=max_steps or None, initial=pos.step, desc=name, unit="step", dynamic_ncols=True,
               disable=not (is_main and progress))
    with stop, logging_redirect_tqdm(), bar:
        while True:
            sampler.set_position(pos.epoch, pos.batch)
            for batch in train_loader:
                loss = train_step(model, batch, optimizer, scaler, loss_fn, device, precision)
                pos.advance(batches_per_epoch)
                interval_steps += 1
                loss_value, signum = _sync_step(loss, stop.signum, dist)
                check_loss(loss_value, pos.step)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
                if is_main and pos.step % hp.train.summary_interval == 0:
                    step_time = (time.perf_counter() - interval_start) / interval_steps
                    lr = optimizer.param_groups[0]["lr"]
                    writer.log_training(loss_value, pos.step, step_time=step_time, learning_rate=lr)
                    logger.info("step %d: train_loss %.5f, %.3f s/step", pos.step, loss_value, step_time)
                    interval_start, interval_steps = time.perf_counter(), 0
                finished = bool(max_steps) and pos.step >= max_steps
                if pos.step % hp.train.checkpoint_interval == 0 or finished:
                    checkpoint_and_validate()
                    last_saved = pos.step
                    interval_start = time.perf_counter()  # step_time counts training, not validation
                if signum:
                    return _stop_for_signal(signum, pos, last_saved, chkpt_dir, model, best_sdr, is_main,
                                            dist, ckpt_args)
                if finished:
                    logger.info("reached train.max_steps %d; best median SDR %s", max_steps,
                                f"{best_sdr:.2f} dB" if best_sdr is not None else "-")
                    return 0


def _sync_step(loss, signum, dist):
    """The step's loss (averaged over processes) and whether any process was signalled.
    A synchronization point, once per step (the original's ``loss.item()``)."""
    if not dist.active:
        return loss.item(), signum
    loss = loss.float().clone()
    torch_dist.all_reduce(loss)
    flag = torch.tensor([signum], device=dist.device)
    torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
    return loss.item() / dist.world_size, int(flag.item())


def _stop_for_signal(signum, pos, last_saved, chkpt_dir, model, best_sdr, is_main, dist, ckpt_args):
    path = checkpoint_file(chkpt_dir, pos.step)
    if is_main and last_saved != pos.step:
        save_training_checkpoint(path, model, pos=pos, best_sdr=best_sdr, **ckpt_args)
    barrier(dist)
    name = signal.Signals(signum).name
    logger.warning("stopped by %s at step %d: checkpoint saved to %s (resume with --checkpoint_path %s)",
                   name, pos.step, path, path)
    return SIGNAL_EXIT.get(signum, 128 + signum)

