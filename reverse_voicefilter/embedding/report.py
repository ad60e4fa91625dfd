"""What evaluate_embedder.py writes: ``report.json`` and a picture of the scores.

Both through reverse_voicefilter.core.atomic: a run stopped midway leaves the previous files or none.
"""
import platform

import numpy as np

from reverse_voicefilter.core.atomic import atomic_path
from reverse_voicefilter.core.jsonfile import write_json
from reverse_voicefilter.core.plotting import save_histogram
from reverse_voicefilter.embedding.eer import error_rates

PLOTS = ("histogram", "det")


def write_report(path, result, meta):
    """``result`` from :func:`eer.evaluate_trials`; ``meta``: what was scored, with what."""
    report = {**meta, "eer": result["eer"], "eer_percent": round(100 * result["eer"], 3),
              "threshold": result["threshold"], "same_trials": result["same_trials"],
              "different_trials": result["different_trials"], "utterances": result["utterances"],
              "mean_score_same": float(np.mean(result["scores"][result["labels"] == 1])),
              "mean_score_different": float(np.mean(result["scores"][result["labels"] == 0])),
              "python": platform.python_version()}
    return write_json(path, report, indent=2)


def save_score_histogram(path, result):
    """Overlaid histograms of the same-speaker and different-speaker cosine scores."""
    labels = result["labels"]
    return save_histogram(path, {"same speaker": result["scores"][labels == 1],
                                 "different speakers": result["scores"][labels == 0]},
                          xlabel="cosine score", bins=40,
                          title=f"EER {100 * result['eer']:.2f} % at threshold {result['threshold']:.3f}")


def save_det_curve(path, result):
    """The DET curve (miss rate against false-alarm rate on normal-deviate axes), the EER marked."""
    import matplotlib.pyplot as plt  # reverse_voicefilter.core.plotting has chosen the Agg backend
    from scipy.special import ndtri

    _, far, frr = error_rates(result["scores"], result["labels"])
    clip = 1e-4  # 0 and 1 are at infinity on these axes
    ticks = np.array([0.001, 0.01, 0.05, 0.2, 0.5, 0.8])
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot(ndtri(np.clip(far, clip, 1 - clip)), ndtri(np.clip(frr, clip, 1 - clip)))
    eer = np.clip(result["eer"], clip, 1 - clip)
    ax.plot([ndtri(eer)], [ndtri(eer)], "o", label=f"EER {100 * result['eer']:.2f} %")
    ax.set_xticks(ndtri(ticks), [f"{100 * t:g}" for t in ticks])
    ax.set_yticks(ndtri(ticks), [f"{100 * t:g}" for t in ticks])
    ax.set_xlabel("false acceptance rate (%)")
    ax.set_ylabel("false rejection rate (%)")
    ax.grid(True)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return path
