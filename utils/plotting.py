"""Pictures: spectrogram panels for TensorBoard and files, SDR histograms.

matplotlib's Agg backend only (no display); figures are rendered through
``buffer_rgba`` (the original's ``tostring_rgb`` is gone from matplotlib).
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from utils.atomic import atomic_path  # noqa: E402


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


def save_spectrograms(path, panels, hop_seconds=None):
    """Save a PNG with one panel per ``{title: [T, F] array}``, stacked vertically."""
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.6 * len(panels)), squeeze=False)
    for ax, (title, spec) in zip(axes[:, 0], panels.items(), strict=True):
        spec = np.asarray(spec)
        extent = None
        if hop_seconds:
            extent = [0, spec.shape[0] * hop_seconds, 0, spec.shape[1]]
        im = ax.imshow(spec.T, aspect="auto", origin="lower", interpolation="none", extent=extent)
        fig.colorbar(im, ax=ax)
        ax.set_title(title)
        ax.set_ylabel("frequency bin")
    axes[-1, 0].set_xlabel("seconds" if hop_seconds else "frames")
    fig.tight_layout()
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
