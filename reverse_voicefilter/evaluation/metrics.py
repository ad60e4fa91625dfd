"""Separation metrics: SDR as the original reported it, and scale-invariant SDR.

SDR is BSS Eval's (``mir_eval.separation.bss_eval_sources``, which the original's validation
called): the estimate projected on the reference filtered by a 512-tap distortion filter, the
energy of that projection over the energy of the rest. It is computed by torchmetrics'
``signal_distortion_ratio`` (``filter_length=512``, ``zero_mean=False``, float64), batched and on
any device, rather than by mir_eval itself: the same figure (tests/test_metrics.py holds it to
mir_eval within 1e-3 dB on real speech; measured 1e-13 dB), several estimates in one call, and on
a GPU where the model runs. torchmetrics rather than fast_bss_eval: maintained, a wheel, and
already beside torch on most GPU images. mir_eval stays the tests' reference (0.8 marks
``bss_eval_sources`` deprecated).

On the CPU the pairs are solved one at a time: torch 2.13's batched ``linalg.solve`` on the CPU
(the LU solve of several 512 x 512 systems spread over two or more threads) hands MKL's DLASWP
corrupt pivots and fails ("Pivots given to lu_solve must all be greater or equal to 1"); one
system per call is exact, and the solve is a small part of the cost.
"""
import numpy as np
import torch

FILTER_LENGTH = 512  # BSS Eval's distortion filter (mir_eval's flen)


def _as_rows(signals):
    return torch.as_tensor(np.stack([np.asarray(s, dtype=np.float64) for s in signals]))


def sdr_many(references, estimates, device=None):
    """BSS Eval SDR (dB) of each estimate against its reference (two lists of equal-length 1-D
    arrays, pair by pair), as a list of floats; NaN where the reference or the estimate is silent
    (the metric is undefined there). On a GPU one batched call per length; on the CPU one pair
    per call (see above)."""
    from torchmetrics.functional.audio import signal_distortion_ratio

    out = [float("nan")] * len(references)
    by_length = {}
    for k, (ref, est) in enumerate(zip(references, estimates, strict=True)):
        n = min(len(ref), len(est))
        if np.any(ref[:n]) and np.any(est[:n]):
            by_length.setdefault(n, []).append(k)
    for n, keys in by_length.items():
        refs = _as_rows([references[k][:n] for k in keys]).to(device or "cpu")
        ests = _as_rows([estimates[k][:n] for k in keys]).to(device or "cpu")
        batches = [slice(None)] if refs.device.type != "cpu" else [slice(i, i + 1) for i in range(len(keys))]
        values = torch.cat([signal_distortion_ratio(ests[b], refs[b], filter_length=FILTER_LENGTH, zero_mean=False)
                            for b in batches])
        for k, value in zip(keys, values.cpu().tolist(), strict=True):
            out[k] = value
    return out


def sdr(reference, estimate):
    """BSS Eval SDR (dB) of one estimate against one clean source; NaN where either is silent."""
    return sdr_many([reference], [estimate])[0]


def si_sdr(reference, estimate, eps=1e-8):
    """Scale-invariant SDR (dB), Le Roux et al. 2019 (zero-mean signals)."""
    n = min(len(reference), len(estimate))
    reference = np.asarray(reference[:n], dtype=np.float64)
    estimate = np.asarray(estimate[:n], dtype=np.float64)
    reference = reference - reference.mean()
    estimate = estimate - estimate.mean()
    scale = np.dot(estimate, reference) / (np.dot(reference, reference) + eps)
    target = scale * reference
    noise = estimate - target
    return float(10 * np.log10((np.dot(target, target) + eps) / (np.dot(noise, noise) + eps)))
