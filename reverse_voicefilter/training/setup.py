"""What :func:`~reverse_voicefilter.training.train.run_training` does before its loop: the checks that
need no compute, the backends, the data (precomputed or mixed on the fly), the training state
(fresh, resumed or fine-tuned), and the run's logging."""
import contextlib
import logging
import logging.handlers
import sys
import time
from pathlib import Path

import torch

from reverse_voicefilter.core.checkpoint import check_checkpoint_file, init_weights, restore_best, resume
from reverse_voicefilter.core.errors import UserError
from reverse_voicefilter.core.precision import check_precision
from reverse_voicefilter.data.dataloader import build_dataset, create_dataloader
from reverse_voicefilter.data.online import create_online_loader
from reverse_voicefilter.model.embedder import load_embedder
from reverse_voicefilter.model.model import VoiceFilter, count_parameters
from reverse_voicefilter.training.state import TrainingState
from reverse_voicefilter.training.steps import make_optimizer

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s - %(levelname)s - %(message)s"  # the original's
FILE_LOGGER = "trainer.logfile"


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
        if path:
            check_checkpoint_file(path, flag)
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
        if dist.is_main and chkpt_dir is not None:
            restore_best(chkpt_dir, state, first_validation=hp.train.checkpoint_interval)
    elif init_from:
        init_weights(init_from, state)
    else:
        logger.info("Starting new training run")
    return state


class RunLogging:
    """The run's logging: the console from the start; on rank 0 the file ``log_dir/NAME-TIME.log``
    from :meth:`open_file` on, with all that was logged before it. A run refused before it opens
    the file leaves no log behind. Other ranks log warnings only. :meth:`close` undoes it all."""

    def __init__(self, is_main):
        self.root = logging.getLogger()
        self.old_level = self.root.level
        self.formatter = logging.Formatter(LOG_FORMAT)
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(self.formatter)
        self.file_logger = logging.getLogger(FILE_LOGGER)
        self.file_logger.propagate = False
        self.handlers = [console]
        # what is logged before the file exists waits here (flushLevel above CRITICAL: only open_file flushes)
        self.pending = logging.handlers.MemoryHandler(10_000, flushLevel=logging.CRITICAL + 1) if is_main else None
        if self.pending:
            self.file_logger.addHandler(self.pending)
            self.root.addHandler(self.pending)
        self.root.addHandler(console)
        self.root.setLevel(logging.INFO if is_main else logging.WARNING)  # (tqdm's redirect drops handler levels)

    def open_file(self, log_dir, name):
        """Start the log file (rank 0) with the records so far; returns its path (None elsewhere)."""
        if self.pending is None:
            return None
        log_dir.mkdir(parents=True, exist_ok=True)
        log_file = log_dir / f"{name}-{time.strftime('%Y-%m-%d_%H-%M-%S')}.log"
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(self.formatter)
        self.pending.setTarget(file_handler)
        self.pending.flush()
        self._drop_pending()
        self.root.addHandler(file_handler)
        self.file_logger.addHandler(file_handler)
        self.handlers.append(file_handler)
        return log_file

    def _drop_pending(self):
        if self.pending is not None:
            self.root.removeHandler(self.pending)
            self.file_logger.removeHandler(self.pending)
            self.pending.setTarget(None)  # a file never opened: its records go nowhere
            self.pending.close()
            self.pending = None

    def close(self):
        self._drop_pending()
        for handler in self.handlers:
            self.root.removeHandler(handler)
            self.file_logger.removeHandler(handler)
            handler.close()
        self.root.setLevel(self.old_level)


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
