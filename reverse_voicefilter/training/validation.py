"""Validation during training: the whole test set (or its first ``train.validation_samples``)
through the model, scored by evaluate.py's path (:mod:`reverse_voicefilter.evaluation.scoring`): the median SDR the
trainer logs and keeps ``best.pt`` by is the one ``evaluate.py --mask org`` reports for the
same checkpoint and folder (to float rounding).

Each sample goes to the :class:`~reverse_voicefilter.separation.separator.Separator` at its own length: the test
loader's zero-padded batches are not used (padding reaches the real frames through the BLSTM
and the dilated convolutions, so the score of a sample would depend on its batch-mates).
Samples of the same length go through the network together, samples longer than
``CHUNK_SECONDS`` (the official test set's reach 35 s) in chunks, so memory stays bounded.
"""
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from reverse_voicefilter.core.errors import UserError
from reverse_voicefilter.evaluation.scoring import TARGET, check_lengths, nan_mean, nan_median, score_sample
from reverse_voicefilter.separation.separator import Separator


@dataclass
class ValidationResult:
    test_loss: float
    sdr: float              # median over the samples
    sdr_mean: float
    input_sdr: float        # median SDR of the unprocessed mixture
    count: int
    example: dict           # first sample: wavs [N], spectrograms [T, F] (numpy)


def _as_list(batch):
    """A batch as its list of samples, each at its own length (no padding)."""
    return batch


class Validator:
    """Scores a model on the test set of ``loader`` (test items ``(dvec, target_mag, target_wav,
    mixed_wav)``): mean test loss and median SDR of the org estimate against the
    target wav, as evaluate.py computes them.

    The test loss is the training loss of ``mag * mask`` against the stored ``-target.pt``,
    averaged over each sample's frames, then over the samples.
    """

    def __init__(self, loader, audio, loss_fn, device, precision, progress=True):
        self.audio, self.loss_fn = audio, loss_fn
        self.device, self.precision, self.progress = device, precision, progress
        self.batch_size = loader.batch_size or 1
        # the same samples and workers as the loader, each sample unpadded
        self.samples = DataLoader(loader.dataset, batch_size=self.batch_size, shuffle=False,
                                  num_workers=loader.num_workers, worker_init_fn=loader.worker_init_fn,
                                  collate_fn=_as_list)
        self._input_sdrs = None  # SDR of the mixtures themselves: computed at the first call

    @torch.no_grad()
    def __call__(self, model):
        was_training = model.training
        model.eval()
        try:
            return self._run(model)
        finally:
            model.train(was_training)

    def _items(self, clean):
        """Each sample as the separator's ``(index, mixed wav [N], dvec [E])``; its wavs and target
        magnitude wait in ``clean``."""
        index = 0
        for batch in self.samples:
            for dvec, target_mag, target_wav, mixed_wav in batch:
                mixed, target = mixed_wav.numpy(), target_wav.numpy()
                check_lengths(mixed, target, f"test sample {index}'s -mixed.wav", "its -target.wav")
                clean[index] = (mixed, target, target_mag)
                yield index, mixed, dvec
                index += 1

    def _run(self, model):
        separator = Separator(self.audio.hp, model, None, self.device, self.precision, batch_size=self.batch_size)
        first = self._input_sdrs is None
        losses, sdrs, input_sdrs, example, clean = [], [], [], None, {}
        stream = separator.separate_stream(self._items(clean), ["org"], keep_mask=True)
        for index, result in tqdm(stream, total=len(self.samples.dataset), desc="validation", unit="sample",
                                  leave=False, disable=not self.progress):
            mixed, target, target_mag = clean.pop(index)
            est_wav = result.wavs["org"]
            est_mag = torch.from_numpy(result.mag * result.mask)  # [T, F]
            if est_mag.shape != target_mag.shape:
                raise UserError(f"the test spectrograms {tuple(target_mag.shape)} do not match those of the test "
                                f"wavs {tuple(est_mag.shape)}: regenerate the data with this config")
            losses.append(float(self.loss_fn(est_mag, target_mag).mean()))
            scores = score_sample((mixed, target, {"org": est_wav}, TARGET), before=first)["org"]
            sdrs.append(scores["sdr_after"])
            if first:
                input_sdrs.append(scores["sdr_before"])
            if example is None:
                example = {"mixed_wav": mixed, "target_wav": target, "est_wav": est_wav,
                           "mixed_spec": result.mag, "target_spec": target_mag.numpy(),
                           "est_spec": est_mag.numpy(), "est_mask": result.mask}
        if first:
            self._input_sdrs = input_sdrs
        return ValidationResult(test_loss=float(np.mean(losses)), sdr=nan_median(sdrs), sdr_mean=nan_mean(sdrs),
                                input_sdr=nan_median(self._input_sdrs), count=len(sdrs), example=example)
