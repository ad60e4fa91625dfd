"""The one scoring path of the trainer's validation and evaluate.py.

Both turn a test sample into an estimate and a figure the same way, so the
checkpoint the trainer keeps as ``best.pt`` is chosen by the figure evaluate.py
reports (to float rounding: evaluate.py folds the batch norms into the
convolutions, the trainer's model keeps them):

* the estimate: :meth:`reverse_voicefilter.separation.separator.Separator.separate_stream`: the
  mixture's normalized magnitude and phase recomputed from ``-mixed.wav`` on
  the device (``Audio.wav2spec_torch``), the mask applied by
  :func:`reverse_voicefilter.separation.separator.apply_mask`, the inverse STFT with the mixture's
  phase at the mixture's length; each mixture at its own length (batched only
  with mixtures of the same length, never zero-padded), those longer than
  ``CHUNK_SECONDS`` in chunks with context, so any length fits in bounded memory;
* the lengths: ``-mixed.wav`` and ``-target.wav`` must be equally long
  (:func:`check_lengths`);
* the figures: :func:`score_sample` (BSS Eval SDR, mir_eval's ``bss_eval_sources``
  figure as the original's validation reported it, and SI-SDR, of the mixture and of each output against
  its clean reference), summarized by :func:`nan_median` / :func:`nan_mean`
  (a sample whose SDR is undefined, NaN, is left out of both).
"""
import numpy as np

from reverse_voicefilter.core.errors import UserError
from reverse_voicefilter.evaluation.metrics import sdr_many, si_sdr

TARGET, RESIDUAL = "target", "mixed_minus_target"


def reference_kind(mode, org_kind=TARGET):
    """The clean signal a mode's output is scored against: ``org_kind`` for org (what the model
    keeps), the other one for the inverse modes (what they keep: everything org removes)."""
    if mode == "org":
        return org_kind
    return RESIDUAL if org_kind == TARGET else TARGET


def check_lengths(mixed, target, mixed_name, target_name):
    """A sample's mixture and clean target [N] must be equally long (else the SDR would compare
    different spans)."""
    if mixed.shape[-1] != target.shape[-1]:
        raise UserError(f"{mixed_name} and {target_name} differ in length ({mixed.shape[-1]} and "
                        f"{target.shape[-1]} samples): regenerate the sample")


def score_sample(task, before=True, device=None):
    """SDR and SI-SDR of one sample's mixture and outputs (a module-level function for a pool).

    ``task``: (mixed [N], target [N], {mode: output [N]}, org_kind) -> {mode: {metric: value}}
    with ``sdr_before``, ``sdr_after``, ``sdr_gain`` and the same for ``si_sdr``. ``before``
    False leaves the mixture's figures (and the gains) NaN: fewer SDRs to compute. The sample's
    SDRs are one batched call (:func:`~reverse_voicefilter.evaluation.metrics.sdr_many`), on
    ``device`` when given.
    """
    mixed, target, outputs, org_kind = task
    references = {TARGET: target, RESIDUAL: mixed - target}
    kinds = {mode: reference_kind(mode, org_kind) for mode in outputs}
    needed = sorted(set(kinds.values())) if before else []
    pairs = [(references[k], mixed) for k in needed] + [(references[kinds[m]], out) for m, out in outputs.items()]
    values = sdr_many([r for r, _ in pairs], [e for _, e in pairs], device)
    nan = float("nan")
    figures_before = {k: (values[i], si_sdr(references[k], mixed)) for i, k in enumerate(needed)}
    scores = {}
    for j, (mode, output) in enumerate(outputs.items()):
        kind = kinds[mode]
        sdr_in, si_in = figures_before.get(kind, (nan, nan))
        sdr_out, si_out = values[len(needed) + j], si_sdr(references[kind], output)
        scores[mode] = {"sdr_before": sdr_in, "sdr_after": sdr_out, "sdr_gain": sdr_out - sdr_in,
                        "si_sdr_before": si_in, "si_sdr_after": si_out, "si_sdr_gain": si_out - si_in}
    return scores


def _finite(values):
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]


def nan_median(values):
    """Median of the finite values (NaN when there is none)."""
    values = _finite(values)
    return float(np.median(values)) if values.size else float("nan")


def nan_mean(values):
    """Mean of the finite values (NaN when there is none)."""
    values = _finite(values)
    return float(np.mean(values)) if values.size else float("nan")
