"""The three mask modes, in the normalized log-magnitude domain (the original's inference.py):

* ``org``      est = mag * mask                       (keep the reference speaker)
* ``inv_div``  est = factor * mag / max(mask, eps)    (remove the reference speaker)
* ``inv_sub``  est = mag * (1 - mask) / factor        (remove the reference speaker)

``spec2wav`` clips est to [0, 1] before the inverse STFT, as the original did.
The ``eps`` floor of ``inv_div`` (:data:`INV_DIV_EPS`) only guards against a
division by a mask of (nearly) zero: any mask below it gives est = 1 (the
clip's ceiling) already for every bin whose magnitude exceeds eps / factor,
so the floor changes nothing the original could output in practice.
"""
import torch

from reverse_voicefilter.separation.options import DEFAULT_FACTOR, INV_DIV_EPS


def apply_mask(mag, mask, mode, factor=DEFAULT_FACTOR, eps=INV_DIV_EPS):
    """Estimated normalized magnitude from the mixture's ``mag`` and the ``mask`` (same shape)."""
    if mode == "org":
        return mag * mask
    if mode == "inv_div":
        return factor * mag / torch.clamp(mask, min=eps)
    if mode == "inv_sub":
        return mag * (1.0 - mask) / factor
    raise ValueError(f"unknown mask mode {mode!r}")


