"""Pictures: spectrogram panels for TensorBoard and files, SDR before/after scatters.

matplotlib's Agg backend only (no display); figures are rendered through
``buffer_rgba`` (the original's ``tostring_rgb`` is gone from matplotlib).
"""
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from reverse_voicefilter.core.atomic import atomic_path  # noqa: E402


def _figure_to_array(fig):
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    plt.close(fig)
    return rgba[..., :3].copy()


def spectrogram_image(spec, title=None):
    """[T, F] array -> RGB image [H, W, 3] uint8 (time on x, frequency up)."""
    fig, ax = plt.subplots(figsize=(10, 3))
    im = ax.imshow(np.asarray(spec).T, aspect="auto", origin="lower", interpolation="none")
    fig.colorbar(im, ax=ax)
    ax.set_xlabel("frames")
    ax.set_ylabel("frequency bins")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _figure_to_array(fig)


def _save_figure(fig, path):
    """Save atomically (temporary file in the same folder, then rename)."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format=Path(path).suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return Path(path)


def save_spectrograms(path, panels, hop_seconds=None, gain_panels=(), title=None, max_hz=None):
    """Save a PNG with one panel per ``{title: [T, F] array}``, stacked vertically, time on x.

    Panels named in ``gain_panels`` (masks, gains) share one colour scale from 0; the others
    (normalized magnitudes in [0, 1]) share the scale 0..1, so mixture and results compare
    at a glance (each panel repeats its group's colour bar). ``hop_seconds`` and ``max_hz`` put
    the axes in seconds and Hz.
    """
    n = len(panels)
    fig, axes = plt.subplots(n, 1, figsize=(10, 2.2 * n + 0.6), squeeze=False, sharex=True, layout="constrained")
    axes = axes[:, 0]
    gains = [np.asarray(v) for k, v in panels.items() if k in gain_panels]
    gain_max = max([1.0] + [float(np.percentile(g, 99.5)) for g in gains if g.size])
    over = any(float(np.max(g)) > gain_max for g in gains if g.size)
    styles = {False: ({"vmin": 0.0, "vmax": 1.0, "cmap": "magma"}, "magnitude\n(normalized log)", "neither"),
              True: ({"vmin": 0.0, "vmax": gain_max, "cmap": "viridis"}, "multiplier", "max" if over else "neither")}
    for ax, (name, spec) in zip(axes, panels.items(), strict=True):
        spec = np.asarray(spec)
        extent = [0, spec.shape[0] * (hop_seconds or 1), 0, max_hz or spec.shape[1]]
        style, label, extend = styles[name in gain_panels]
        im = ax.imshow(spec.T, aspect="auto", origin="lower", interpolation="none", extent=extent, **style)
        fig.colorbar(im, ax=ax, label=label, extend=extend, pad=0.01)
        ax.set_title(name, fontsize=10, loc="left")
        ax.set_ylabel("frequency (Hz)" if max_hz else "frequency bin")
    axes[-1].set_xlabel("time (s)" if hop_seconds else "frames")
    if title:
        fig.suptitle(title)
    return _save_figure(fig, path)


def save_before_after(path, pairs, xlabel="SDR of the mixture (dB)", ylabel="SDR of the output (dB)", title=None):
    """Save one scatter per ``{name: (subtitle, before values, after values)}``, side by side on the
    same axes, with the diagonal: a point above it is a sample the output improved."""
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.4 * len(pairs) + 0.4, 5.4), squeeze=False,
                             layout="constrained")
    finite = [np.asarray(v, dtype=float) for _, before, after in pairs.values() for v in (before, after)]
    finite = np.concatenate([v[np.isfinite(v)] for v in finite]) if finite else np.zeros(0)
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    pad = 0.05 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    for ax, (name, (subtitle, before, after)) in zip(axes[0], pairs.items(), strict=True):
        before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
        ok = np.isfinite(before) & np.isfinite(after)
        gain = after[ok] - before[ok]
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--", label="no change")
        label = (f"{ok.sum()} samples, median gain {np.median(gain):+.2f} dB, {np.sum(gain > 0)} improved"
                 if ok.any() else "no finite values")
        ax.scatter(before[ok], after[ok], s=12, alpha=0.6, label=label)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_title("\n".join([name, *textwrap.wrap(subtitle, 42)]), fontsize=9)
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=7, loc="upper left")
    axes[0, 0].set_ylabel(ylabel)
    if title:
        fig.suptitle(title)
    return _save_figure(fig, path)


def save_histogram(path, series, xlabel="SDR (dB)", bins=30, title=None):
    """Save overlaid histograms of ``{label: values}`` (NaNs dropped)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    clean = {k: np.asarray(v, dtype=float)[np.isfinite(np.asarray(v, dtype=float))] for k, v in series.items()}
    nonempty = [v for v in clean.values() if v.size]
    edges = np.histogram_bin_edges(np.concatenate(nonempty), bins=bins) if nonempty else bins
    for label, values in clean.items():
        if values.size:
            ax.hist(values, bins=edges, alpha=0.5, label=f"{label} (median {np.median(values):.2f})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return _save_figure(fig, path)
