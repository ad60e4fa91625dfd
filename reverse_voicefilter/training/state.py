"""Everything that changes the next training step, in one object.

:class:`TrainingState` holds the model, optimizer, gradient scaler, the data
position (step, epoch, batch within the epoch), the best validation score and,
through :meth:`TrainingState.state_dict`, the random states. Its state dict is
the checkpoint file: the original's ``{model, optimizer, step, hp_str}`` plus
``epoch``, ``batch_in_epoch``, ``world_size``, ``rng``, ``scaler``,
``best_sdr`` and ``embedder``, the same keys this project has always written,
so every earlier checkpoint resumes.
"""
import logging
import random
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

# written since the first exact-resume version; an original checkpoint lacks them
EXACT_RESUME_KEYS = ("epoch", "batch_in_epoch", "rng")


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


def is_adabound(optimizer_state):
    return "final_lr" in (optimizer_state.get("param_groups") or [{}])[0]


# ---- the state ---------------------------------------------------------------------------------
@dataclass
class TrainingState:
    """A run's state between two steps. ``model`` is the bare module (never the DDP wrapper);
    the next batch is batch ``batch`` of epoch ``epoch``; ``best_sdr`` is the best median
    validation SDR so far (None before the first validation)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    hp_str: str
    embedder: str
    batches_per_epoch: int
    world_size: int = 1
    step: int = 0
    epoch: int = 0
    batch: int = 0
    best_sdr: float | None = None

    def advance(self):
        """One optimizer step done: move to the next batch (and epoch)."""
        self.step += 1
        self.batch += 1
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0

    def improves(self, score):
        """Record a validation score; True when it is the best so far (NaN never is)."""
        if np.isfinite(score) and (self.best_sdr is None or score > self.best_sdr):
            self.best_sdr = float(score)
            return True
        return False

    def state_dict(self):
        """The checkpoint dict (random states as of now)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "hp_str": self.hp_str,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch,
            "world_size": self.world_size,
            "rng": rng_state(),
            "scaler": self.scaler.state_dict(),
            "best_sdr": self.best_sdr,
            "embedder": self.embedder,
        }

    def load_state_dict(self, state, source="the checkpoint"):
        """Continue from a checkpoint dict whose weights are already checked to fit the model
        (:func:`reverse_voicefilter.core.checkpoint.resume` does that, and the warnings about the config).

        An original checkpoint (model, optimizer, step, hp_str only) loads too: the position is
        derived from the step, and the data order and random state start afresh (a warning).
        An optimizer state of another optimizer is left out (a warning); one that does not fit
        the model raises ValueError or KeyError.
        """
        self.model.load_state_dict(state["model"])
        optimizer_state = state.get("optimizer")
        if optimizer_state is None:
            logger.warning("%s holds no optimizer state: the optimizer starts afresh", source)
        elif is_adabound(optimizer_state) != is_adabound(self.optimizer.state_dict()):
            logger.warning("%s was trained with another optimizer than this run's: the optimizer starts afresh",
                           source)
        else:
            self.optimizer.load_state_dict(optimizer_state)
        self.step = int(state.get("step", 0))
        best = state.get("best_sdr")
        self.best_sdr = float(best) if best is not None else None
        if not all(k in state for k in EXACT_RESUME_KEYS):
            self.epoch, self.batch = divmod(self.step, self.batches_per_epoch)
            logger.warning("%s holds no data position or random state (an original checkpoint?): resuming at "
                           "step %d, but not exactly as an uninterrupted run would continue", source, self.step)
            return
        self.epoch, self.batch = int(state["epoch"]), int(state["batch_in_epoch"])
        set_rng_state(state["rng"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        written_by = int(state.get("world_size", 1))
        if written_by != self.world_size:
            logger.warning("the checkpoint was written by %d process(es), this run has %d: the data order after "
                           "resuming differs from an uninterrupted run", written_by, self.world_size)
