"""The learning-rate schedule (``train.lr_schedule``).

``constant`` is the original's: the optimizer's rate never changes. ``warmup_cosine`` rises
linearly from 0 over ``train.warmup_steps`` steps, then falls along a half cosine to
``train.lr_final_ratio`` times the base rate at ``train.max_steps`` (with ``max_steps`` 0 it
stays at the base rate after the warm-up). The rate is a function of the step alone, so a
resumed run continues the same schedule with nothing more saved in the checkpoint.
"""
import math

SCHEDULES = ("constant", "warmup_cosine")


def base_rate(hp):
    return hp.train.adabound.initial if hp.train.optimizer == "adabound" else hp.train.adam


def rate_factor(step, warmup_steps, max_steps, final_ratio):
    """Multiplier of the base rate for optimizer step ``step`` (0-based: the step about to be taken)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if not max_steps or max_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_schedule(optimizer, hp, step):
    """Set the optimizer's rate for the step about to be taken (nothing with ``constant``)."""
    if hp.train.lr_schedule == "constant":
        return
    factor = rate_factor(step, hp.train.warmup_steps, hp.train.max_steps, hp.train.lr_final_ratio)
    for group in optimizer.param_groups:
        group["lr"] = base_rate(hp) * factor
