"""Validation during training: the whole test set (or its first ``train.validation_samples``)
through the model, scored as the original does: mean test loss and median SDR (mir_eval)
of the re-synthesized estimate against the target wav. Spectrograms and inverse STFTs are
batched on the training device; SDR is computed per sample on the CPU.
"""
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from utils.errors import UserError
from utils.metrics import sdr
from utils.precision import autocast


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
