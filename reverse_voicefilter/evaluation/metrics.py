"""Separation metrics: SDR as the original (mir_eval) and scale-invariant SDR."""
import warnings

import numpy as np
from mir_eval.separation import bss_eval_sources


def _align(reference, estimate):
    n = min(len(reference), len(estimate))
    return np.asarray(reference[:n], dtype=np.float64), np.asarray(estimate[:n], dtype=np.float64)


def sdr(reference, estimate):
    """mir_eval ``bss_eval_sources`` SDR (dB) of one estimate against one clean source.

    NaN where the reference is silent (the metric is undefined there).
    """
    reference, estimate = _align(reference, estimate)
    if not np.any(reference) or not np.any(estimate):
        return float("nan")
    with warnings.catch_warnings():
        # mir_eval 0.8 marks bss_eval_sources deprecated; it is still the original's metric
        warnings.simplefilter("ignore", FutureWarning)
        value, _, _, _ = bss_eval_sources(reference[None], estimate[None], compute_permutation=False)
    return float(value[0])


def si_sdr(reference, estimate, eps=1e-8):
    """Scale-invariant SDR (dB), Le Roux et al. 2019 (zero-mean signals)."""
    reference, estimate = _align(reference, estimate)
    reference = reference - reference.mean()
    estimate = estimate - estimate.mean()
    scale = np.dot(estimate, reference) / (np.dot(reference, reference) + eps)
    target = scale * reference
    noise = estimate - target
    return float(10 * np.log10((np.dot(target, target) + eps) / (np.dot(noise, noise) + eps)))
