"""Checkpoint files: written atomically, read safely, checked against the model.

The file is the original's dict ``{model, optimizer, step, hp_str}`` plus what
an exact resume needs (:class:`reverse_voicefilter.training.state.TrainingState` writes it).
Loading always uses ``weights_only=True``: a checkpoint from the internet cannot
run code. The second half is the training run's checkpoint folder
``chkpt/NAME``: ``chkpt_STEP.pt``, ``best.pt`` and ``config.yaml``, how a run
starts in it (fresh, resumed, or fine-tuned from other weights) and what it
refuses to overwrite.
"""
import logging
import re
import zipfile
from pathlib import Path

import torch

from reverse_voicefilter.core.atomic import remove_stale_temporaries, save_torch, write_text
from reverse_voicefilter.core.errors import UserError
from reverse_voicefilter.core.hparams import config_changes

logger = logging.getLogger(__name__)

BEST_NAME = "best.pt"
CONFIG_NAME = "config.yaml"
CHECKPOINT_NAME = re.compile(r"^chkpt_(\d+)\.pt$")
# what the suite's earlier writer left behind when killed mid-write ("chkpt_100.pt.tmp")
LEGACY_TEMPORARY_SUFFIXES = (".pt.tmp", ".yaml.tmp")
# Where the data lie and when to stop are not hyper-parameters: a resume that changes only
# these (a moved data folder, a longer run) is not warned about.
NOT_HYPERPARAMETERS = {"train.max_steps", "data.train_dir", "data.test_dir"}


def save_checkpoint(state, path):
    """``torch.save`` through :func:`reverse_voicefilter.core.atomic.save_torch`: a crash never leaves half a file."""
    return save_torch(state, path)


def compact_checkpoint(src, dst):
    """Copy a training checkpoint with its floating-point tensors in 16 bits, half the size:
    the weights in float16 (finer steps), the optimizer's moments in bfloat16 (float32's range,
    which Adam's squared gradients need). Loading casts them back to the model's float32, and
    the run resumes as from the original file up to that rounding."""
    state = load_checkpoint(src)
    state["model"] = {k: _to_16_bits(v, torch.float16) for k, v in state["model"].items()}
    for param_state in state.get("optimizer", {}).get("state", {}).values():
        for key, value in param_state.items():
            if key != "step":  # Adam's step counter stays exact
                param_state[key] = _to_16_bits(value, torch.bfloat16)
    return save_checkpoint(state, dst)


def _to_16_bits(value, dtype):
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def load_checkpoint(path, map_location="cpu", mmap=False):
    """Read a checkpoint dict; a missing, corrupt or foreign file is a :class:`UserError`.
    ``mmap``: map the file instead of reading it (zip-format files; others are read), so that
    only the tensors used are read: inference uses the model, not the optimizer's state."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True,
                           mmap=bool(mmap) and zipfile.is_zipfile(path))
    except Exception as err:  # truncated zip, pickle with code, random bytes: all unusable
        raise UserError(f"cannot load checkpoint {path}: {str(err).splitlines()[0]}") from None
    if isinstance(state, dict) and "model" not in state and all(isinstance(v, torch.Tensor) for v in state.values()):
        state = {"model": state}  # a bare state_dict (e.g. a best-model file)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise UserError(f"{path} is not a VoiceFilter checkpoint (no 'model' state_dict in it)")
    return state


def state_dict_mismatch(module, state_dict):
    """Why ``state_dict`` does not fit ``module``: ``("keys", missing, unexpected)``,
    ``("shape", key, shape in the file, shape in the module)``, or None when it fits."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        return "keys", missing[:3], unexpected[:3]
    for key, value in expected.items():
        if state_dict[key].shape != value.shape:
            return "shape", key, tuple(state_dict[key].shape), tuple(value.shape)
    return None


def load_model_weights(model, state_dict, path, assign=False):
    """``model.load_state_dict`` with a clear error when the checkpoint does not fit the config.
    ``assign``: the model takes the checkpoint's tensors (for a model built on the meta device)."""
    mismatch = state_dict_mismatch(model, state_dict)
    if mismatch and mismatch[0] == "keys":
        raise UserError(f"checkpoint {path} does not fit this model (missing {mismatch[1]}, "
                        f"unexpected {mismatch[2]})")
    if mismatch:
        _, key, in_file, in_model = mismatch
        raise UserError(f"checkpoint {path} does not fit the config: {key} is {in_file} in the file but "
                        f"{in_model} in the model (was it trained with another config? pass the same -c)")
    model.load_state_dict(state_dict, assign=assign)


# ---- a training run's checkpoint folder ---------------------------------------------------------
def checkpoint_file(chkpt_dir, step):
    return Path(chkpt_dir) / f"chkpt_{step}.pt"


