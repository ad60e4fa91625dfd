"""The loss (the original's MSE of normalized magnitudes, or the paper's power-law one), the
optimizer, and one training step."""
import math

import torch

from reverse_voicefilter.core.errors import TrainingDiverged
from reverse_voicefilter.core.precision import autocast

LOSS_LIMIT = 1e8            # the original's "loss exploded" threshold
POWER_LAW_FLOOR = 1e-4      # x**p has an infinite slope at 0: clamp before compressing


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
