"""Checkpoint files: written atomically, read safely, checked against the model.

The file is the original's dict ``{model, optimizer, step, hp_str}`` plus what
an exact resume needs (:class:`reverse_voicefilter.training.state.TrainingState` writes it).
Loading always uses ``weights_only=True``: a checkpoint from the internet cannot
run code. The second half is the training run's checkpoint folder
``chkpt/NAME``: ``chkpt_STEP.pt``, ``best.pt`` and ``config.yaml``, what NAME
may be, how a run starts in it (fresh, resumed, or fine-tuned from other
weights), what it refuses to overwrite, and how ``best.pt`` is restored after
a kill.
"""
import logging
import os
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
# keys whose change on resume is not worth a warning: the budget, the data folders, and the conv
# stack's memory format (the same model and values to float rounding)
NOT_HYPERPARAMETERS = {"train.max_steps", "data.train_dir", "data.test_dir", "train.channels_last"}
_NO_CHECKPOINT, _UNREADABLE = object(), object()  # what came before a checkpoint, for restore_best


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
    check_checkpoint_file(path)
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


def check_checkpoint_file(path, flag=None):
    """A checkpoint named on the command line is a file: a folder or a missing path is one line
    saying which (``flag``: the option that named it)."""
    path = Path(path)
    named = f"{flag} " if flag else ""
    if path.is_dir():
        latest = list(run_checkpoints(path).values())
        hint = f", e.g. {latest[-1]}" if latest else ""
        raise UserError(f"{named}{path} is a folder, not a checkpoint: give a checkpoint file (chkpt_STEP.pt){hint}")
    if not path.is_file():
        raise UserError(f"{flag + ': ' if flag else ''}checkpoint not found: {path}")
    return path


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


def check_run_name(name, flag="-m"):
    """A run's name is one plain folder name: with a path separator, ``..`` or nothing at all, its
    checkpoints and logs (and ``--overwrite``'s deletions) would land outside ``-b`` or in
    ``chkpt/`` itself."""
    text = str(name)
    separators = [sep for sep in (os.sep, os.altsep, "/") if sep]
    if not text.strip() or text in (".", "..") or any(sep in text for sep in separators) or "\0" in text:
        raise UserError(f"{flag} {text!r} is not a run name: give one plain folder name (no '/', not '.' or '..'); "
                        f"its chkpt/ and logs/ folders go under -b")
    return text


def check_run_folder(chkpt_dir, resuming, overwrite, product=BEST_NAME):
    """Refuse to start a run afresh where an earlier run left its checkpoints: its ``product``
    (``best.pt``, the embedder trainer's ``embedder.pt``) and ``config.yaml`` would be overwritten
    without a word, and its later checkpoints left beside the new run's. Resuming, or
    ``--overwrite``, is fine."""
    chkpt_dir = Path(chkpt_dir)
    checkpoints = run_checkpoints(chkpt_dir)
    if resuming or overwrite or not (checkpoints or (chkpt_dir / product).is_file()):
        return
    if checkpoints:
        step, latest = next(reversed(checkpoints.items()))
        raise UserError(f"{chkpt_dir} already holds the checkpoints of an earlier run (the latest: step {step}); "
                        f"to continue it add --checkpoint_path {latest}, or pass --overwrite to start over "
                        f"(deleting its checkpoints and {product})")
    raise UserError(f"{chkpt_dir} already holds the {product} of an earlier run; pass --overwrite to start over "
                    f"(deleting it)")


def clear_earlier_run(chkpt_dir, keep=None, product=BEST_NAME):
    """``--overwrite``: delete the earlier run's ``chkpt_STEP.pt`` files and ``product`` (not ``keep``,
    the file this run starts from, should it lie there), so the folder holds only this run."""
    chkpt_dir = Path(chkpt_dir)
    doomed = [*run_checkpoints(chkpt_dir).values(), chkpt_dir / product]
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


def restore_best(chkpt_dir, state, first_validation):
    """After a resume: ``best.pt`` in ``chkpt_dir`` holds the best score ``state`` carries.

    A run killed while writing ``best.pt``, or between a checkpoint and ``best.pt``, leaves an
    older ``best.pt`` or none, while its checkpoints carry the new score. The score stays, and
    ``best.pt`` is written again from the run's checkpoint of the best step: the first
    ``chkpt_STEP.pt`` holding that score (a checkpoint and ``best.pt`` of one step hold the same
    weights). Without that checkpoint here (another run's checkpoint, or one deleted), the
    score becomes the one ``best.pt`` holds, or starts afresh without a ``best.pt``, so that
    ``best.pt`` is never left behind a score nothing can beat. A ``best.pt`` from beyond this
    checkpoint (resuming from an earlier one) stays until beaten.
    ``first_validation``: the step of a run's first validation (its checkpoint interval).
    """
    if state.best_sdr is None:
        return state
    best_path = Path(chkpt_dir) / BEST_NAME
    best = _read_best(best_path)
    if best is not None and (best.get("sdr") == state.best_sdr or int(best.get("step") or 0) > state.step):
        return state
    found = _best_step_checkpoint(chkpt_dir, state.best_sdr, state.step, first_validation)
    if found:
        step, ckpt = found
        save_checkpoint({"model": ckpt["model"], "step": step, "hp_str": ckpt.get("hp_str"), "sdr": state.best_sdr,
                         "embedder": ckpt.get("embedder")}, best_path)
        logger.warning("%s %s: written again from chkpt_%d.pt (median SDR %.2f dB), the best step of the run "
                       "(an interrupted write?)", best_path, "was missing" if best is None else
                       f"held step {best.get('step')}", step, state.best_sdr)
    elif best is not None and best.get("sdr") is not None:
        logger.info("%s holds step %s (median SDR %.2f dB): the best score is that, not the checkpoint's %.2f dB",
                    best_path, best.get("step"), best["sdr"], state.best_sdr)
        state.best_sdr = float(best["sdr"])
    else:
        # another run's checkpoint (or a moved one): its best score belongs to its own best.pt
        logger.info("%s holds no best.pt yet: the best score starts afresh (the checkpoint's was %.2f dB)",
                    chkpt_dir, state.best_sdr)
        state.best_sdr = None
    return state


def _read_best(path):
    """``best.pt``'s dict, or None when missing or unreadable."""
    if not Path(path).is_file():
        return None
    try:
        return load_checkpoint(path, mmap=True)
    except UserError as err:
        logger.warning("%s", err)
        return None


def _best_step_checkpoint(chkpt_dir, best_sdr, up_to, first_validation):
    """``(step, checkpoint)`` of the run's checkpoint where the best score ``best_sdr`` was reached:
    the first one here holding it, at most ``up_to``, whose predecessor here holds another score;
    with no predecessor only at the run's first validation (earlier checkpoints may have been
    deleted, and a later one holding the score has later weights). None when there is none."""
    before = _NO_CHECKPOINT
    for step, path in run_checkpoints(chkpt_dir).items():
        if step > up_to:
            break
        try:
            held = load_checkpoint(path, mmap=True)
        except UserError:
            before = _UNREADABLE
            continue
        if held.get("best_sdr") == best_sdr:
            reached_here = step <= first_validation if before is _NO_CHECKPOINT else before is not _UNREADABLE
            return (step, held) if reached_here else None
        before = held.get("best_sdr")
    return None


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