def run_checkpoints(chkpt_dir):
    """``{step: path}`` of the ``chkpt_STEP.pt`` files in a run's folder, by step."""
    folder = Path(chkpt_dir)
    found = {}
    if folder.is_dir():
        for path in folder.iterdir():
            match = CHECKPOINT_NAME.match(path.name)
            if match and path.is_file():
                found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def check_run_folder(chkpt_dir, resuming, overwrite):
    """Refuse to start a run afresh where an earlier run left its checkpoints: its ``best.pt`` and
    ``config.yaml`` would be overwritten without a word. Resuming, or ``--overwrite``, is fine."""
    chkpt_dir = Path(chkpt_dir)
    checkpoints = run_checkpoints(chkpt_dir)
    if resuming or overwrite or not (checkpoints or (chkpt_dir / BEST_NAME).is_file()):
        return
    if checkpoints:
        step, latest = next(reversed(checkpoints.items()))
        raise UserError(f"{chkpt_dir} already holds the checkpoints of an earlier run (the latest: step {step}); "
                        f"to continue it add --checkpoint_path {latest}, or pass --overwrite to start over "
                        f"(deleting its checkpoints and best.pt)")
    raise UserError(f"{chkpt_dir} already holds the best.pt of an earlier run; pass --overwrite to start over "
                    f"(deleting it)")


def clear_earlier_run(chkpt_dir, keep=None):
    """``--overwrite``: delete the earlier run's ``chkpt_STEP.pt`` files and ``best.pt`` (not ``keep``,
    the checkpoint this run starts from, should it lie there), so the folder holds only this run."""
    chkpt_dir = Path(chkpt_dir)
    doomed = [*run_checkpoints(chkpt_dir).values(), chkpt_dir / BEST_NAME]
    removed = []
    for path in doomed:
        if path.is_file() and not (keep and Path(keep).is_file() and path.samefile(keep)):
            path.unlink()
            removed.append(path)
    if removed:
        logger.warning("--overwrite: deleted %d file(s) of the earlier run in %s", len(removed), chkpt_dir)
    return removed


def remove_interrupted_writes(chkpt_dir):
    """Delete the temporaries a killed run left mid-write in its checkpoint folder."""
    for path in remove_stale_temporaries(chkpt_dir, legacy_suffixes=LEGACY_TEMPORARY_SUFFIXES):
        logger.warning("removed %s, left by an interrupted checkpoint write", path)


def write_config_copy(chkpt_dir, hp):
    """The run's full config next to its checkpoints."""
    return write_text(Path(chkpt_dir) / CONFIG_NAME, hp.hp_str)


def save_best(chkpt_dir, state):
    """``best.pt``: weights, step, config and median SDR of the best validation so far."""
    return save_checkpoint({"model": state.model.state_dict(), "step": state.step, "hp_str": state.hp_str,
                            "sdr": state.best_sdr, "embedder": state.embedder}, Path(chkpt_dir) / BEST_NAME)


def config_changes_or_none(old_hp_str, hp):
    """``[(key, old, new)]`` between a checkpoint's config and this run's; None when the old one cannot be read."""
    try:
        return config_changes(old_hp_str or "", hp)
    except UserError:
        return None


def _same_folder(a, b):
    return Path(a or "").expanduser().resolve() == Path(b or "").expanduser().resolve()


def _warn_other_embedder(ckpt, state):
    if ckpt.get("embedder") and ckpt["embedder"] != state.embedder:
        logger.warning("the checkpoint was trained with d-vectors of %s, this run uses %s", ckpt["embedder"],
                       state.embedder)


def resume(path, state, hp):
    """Continue ``state`` (a :class:`reverse_voicefilter.training.state.TrainingState`) from checkpoint ``path``.

    Weights that do not fit are an error naming the parameter; a config that differs is a
    warning listing the hyper-parameters. The best score is kept only when it was measured on
    this run's test set (the same ``data.test_dir``): on another one it could never be beaten
    fairly, and ``best.pt`` would never be written for the new data.
    """
    ckpt = load_checkpoint(path, map_location="cpu")
    load_model_weights(state.model, ckpt["model"], path)
    changes = config_changes_or_none(ckpt.get("hp_str"), hp)
    diffs = [f"{k}: {old!r} -> {new!r}" for k, old, new in changes or () if k not in NOT_HYPERPARAMETERS]
    if changes is None:
        logger.warning("the checkpoint's config cannot be read; using the given config")
    elif diffs:
        logger.warning("New hparams is different from checkpoint (using the new ones): %s", "; ".join(diffs))
    try:
        state.load_state_dict(ckpt, source=path)
    except (ValueError, KeyError) as err:
        raise UserError(f"the optimizer state in {path} does not fit this model: {err}") from None
    _warn_other_embedder(ckpt, state)
    old_test_dir = next((old for k, old, _ in changes or () if k == "data.test_dir"), None)
    if state.best_sdr is not None and old_test_dir is not None and not _same_folder(old_test_dir, hp.data.test_dir):
        logger.info("the checkpoint's best median SDR (%.2f dB) was measured on %s, this run validates on %s: "
                    "the best score starts afresh, and best.pt follows the new test set", state.best_sdr,
                    old_test_dir, hp.data.test_dir)
        state.best_sdr = None
    return state


def init_weights(path, state):
    """``--init_from``: the weights of checkpoint ``path`` only; optimizer, step, data position,
    random state and best score stay those of a new run (fine-tuning)."""
    ckpt = load_checkpoint(path, map_location="cpu")
    load_model_weights(state.model, ckpt["model"], path)
    _warn_other_embedder(ckpt, state)
    logger.info("Fine-tuning from the weights of %s (its step %s): new optimizer, step 0, no best score yet",
                path, ckpt.get("step", "?"))
    return state
