"""Checkpoint files: written atomically, read safely, checked against the model.

The file is the original's dict ``{model, optimizer, step, hp_str}`` plus what
an exact resume needs (added by the trainer). Loading always uses
``weights_only=True``: a checkpoint from the internet cannot run code.
"""
import logging
import os
from pathlib import Path

import torch

from utils.errors import UserError

logger = logging.getLogger(__name__)


def save_checkpoint(state, path):
    """``torch.save`` to ``path.tmp`` then rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint dict; a missing, corrupt or foreign file is a :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, pickle with code, random bytes: all unusable
        raise UserError(f"cannot load checkpoint {path}: {str(err).splitlines()[0]}") from None
    if isinstance(state, dict) and "model" not in state and all(isinstance(v, torch.Tensor) for v in state.values()):
        state = {"model": state}  # a bare state_dict (e.g. a best-model file)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise UserError(f"{path} is not a VoiceFilter checkpoint (no 'model' state_dict in it)")
    return state


def load_model_weights(model, state_dict, path):
    """``model.load_state_dict`` with a clear error when the checkpoint does not fit the config."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise UserError(f"checkpoint {path} does not fit this model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    for key, value in expected.items():
        if state_dict[key].shape != value.shape:
            raise UserError(f"checkpoint {path} does not fit the config: {key} is "
                            f"{tuple(state_dict[key].shape)} in the file but {tuple(value.shape)} in the "
                            f"model (was it trained with another config? pass the same -c)")
    model.load_state_dict(state_dict)
